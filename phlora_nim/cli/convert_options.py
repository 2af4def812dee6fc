"""The flag tables of ``phlora-nim convert`` (its inputs, the repository settings a later convert keeps, the
legacy engine's cache and preload settings, the llmapi model's) and how they become a ``ConvertJob``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from phlora_nim.cli.adapter_options import LAYOUT, LAYOUT_HELP, STRICT_HELP
from phlora_nim.cli.extraction_flags import DecompositionFlags, FidelityFlags, RankFlags, extract_options
from phlora_nim.cli.flags import option, rows
from phlora_nim.core.errors import OptionError
from phlora_nim.engines.registry import DEFAULT_ENGINE, ENGINES
from phlora_nim.repository.layout import DEFAULT_GRACE_S, GRACE

if TYPE_CHECKING:
    from phlora_nim.jobs.convert import ConvertJob
    from phlora_nim.repository.settings import RepositorySettings

# The help panel of the options a later convert into the same repository need not repeat.
KEPT = "Repository settings (kept when not given)"
# The llmapi engine (--backend trtllm / trtllm-cpu): its model.yaml's lora_config and LLM() arguments.
LLMAPI = "trtllm / trtllm-cpu (model.yaml)"


@dataclass(frozen=True)
class ConvertInputs:
    """Which fine-tunes of which base go into which repository."""

    base: Path = option("--base", "Base checkpoint folder or hub id (its tokenizer is served too).")
    finetuned: tuple[Path, ...] = option(
        "--finetuned", "Full fine-tune of the base (folder or hub id); repeat for several."
    )
    model_repository: Path = option(
        "--model-repository",
        "Triton model repository folder (created if missing).",
        default=Path("model_repository"),
        short="-m",
    )
    name: tuple[str, ...] | None = option(
        "--name", "Adapter name per --finetuned, in order (default: folder names).", default=None
    )


@dataclass(frozen=True)
class SettingsFlags:
    """Repository settings every engine keeps (``RepositorySettings`` fields of the same meaning)."""

    backend: str | None = option(
        "--backend",
        "The engine the repository is written for: "
        + "; ".join(f"{row.name}: {row.summary} ({row.versions})" for row in ENGINES)
        + f". Default: {DEFAULT_ENGINE}.",
        default=None,
        panel=KEPT,
    )
    engine_dtype: str | None = option(
        "--engine-dtype",
        "Engine dtype: LoRA weights are laid out and sent in it (float16, bfloat16, float32; default float32).",
        default=None,
        panel=KEPT,
    )
    # ``convert --dtype`` named the engine's dtype; everywhere else --dtype is adapter storage.
    dtype: str | None = option("--dtype", "Old spelling of --engine-dtype (still accepted).", default=None, hidden=True)
    served_path: str | None = option(
        "--served-path",
        "Where Triton will mount this repository (sets lora_prefetch_dir under it); default: "
        "the repository's own path for reference, /models for tensorrtllm.",
        default=None,
        panel=KEPT,
    )

    def engine_dtype_given(self) -> str | None:
        """The engine dtype given as ``--engine-dtype`` or, with a note on stderr, as the old ``--dtype``.

        Raises:
            OptionError: both given, with different values.
        """
        if self.dtype is None:
            return self.engine_dtype
        if self.engine_dtype is not None and self.engine_dtype != self.dtype:
            raise OptionError(
                "two engine dtypes",
                where="--engine-dtype / --dtype",
                found=f"{self.engine_dtype} and {self.dtype}",
                fix="give --engine-dtype only",
            )
        typer.echo(
            "note: `convert --dtype` is deprecated: it is spelled --engine-dtype now (the engine's dtype; "
            "elsewhere --dtype is the adapter's storage dtype). The old spelling still works.",
            err=True,
        )
        return self.dtype


@dataclass(frozen=True)
class LegacyFlags:
    """What only the legacy engine's repository (``--backend trtllm-legacy*``) takes: its engine, Triton
    models, LoRA cache and preload settings, and converting one fine-tune of the list per pod."""

    engine_dir: str | None = option(
        "--engine-dir", "tensorrtllm: engine folder as Triton sees it (gpt_model_path).", default=None, panel=KEPT
    )
    tokenizer_dir: str | None = option(
        "--tokenizer-dir", "Tokenizer folder as Triton will see it (default: --base).", default=None, panel=KEPT
    )
    max_batch_size: int | None = option(
        "--max-batch-size", "Triton max batch size (default 8).", default=None, panel=KEPT
    )
    max_lora_rank: int | None = option(
        "--max-lora-rank", "reference: largest rank accepted on requests (default 64).", default=None, panel=KEPT
    )
    lora_cache_mb: int | None = option(
        "--lora-cache-mb",
        "Host LoRA cache (default 0 = sized from the registered adapters; tensorrtllm: in the runtime's pages).",
        default=None,
        panel=KEPT,
    )
    decoupled: bool | None = option(
        "--decoupled/--no-decoupled",
        "Stream tokens (ModelStreamInfer) instead of one response (default: one response).",
        default=None,
        panel=KEPT,
        show_default=False,
    )
    trtllm_version: str | None = option(
        "--trtllm-version",
        "TensorRT-LLM Triton backend release whose input names are written: 0.20 (v0.20.0 and later: "
        "seed, min_tokens; the default) or 0.19 (random_seed, min_length).",
        default=None,
        panel=KEPT,
    )
    llm_parameter: tuple[str, ...] | None = option(
        "--llm-parameter",
        "KEY=VALUE parameter of the tensorrt_llm model, repeatable (e.g. max_input_len=1024, "
        "max_seq_len=2048, max_num_tokens=8192 for the reference model's limits).",
        default=None,
        panel=KEPT,
    )
    prefetch: tuple[str, ...] | None = option(
        "--prefetch",
        "Adapter preloaded at start, repeatable (only these unless --prefetch-limit adds the most used).",
        default=None,
        panel=KEPT,
    )
    prefetch_limit: int | None = option(
        "--prefetch-limit",
        "Preload at most N adapters: the --prefetch ones, then the most used (--prefetch-usage), "
        "then by name; the router sends the others on first use (default: all).",
        default=None,
        panel=KEPT,
    )
    prefetch_usage: Path | None = option(
        "--prefetch-usage",
        "Request counts per adapter: the router's /metrics text or a JSON object {name: count}.",
        default=None,
        panel=KEPT,
    )
    lora_cache_spare: int | None = option(
        "--lora-cache-spare",
        "Adapters (of the largest kind) the LoRA cache keeps room for besides the preloaded ones "
        "(default: --max-batch-size).",
        default=None,
        panel=KEPT,
    )
    gpu_free_memory_gib: float | None = option(
        "--gpu-free-memory-gib",
        "tensorrtllm: free GPU memory when the LoRA cache is allocated; sizes "
        "lora_cache_gpu_memory_fraction (default: 0.05 as TensorRT-LLM).",
        default=None,
        panel=KEPT,
    )
    engine_config: Path | None = option(
        "--engine-config",
        "The engine's config.json: refuse adapters it would reject, size the LoRA cache for it "
        "(required with --backend trtllm-legacy; kept for later converts).",
        default=None,
    )
    index: int | None = option(
        "--index",
        "Convert only the fine-tune at this 0-based position of the --finetuned list (named as in the "
        "whole list): one pod of a Kubernetes Indexed Job each, e.g. --index $(JOB_COMPLETION_INDEX).",
        default=None,
    )

    def given(self) -> list[str]:
        """The flags given (not left at their default), as typed."""
        return [row.name for f, row, _ in rows(type(self)) if getattr(self, f.name) != f.default]


@dataclass(frozen=True)
class JobFlags:
    """How ``convert`` registers: engine layout (tensor parallelism), replacement and its grace period."""

    tp: int = option("--tp", "Tensor parallelism of the engine.", default=1)
    check_served_path: bool = option(
        "--check-served-path",
        "Refuse unless --served-path is this repository here (run where Triton mounts it).",
        default=False,
    )
    strict: bool = option("--strict", STRICT_HELP, default=False)
    replace: bool = option(
        "--replace", "Allow a registered name to get different weights (new task id).", default=False
    )
    grace: float = option(
        "--grace",
        "Seconds the old tensors of a replaced adapter are kept for routers still using them.",
        default=DEFAULT_GRACE_S,
        bound=GRACE,
    )
    layout: str = option(
        "--layout",
        LAYOUT_HELP + " Per engine: trtllm / trtllm-cpu take both; the legacy npy engines pad by format.",
        default="padded",
        bound=LAYOUT,
    )


@dataclass(frozen=True)
class LlmapiFlags:
    """The llmapi engine's model.yaml: its lora_config and LLM() arguments."""

    max_loras: int = option(
        "--max-loras", "lora_config.max_loras: adapters held on the GPU at once.", default=8, panel=LLMAPI
    )
    max_cpu_loras: int = option(
        "--max-cpu-loras", "lora_config.max_cpu_loras: adapters held in host memory.", default=32, panel=LLMAPI
    )
    pp: int = option("--pp", "pipeline_parallel_size of the engine.", default=1, panel=LLMAPI)
    model_yaml: Path | None = option(
        "--model-yaml",
        "Start from this model.yaml (its other LLM() arguments are kept); lora_config is widened to cover "
        "the adapters unless --fixed-model-yaml.",
        default=None,
        panel=LLMAPI,
    )
    fixed_model_yaml: bool = option(
        "--fixed-model-yaml",
        "Use --model-yaml's lora_config as is: refuse adapters it does not cover (modules, rank).",
        default=False,
        panel=LLMAPI,
    )
    served_base: str | None = option(
        "--served-base",
        "model.yaml's model: the base checkpoint as the Triton pods see it (default: --base).",
        default=None,
        panel=LLMAPI,
    )


@dataclass(frozen=True)
class ConvertFlags:
    """Every option of ``convert``, by group."""

    inputs: ConvertInputs
    settings: SettingsFlags
    legacy: LegacyFlags
    rank: RankFlags
    job: JobFlags
    fidelity: FidelityFlags
    decomposition: DecompositionFlags
    llmapi: LlmapiFlags

    def job_of(self, settings: RepositorySettings, **more: Any) -> ConvertJob:
        """The ``ConvertJob`` these options ask for, writing ``settings`` (``more``: further job fields)."""
        from phlora_nim.jobs.convert import ConvertJob

        return ConvertJob(
            base=self.inputs.base,
            finetuned=self.inputs.finetuned,
            names=self.inputs.name or (),
            repository=self.inputs.model_repository,
            options=extract_options(self.rank, self.fidelity, self.decomposition),
            settings=settings,
            tp=self.job.tp,
            replace=self.job.replace,
            grace=self.job.grace,
            layout=self.job.layout,  # type: ignore[arg-type]  # checked against LAYOUTS by the row
            **more,
        )

    def repository_job(self) -> ConvertJob:
        """The job of every engine but the llmapi model: its repository settings (those not given kept from
        the repository), the engine config it must fit, and the checks it asks for."""
        settings, keep_stored = repository_settings(self.inputs.base, self.settings, self.legacy)
        return self.job_of(
            settings,
            keep_stored=keep_stored,
            engine_config=self.legacy.engine_config,
            strict=self.job.strict,
            check_served_path=self.job.check_served_path,
        )


# Flags stored under the same name in the repository settings.
_SETTINGS = ("backend", "served_path")
_LEGACY_SETTINGS = (
    "engine_dir",
    "tokenizer_dir",
    "max_batch_size",
    "decoupled",
    "max_lora_rank",
    "trtllm_version",
    "prefetch_limit",
    "lora_cache_spare",
)


def repository_settings(
    base: Path, settings: SettingsFlags, legacy: LegacyFlags
) -> tuple[RepositorySettings, frozenset[str]]:
    """The repository settings of ``convert``'s flags, and the names of those not given.

    Settings not given take their defaults here; an existing repository keeps its own values for them.
    """
    from phlora_nim.repository.settings import RepositorySettings

    gib = legacy.gpu_free_memory_gib
    given: dict[str, Any] = {
        **{key: getattr(settings, key) for key in _SETTINGS},
        **{key: getattr(legacy, key) for key in _LEGACY_SETTINGS},
        "dtype": settings.engine_dtype_given(),
        "llm_parameters": _key_values(legacy.llm_parameter, flag="--llm-parameter"),
        "prefetch_names": legacy.prefetch or None,
        "prefetch_usage": _usage(legacy.prefetch_usage),
        "gpu_free_memory_bytes": None if gib is None else int(gib * (1 << 30)),
        "lora_cache_bytes": None if legacy.lora_cache_mb is None else legacy.lora_cache_mb << 20,
    }
    values = {k: v for k, v in given.items() if v is not None}
    stored = RepositorySettings(base=str(Path(base).resolve()), **values)
    keep = frozenset(f.name for f in dataclasses.fields(RepositorySettings)) - {"base"} - values.keys()
    return stored, keep


def _usage(path: Path | None) -> dict[str, float] | None:
    """Request counts from ``--prefetch-usage`` (None when not given: the repository keeps its own)."""
    if path is None:
        return None
    from phlora_nim.engines.trtllm_legacy.cache_plan import read_usage

    return read_usage(path)


def _key_values(items: tuple[str, ...] | None, *, flag: str) -> dict[str, str] | None:
    """``KEY=VALUE`` options as a dict (None when none was given: the repository keeps its own)."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError("not a KEY=VALUE pair", where=flag, expected="e.g. max_input_len=1024", found=repr(item))
        out[key.strip()] = value.strip()
    return out
