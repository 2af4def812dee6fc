"""End-to-end jobs behind the CLI: extract, prune and export adapter folders, atomically."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import (
    BIN_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_peft,
    save_peft,
    stored_parameters,
)
from phlora_nim.converters.hub import config_json
from phlora_nim.converters.prune import prune_adapter
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.converters.report import REPORT_NAME, write_report
from phlora_nim.converters.scale_rules import LAYOUTS, Layout
from phlora_nim.core.atomic import atomic_dir
from phlora_nim.core.dtypes import DTYPES, parse_dtype
from phlora_nim.core.errors import OptionError
from phlora_nim.core.json_files import read_json
from phlora_nim.core.names import validate_adapter_name
from phlora_nim.core.outputs import OutputKind, guard_output, report_kind_is
from phlora_nim.engines.trtllm_legacy.files import CONFIG_FILE as TRTLLM_CONFIG
from phlora_nim.engines.trtllm_legacy.files import META_FILE as TRTLLM_META
from phlora_nim.engines.trtllm_legacy.files import WEIGHTS_FILE as TRTLLM_WEIGHTS
from phlora_nim.engines.trtllm_legacy.nim_store import save_nim_adapter
from phlora_nim.engines.trtllm_legacy.tensors import adapter_to_trtllm, check_engine, save_trtllm
from phlora_nim.jobs.pipeline import extract_adapter, planned, write_report_files
from phlora_nim.jobs.plots import PLOT_NAME

log = logging.getLogger("phlora_nim")
# `export --format`: formats of adapter folders, not engines: "trtllm" is the legacy npy pair, "nim" the
# NIM store's folder layout.
NPY_FORMAT = "trtllm"
NIM_STORE_FORMAT = "nim"
EXPORT_FORMATS = ("peft", NPY_FORMAT, NIM_STORE_FORMAT)

# What each command writes: ``--force`` replaces only a folder holding these (see core/outputs.py).
_PEFT_FILES = (CONFIG_NAME, WEIGHTS_NAME, BIN_NAME)
_TRTLLM_FILES = (TRTLLM_WEIGHTS, TRTLLM_CONFIG, TRTLLM_META)
EXTRACT_OUTPUT = OutputKind(
    "extract", (CONFIG_NAME, REPORT_NAME), (*_PEFT_FILES, REPORT_NAME, PLOT_NAME), report_kind_is(None)
)
PRUNE_OUTPUT = OutputKind("prune", (CONFIG_NAME, REPORT_NAME), (*_PEFT_FILES, REPORT_NAME), report_kind_is("prune"))
EXPORT_OUTPUTS = {
    "peft": OutputKind("export --format peft", (CONFIG_NAME,), _PEFT_FILES),
    "trtllm": OutputKind("export --format trtllm", (TRTLLM_WEIGHTS, TRTLLM_CONFIG), _TRTLLM_FILES),
    "nim": OutputKind("export --format nim", (CONFIG_NAME,), (*_PEFT_FILES, *_TRTLLM_FILES)),
}


def extract(
    base: Path,
    finetuned: Path,
    out: Path,
    options: ExtractOptions,
    *,
    force: bool = False,
    command: str | None = None,
    plot: bool = True,
    on_plan: Callable[[int], None] | None = None,
    progress: Callable[[str], None] | None = None,
    layout: Layout = "padded",
) -> dict[str, Any]:
    """Extract a PEFT LoRA adapter from ``base`` → ``finetuned`` into ``out``.

    Writes ``adapter_config.json``, ``adapter_model.safetensors``, ``phlora_report.json`` and
    ``energy.png`` into a temporary folder renamed to ``out`` only when all succeeded.

    Args:
        base, finetuned: checkpoint folders or ``.safetensors`` files.
        out: the adapter folder to create.
        options: rank policy and extraction options.
        force: replace ``out`` if it exists.
        command: the command line, recorded in the report.
        plot: write ``energy.png``.
        on_plan: called with the number of tensors to process once planning is done.
        progress: called per processed tensor.
        layout: ``padded`` (every engine) or ``mixed`` (true ranks: PEFT, TensorRT-LLM), see
            :mod:`phlora_nim.converters.scale_rules`.

    Returns:
        The report dict.

    Raises:
        PhloraError: bad input, options or output location (nothing is written).
    """
    start = time.perf_counter()
    check_layout(layout)
    inputs = (base, finetuned, options.calibration, options.target.prompts if options.target else None)
    guard_output(Path(out), force=force, kind=EXTRACT_OUTPUT, inputs=inputs)
    with planned(base, [finetuned], options, on_plan=on_plan) as job:
        extracted = extract_adapter(
            job,
            job.pairs[0],
            command=command,
            progress=progress,
            dropped_hint="Pass --extra save to keep them as modules_to_save (not servable by vLLM/NIM/TensorRT-LLM).",
        )
    t_write = time.perf_counter()
    report = extracted.report.with_totals(layout=layout, stored_parameters=stored_parameters(extracted.adapter, layout))
    with atomic_dir(Path(out), force=force) as tmp:
        save_peft(extracted.adapter, tmp, dtype=extracted.out_dtype, layout=layout)
        report = report.with_timings(
            write_s=round(time.perf_counter() - t_write, 4), total_s=round(time.perf_counter() - start, 4)
        )
        write_report_files(report, tmp, plot=plot)
    return report.to_json()


def check_layout(layout: str) -> None:
    """Refuse an unknown ``--layout`` before any work."""
    if layout not in LAYOUTS:
        raise OptionError(
            "unknown adapter folder layout",
            where="--layout",
            expected=" or ".join(LAYOUTS),
            found=repr(layout),
            fix="padded for vLLM/NIM or any engine, mixed for PEFT and TensorRT-LLM's HF loader (LLM API, llmapi)",
        )


def prune(
    adapter_dir: Path,
    out: Path,
    policy: RankPolicy,
    *,
    force: bool = False,
    command: str | None = None,
    dtype: str = "auto",
    layout: Layout = "padded",
) -> dict[str, Any]:
    """Re-truncate a PEFT LoRA adapter into ``out`` (QR + small-core SVD; no dense delta), written in
    ``layout``."""
    start = time.perf_counter()
    check_layout(layout)
    storage = parse_dtype(dtype, "--dtype", auto=True)
    guard_output(Path(out), force=force, kind=PRUNE_OUTPUT, inputs=(adapter_dir,))
    adapter = load_peft(Path(adapter_dir))
    pruned, records = prune_adapter(adapter, policy)
    kept = sum(float(r["energy_kept"]) * float(r["delta_energy"]) for r in records)  # type: ignore[arg-type]
    total = sum(float(r["delta_energy"]) for r in records)  # type: ignore[arg-type]
    report = {
        "format": "phlora-report/1",
        "kind": "prune",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "source_adapter": str(adapter_dir),
        "policy": policy.to_json(),
        "totals": {
            "modules": len(records),
            "adapter_parameters": pruned.num_parameters(),
            "stored_parameters": stored_parameters(pruned, layout),
            "layout": layout,
            "source_parameters": adapter.num_parameters(),
            "energy_kept_of_adapter": kept / total if total else 1.0,
            "min_energy_kept": min((float(r["energy_kept"]) for r in records), default=1.0),  # type: ignore[arg-type]
        },
        "modules": records,
    }
    with atomic_dir(Path(out), force=force) as tmp:
        save_peft(pruned, tmp, dtype=storage.torch if storage else None, layout=layout)
        report["timings"] = {"total_s": round(time.perf_counter() - start, 4)}
        write_report(report, tmp)
    return report


def _model_config(config: Path | None, adapter: LoraAdapter) -> dict[str, Any] | None:
    """The base model's config.json: given explicitly, or found beside the adapter's recorded base."""
    if config is not None:
        path = Path(config) / "config.json" if Path(config).is_dir() else Path(config)
        return read_json(path, what="model config")
    if adapter.base_model_name_or_path:
        guess = config_json(adapter.base_model_name_or_path)  # a folder, or a hub id through the cache
        if guess is not None:
            return read_json(guess, what="model config")
    return None


def export(
    adapter_dir: Path,
    out: Path,
    *,
    fmt: str,
    dtype: str = "auto",
    tp: int = 1,
    engine_config: Path | None = None,
    name: str | None = None,
    config: Path | None = None,
    with_trtllm: bool = False,
    strict: bool = False,
    force: bool = False,
    layout: Layout = "padded",
) -> Path:
    """Write a PEFT LoRA adapter as ``peft``, ``trtllm`` (npy pair) or ``nim`` (store folder).

    ``layout`` is the PEFT folder's (:mod:`~phlora_nim.converters.scale_rules`): ``mixed`` (true
    ranks) only for ``peft``: a NIM store may be served by vLLM, which reads mixed ranks wrongly, and
    the npy pair pads every row to the largest rank by its format.

    Returns:
        The folder written (for ``nim``: ``out/<name>``).

    Raises:
        PhloraError: unreadable adapter, bad options, or an adapter the engine would reject.
    """
    if fmt not in EXPORT_FORMATS:
        raise OptionError("unknown export format", where="--format", expected="peft, trtllm or nim", found=repr(fmt))
    check_layout(layout)
    if layout != "padded" and fmt != "peft":
        raise OptionError(
            f"--layout {layout} is for PEFT folders",
            where="--layout",
            expected="padded with --format nim or trtllm",
            found=f"--format {fmt} --layout {layout}",
            fix="drop --layout (a NIM store may be served by vLLM, which scales mixed ranks wrongly; the npy pair "
            "pads every row by its format), or export --format peft",
        )
    storage = parse_dtype(dtype, "--dtype", auto=True)
    target = Path(out)
    if fmt == NIM_STORE_FORMAT:
        target = Path(out) / validate_adapter_name(name or Path(adapter_dir).resolve().name)
    guard_output(target, force=force, kind=EXPORT_OUTPUTS[fmt], inputs=(adapter_dir, engine_config, config))
    adapter = load_peft(Path(adapter_dir))
    model_config = _model_config(config, adapter)
    engine = read_json(engine_config, what="engine config") if engine_config else None
    trt_dtype = dtype
    if trt_dtype == "auto":
        pretrained = (engine or {}).get("pretrained_config") or {}
        trt_dtype = pretrained.get("dtype") if pretrained.get("dtype") in DTYPES else "float16"
    lora = None
    if fmt == NPY_FORMAT or (fmt == NIM_STORE_FORMAT and with_trtllm):
        lora = adapter_to_trtllm(adapter, config=model_config, dtype=trt_dtype, tp=tp, strict=strict)
        if engine is not None:
            check_engine(lora, engine, where=str(engine_config))
    with atomic_dir(target, force=force) as tmp:
        if fmt == "peft":
            save_peft(adapter, tmp, dtype=storage.torch if storage else None, layout=layout)
        elif fmt == NPY_FORMAT:
            assert lora is not None
            save_trtllm(lora, tmp, source=str(adapter_dir))
        else:
            save_nim_adapter(adapter, tmp, dtype=storage.torch if storage else None)
            if lora is not None:
                save_trtllm(lora, tmp, source=str(adapter_dir))
    log.info(
        "exported %s as %s (%s: %d parameters stored) to %s",
        adapter_dir, fmt, layout, stored_parameters(adapter, layout), target,
    )  # fmt: skip
    return target
