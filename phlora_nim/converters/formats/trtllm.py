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

import ml_dtypes
import numpy as np
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.architecture import ArchitectureMap, ModuleSpec, builtin_maps, find_map
from phlora_nim.converters.errors import InputError, OptionError, PhloraError, raise_all
from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS, TRTLLM_MODULES

WEIGHTS_FILE = "model.lora_weights.npy"
CONFIG_FILE = "model.lora_config.npy"
META_FILE = "phlora_trtllm.json"
NP_DTYPES: dict[str, Any] = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
    if dtype not in NP_DTYPES:
        raise OptionError("unknown dtype", where="--dtype", expected=", ".join(NP_DTYPES), found=repr(dtype))
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
    rows: list[torch.Tensor] = []
    meta_rows: list[dict[str, Any]] = []
    config_rows: list[list[int]] = []
    for (layer, module_id), members in sorted(groups.items()):
        members.sort()
        spec = members[0][2]
        ws = [adapter.modules[p] for _, p, _ in members]
        rank = max(w.rank for w in ws)
        in_dim, out_dim = ws[0].a.shape[1], ws[0].b.shape[0]
        a_parts, b_parts = [], []
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
            a_parts.append(a.reshape(-1))
            b_parts.append(b.reshape(-1))
        rows.append(torch.cat(a_parts + b_parts))
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
    width = max(r.numel() for r in rows)
    weights = torch.zeros(1, len(rows), width)
    for i, r in enumerate(rows):
        weights[0, i, : r.numel()] = r
    np_weights = _to_numpy(weights.to(_TORCH_DTYPES[dtype]), dtype)
    return TrtllmLora(
        weights=np_weights, config=np.asarray([config_rows], dtype=np.int32), rows=tuple(meta_rows), dtype=dtype, tp=tp
    )


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


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
    if weights.dtype == np.dtype("V2"):
        weights = weights.view(
            ml_dtypes.bfloat16 if (dtype or meta.get("dtype", "bfloat16")) == "bfloat16" else np.float16
        )
    problems: list[PhloraError] = []
    if weights.ndim != 3 or weights.shape[0] != 1:
        problems.append(
            InputError(
                "lora_weights has the wrong shape",
                where=str(folder / WEIGHTS_FILE),
                expected="[1, N, D]",
                found=str(list(weights.shape)),
            )
        )
    if config.ndim != 3 or config.shape[0] != 1 or config.shape[2] not in (3, 4):
        problems.append(
            InputError(
                "lora_config has the wrong shape",
                where=str(folder / CONFIG_FILE),
                expected="[1, N, 3]",
                found=str(list(config.shape)),
            )
        )
    elif weights.ndim == 3 and weights.shape[1] != config.shape[1]:
        problems.append(
            InputError(
                "Expected dim1 lora_weights and lora_keys to have the same size",
                where=str(folder),
                expected=f"N = {config.shape[1]} rows in both",
                found=f"{weights.shape[1]} weight rows",
            )
        )
    if config.dtype != np.int32:
        problems.append(
            InputError("lora_config must be int32", where=str(folder / CONFIG_FILE), found=str(config.dtype))
        )
    names = {np.dtype(np.float16): "float16", np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float32): "float32"}
    if weights.dtype not in names:
        problems.append(
            InputError(
                "lora_weights dtype is not an engine dtype",
                where=str(folder / WEIGHTS_FILE),
                expected="float16, bfloat16 or float32",
                found=str(weights.dtype),
            )
        )
    raise_all(problems, summary=f"{folder} is not a valid TensorRT-LLM LoRA")
    return TrtllmLora(
        weights=weights,
        config=config,
        rows=tuple(meta.get("rows", ())),
        dtype=names[weights.dtype],
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
    weights = _to_torch(lora.weights)[0].float()
    modules: dict[str, LoraWeights] = {}
    for i, meta in enumerate(lora.rows):
        module_id, _layer, rank = (int(x) for x in lora.config[0, i, :3])
        experts = len(meta["modules"])
        in_dim, out_dim = int(meta["in"]), int(meta["out"])
        row = weights[i]
        a_all = row[: experts * rank * in_dim].reshape(experts, rank, in_dim)
        b_all = row[experts * rank * in_dim : experts * rank * (in_dim + out_dim)].reshape(experts, out_dim, rank)
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
                "Expected lora weights to be the same data type as base model",
                where=f"{where} dtype",
                expected=str(engine_dtype),
                found=lora.dtype,
                fix=f"export with --dtype {engine_dtype}",
            )
        )
    layers = pretrained.get("num_hidden_layers")
    max_rank = lora_cfg.get("max_lora_rank")
    targets = set(lora_cfg.get("lora_target_modules") or [])
    for i in range(lora.num_rows):
        module_id, layer, rank = (int(x) for x in lora.config[0, i, :3])
        name = TRTLLM_MODULES[module_id] if 0 <= module_id < len(TRTLLM_MODULES) else f"id {module_id}"
        if layers is not None and not 0 <= layer < layers:
            problems.append(
                InputError(
                    "Expected layerId to be in the range [0, numModelLayers)",
                    where=f"row {i} ({name})",
                    expected=f"0 ≤ layer < {layers}",
                    found=str(layer),
                )
            )
        if targets and name not in targets:
            problems.append(
                InputError(
                    f"lora module {name} not enabled for this model",
                    where=f"row {i}",
                    expected=f"one of {sorted(targets)}",
                    found=name,
                    fix="rebuild the engine with this module in --lora_target_modules",
                )
            )
        if max_rank is not None and rank > max_rank:
            problems.append(
                InputError(
                    f"Invalid low_rank ({rank})",
                    where=f"row {i} ({name}, layer {layer})",
                    expected=f"rank ≤ max_lora_rank {max_rank}",
                    found=str(rank),
                    fix="prune the adapter (`phlora-nim prune --rank`) or rebuild the engine",
                )
            )
    raise_all(problems, summary=f"the engine {where} would reject this adapter")
