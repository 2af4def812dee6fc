"""TensorRT-LLM LoRA tensors: ``model.lora_weights.npy`` and ``model.lora_config.npy``.

``lora_weights`` is ``[1, N, D]`` in the engine dtype; row i is ``A.flatten() ++ B.flatten()``
(PEFT layout, nothing transposed) zero-padded to ``D = max rank·(in + out)``. ``lora_config`` is
``[1, N, 3]`` int32, row i = ``[module_id, layer_idx, rank]``. The runtime applies no scaling, so
each module's ``alpha / r`` (``alpha / √r`` with rsLoRA) is folded into B here.

Layout rules beyond the plain case, each from the runtime's code:
- fused ``gate_up_proj`` (``mlp_gate_up``): the halves of B are swapped, HF ``[gate; up]`` →
  ``[up; gate]``;
- fused modules at tensor parallelism > 1: the C++ LoRA cache hands each rank a contiguous block of
  B's rows, so B is pre-interleaved per rank (``[Q_r0; K_r0; V_r0; Q_r1; …]``);
- MoE experts share one row per (module, layer): A ``[E, r, in]`` then B ``[E, out, r]``.

A sidecar ``phlora_trtllm.json`` records what is needed to read the rows back exactly (module
paths, dims, tensor parallelism); TensorRT-LLM ignores it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.architecture import ArchitectureMap, ModuleSpec, builtin_maps, find_map
from phlora_nim.converters.errors import InputError, OptionError, PhloraError, raise_all
from phlora_nim.converters.trtllm_contract import (
    CONFIG_FILE,
    DTYPE_MISMATCH,
    ENGINE_DTYPES,
    META_FILE,
    WEIGHTS_FILE,
    as_engine_array,
    decode_row,
    dtype_name_of,
    encode_row,
    pack_rows,
    row_problems,
    tensor_problems,
)
from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS, TRTLLM_MODULES

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "TRTLLM_MODULES",
    "WEIGHTS_FILE",
    "TrtllmLora",
    "adapter_to_trtllm",
    "check_engine",
    "load_trtllm",
    "save_trtllm",
    "trtllm_to_adapter",
]


@dataclass(frozen=True)
class TrtllmLora:
    """The npy pair plus the sidecar metadata describing each row."""

    weights: np.ndarray  # [1, N, D]
    config: np.ndarray  # [1, N, 3] int32
    rows: tuple[dict[str, Any], ...]
    dtype: str
    tp: int

    @property
    def num_rows(self) -> int:
        return int(self.config.shape[1])


def _infer_map(paths: list[str], config: dict[str, Any] | None) -> ArchitectureMap:
    if config:
        amap = find_map(config)
        if amap is not None:
            return amap
    for amap in builtin_maps():
        if all(amap.match(p) for p in paths):
            return amap
    unmatched = [p for p in paths if not any(m.match(p) for m in builtin_maps())]
    raise InputError(
        "adapter modules have no TensorRT-LLM module mapping",
        where=", ".join(unmatched[:3]) or paths[0],
        expected="modules of a supported family (llama, qwen2, gemma, phi3, mixtral)",
        found=f"{len(unmatched)} unmatched modules",
        fix="export PEFT or NIM format instead, or add an architecture map",
    )


def _fused_splits(spec: ModuleSpec, config: dict[str, Any] | None, out_dim: int) -> list[int] | None:
    """Row blocks of a fused module's B, in TensorRT-LLM order (after the gate/up swap)."""
    if spec.trtllm == "mlp_gate_up":
        return [out_dim // 2, out_dim // 2]
    if spec.trtllm == "attn_qkv":
        if not config:
            return None
        heads = config.get("num_attention_heads")
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads else None)
        if not (heads and kv and head_dim) or (heads + 2 * kv) * head_dim != out_dim:
            return None
        return [heads * head_dim, kv * head_dim, kv * head_dim]
    return None


def interleave_for_tp(b: torch.Tensor, splits: list[int], tp: int) -> torch.Tensor:
    """Reorder fused B rows so each of ``tp`` ranks gets its own slice of every block, contiguously."""
    if tp == 1:
        return b
    blocks = torch.split(b, splits, dim=0)
    per_rank = [blk.chunk(tp, dim=0) for blk in blocks]
    return torch.cat([torch.cat([chunks[r] for chunks in per_rank], dim=0) for r in range(tp)], dim=0)


def deinterleave_for_tp(b: torch.Tensor, splits: list[int], tp: int) -> torch.Tensor:
    """Inverse of :func:`interleave_for_tp`."""
    if tp == 1:
        return b
    ranks = b.chunk(tp, dim=0)
    pieces = [torch.split(rank, [s // tp for s in splits], dim=0) for rank in ranks]
    return torch.cat([torch.cat([pieces[r][i] for r in range(tp)], dim=0) for i in range(len(splits))], dim=0)


def _swap_halves(b: torch.Tensor) -> torch.Tensor:
    half = b.shape[0] // 2
    return torch.cat([b[half:], b[:half]], dim=0)


def adapter_to_trtllm(
    adapter: LoraAdapter,
    *,
    config: dict[str, Any] | None = None,
    dtype: str = "float16",
    tp: int = 1,
) -> TrtllmLora:
    """Lay a LoRA adapter out as TensorRT-LLM's ``lora_weights`` / ``lora_config`` tensors.

    Args:
        adapter: any LoRA adapter (scales are folded into B).
        config: the base model's ``config.json`` (needed for fused ``qkv_proj`` at ``tp > 1``).
        dtype: engine dtype: ``float16``, ``bfloat16`` or ``float32``.
        tp: tensor parallelism of the engine.

    Raises:
        OptionError: bad dtype/tp, or a fused module whose rows do not split evenly over ``tp``.
        InputError: modules with no TensorRT-LLM equivalent.
    """
    if dtype not in ENGINE_DTYPES:
        raise OptionError("unknown dtype", where="--dtype", expected=", ".join(ENGINE_DTYPES), found=repr(dtype))
    if tp < 1:
        raise OptionError("tensor parallelism must be ≥ 1", where="--tp", found=str(tp))
    if adapter.modules_to_save or adapter.lora_biases:
        raise InputError(
            "the adapter carries full tensors (modules_to_save or bias deltas) TensorRT-LLM cannot apply",
            where=", ".join(sorted(adapter.modules_to_save)[:3] + sorted(adapter.lora_biases)[:3]),
            expected="LoRA factors of linear modules only",
            fix="re-extract with --extra drop (the default)",
        )
    paths = sorted(adapter.modules)
    amap = _infer_map(paths, config)
    groups: dict[tuple[int, int], list[tuple[int, str, ModuleSpec]]] = {}
    problems: list[PhloraError] = []
    for path in paths:
        hit = amap.match(path)
        if hit is None or hit[0].trtllm is None or hit[1] is None:
            problems.append(
                InputError(
                    "module has no TensorRT-LLM LoRA module",
                    where=path,
                    expected=f"a {amap.family} module with a trtllm entry",
                    fix="drop it",
                )
            )
            continue
        spec, layer = hit
        m = spec.pattern.fullmatch(path)
        expert = int(m.groupdict()["expert"]) if m is not None and m.groupdict().get("expert") else 0
        groups.setdefault((layer, TRTLLM_MODULE_IDS[spec.trtllm]), []).append((expert, path, spec))
    raise_all(problems, summary="cannot lay out the adapter for TensorRT-LLM")
    rows: list[np.ndarray] = []
    meta_rows: list[dict[str, Any]] = []
    config_rows: list[list[int]] = []
    for (layer, module_id), members in sorted(groups.items()):
        members.sort()
        spec = members[0][2]
        ws = [adapter.modules[p] for _, p, _ in members]
        rank = max(w.rank for w in ws)
        in_dim, out_dim = ws[0].a.shape[1], ws[0].b.shape[0]
        pairs = []
        splits = _fused_splits(spec, config, out_dim)
        if tp > 1 and spec.trtllm in ("attn_qkv", "mlp_gate_up"):
            if splits is None:
                raise OptionError(
                    "fused qkv_proj needs the model config to interleave for --tp",
                    where="--tp",
                    fix="pass --config with the base model's config.json",
                )
            if any(s % tp for s in splits):
                raise OptionError(
                    "fused module rows do not split evenly over tensor-parallel ranks",
                    where=members[0][1],
                    expected=f"blocks {splits} divisible by {tp}",
                    found=str(tp),
                )
        for w in ws:
            # Heterogeneous expert ranks: zero-pad to the row's rank (the product is unchanged).
            a = torch.zeros(rank, in_dim)
            b = torch.zeros(out_dim, rank)
            a[: w.rank] = w.a.float()
            b[:, : w.rank] = w.b.float() * w.scale(use_rslora=adapter.use_rslora)
            if spec.trtllm == "mlp_gate_up":
                b = _swap_halves(b)
            if tp > 1 and splits is not None:
                b = interleave_for_tp(b, splits, tp)
            pairs.append((a.numpy(), b.numpy()))
        rows.append(encode_row(pairs))
        config_rows.append([module_id, layer, rank])
        meta_rows.append(
            {
                "modules": [p for _, p, _ in members],
                "in": in_dim,
                "out": out_dim,
                "trtllm": spec.trtllm,
                "splits": splits,
            }
        )
    return TrtllmLora(
        weights=pack_rows(rows, dtype),
        config=np.asarray([config_rows], dtype=np.int32),
        rows=tuple(meta_rows),
        dtype=dtype,
        tp=tp,
    )


def save_trtllm(lora: TrtllmLora, folder: Path, *, source: str | None = None) -> None:
    """Write the npy pair (and the sidecar) into an existing folder."""
    folder = Path(folder)
    np.save(folder / WEIGHTS_FILE, lora.weights)  # bfloat16 is written as descr '<V2', as TensorRT-LLM does
    np.save(folder / CONFIG_FILE, lora.config)
    meta = {"format": "phlora-trtllm/1", "dtype": lora.dtype, "tp": lora.tp, "source": source, "rows": list(lora.rows)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def load_trtllm(folder: Path, *, dtype: str | None = None, mmap: bool = False) -> TrtllmLora:
    """Read and validate the npy pair (bfloat16 arrive as ``<V2`` and are viewed back).

    Args:
        folder: holding ``model.lora_weights.npy`` and ``model.lora_config.npy``.
        dtype: for a ``<V2`` file without sidecar: the 2-byte float it holds (default bfloat16).
        mmap: map the files read-only instead of reading them (serving: pages come in on use).
    """
    folder = Path(folder)
    arrays = []
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = folder / name
        if not path.exists():
            raise InputError(
                "TensorRT-LLM LoRA file missing",
                where=str(path),
                expected=f"{WEIGHTS_FILE} and {CONFIG_FILE}",
                found="no such file",
                fix="export with `phlora-nim export --format trtllm`",
            )
        try:
            arrays.append(np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None))
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(
                f"corrupt or truncated npy file ({exc})",
                where=str(path),
                expected="an array written by numpy.save",
                fix="re-export the adapter",
            ) from None
    weights, config = arrays
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    weights = as_engine_array(weights, dtype or meta.get("dtype", "bfloat16"))
    problems: list[PhloraError] = [InputError(text, where=str(folder)) for text in tensor_problems(weights, config)]
    raise_all(problems, summary=f"{folder} is not a valid TensorRT-LLM LoRA")
    return TrtllmLora(
        weights=weights,
        config=config,
        rows=tuple(meta.get("rows", ())),
        dtype=str(dtype_name_of(weights)),
        tp=int(meta.get("tp", 1)),
    )


def trtllm_to_adapter(lora: TrtllmLora, *, source: str = "lora") -> LoraAdapter:
    """Turn the npy pair back into a PEFT-layout adapter (alpha = r: scales are already in B).

    Needs the sidecar rows (module paths and dims), written by :func:`save_trtllm`.
    """
    if len(lora.rows) != lora.num_rows:
        raise InputError(
            "row metadata missing",
            where=f"{source}/{META_FILE}",
            expected=f"{lora.num_rows} row descriptions",
            found=f"{len(lora.rows)}",
            fix="read npy pairs exported by phlora-nim, or export again from the PEFT adapter",
        )
    weights = np.asarray(lora.weights, dtype=np.float32)[0]
    modules: dict[str, LoraWeights] = {}
    for i, meta in enumerate(lora.rows):
        module_id, _layer, rank = (int(x) for x in lora.config[0, i, :3])
        experts = len(meta["modules"])
        in_dim, out_dim = int(meta["in"]), int(meta["out"])
        a_all, b_all = decode_row(
            torch.from_numpy(weights[i]), rank=rank, in_dim=in_dim, out_dim=out_dim, experts=experts
        )
        for e, path in enumerate(meta["modules"]):
            b = b_all[e]
            if lora.tp > 1 and meta.get("splits"):
                b = deinterleave_for_tp(b, meta["splits"], lora.tp)
            if TRTLLM_MODULES[module_id] == "mlp_gate_up":
                b = _swap_halves(b)
            modules[path] = LoraWeights(a=a_all[e].clone(), b=b.clone(), alpha=float(rank))
    return LoraAdapter(modules=modules)


def check_engine(lora: TrtllmLora, engine_config: dict[str, Any], *, where: str) -> None:
    """Refuse what a TensorRT-LLM engine would reject: dtype, layers, modules, rank.

    Args:
        lora: the laid-out adapter.
        engine_config: the engine's ``config.json``.
        where: the engine config path, for messages.
    """
    build = engine_config.get("build_config") or {}
    pretrained = engine_config.get("pretrained_config") or {}
    lora_cfg = build.get("lora_config") or engine_config.get("lora_config") or {}
    plugin = build.get("plugin_config") or engine_config.get("plugin_config") or {}
    problems: list[PhloraError] = []
    lora_plugin = plugin.get("lora_plugin")
    if not lora_plugin:
        raise InputError(
            "the engine was built without LoRA support",
            where=f"{where} plugin_config.lora_plugin",
            expected="a dtype such as float16",
            found=repr(lora_plugin),
            fix="rebuild with trtllm-build --lora_plugin <dtype> (see `phlora-nim engine-plan`)",
        )
    engine_dtype = pretrained.get("dtype") if lora_plugin == "auto" else lora_plugin
    if engine_dtype and engine_dtype != lora.dtype:
        problems.append(
            InputError(
                DTYPE_MISMATCH,
                where=f"{where} dtype",
                expected=str(engine_dtype),
                found=lora.dtype,
                fix=f"export with --dtype {engine_dtype}",
            )
        )
    layers = pretrained.get("num_hidden_layers")
    max_rank = lora_cfg.get("max_lora_rank")
    targets = set(lora_cfg.get("lora_target_modules") or [])

    def dims(module_id: int, _layer: int) -> tuple[int, int] | None:
        enabled = not targets or TRTLLM_MODULES[module_id] in targets if module_id < len(TRTLLM_MODULES) else False
        return (0, 0) if enabled else None

    for p in row_problems(lora.config[0], lora.weights.shape[2], dims=dims, num_layers=layers, max_rank=max_rank):
        problems.append(
            InputError(
                p.message,
                where=f"row {p.row} ({p.module}, layer {p.layer})",
                fix="prune the adapter (`phlora-nim prune --rank`), or rebuild the engine with this module in "
                "--lora_target_modules (see `phlora-nim engine-plan`)",
            )
        )
    raise_all(problems, summary=f"the engine {where} would reject this adapter")
