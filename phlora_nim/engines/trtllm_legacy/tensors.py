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
Reading and writing the files (numpy only, what the router needs) is in ``trtllm_files``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.architecture import ArchitectureMap, builtin_maps, find_map
from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS, TRTLLM_MODULES
from phlora_nim.core.dtypes import parse_dtype
from phlora_nim.core.errors import InputError, OptionError, PhloraError, raise_all
from phlora_nim.engines.trtllm_legacy.contract import (
    CONFIG_FILE,
    DTYPE_MISMATCH,
    META_FILE,
    MOE_SPLIT_MODULES,
    QKV,
    WEIGHTS_FILE,
    EngineSpec,
    decode_row,
    encode_row,
    engine_spec,
    hf_runtime_dims,
    module_name,
    pack_rows,
    row_length,
    row_problems,
)
from phlora_nim.engines.trtllm_legacy.files import TrtllmLora, TrtllmRow, load_trtllm, save_trtllm

log = logging.getLogger("phlora_nim.converters.trtllm")

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "TRTLLM_MODULES",
    "WEIGHTS_FILE",
    "TrtllmLora",
    "TrtllmRow",
    "adapter_to_trtllm",
    "check_engine",
    "load_trtllm",
    "save_trtllm",
    "trtllm_to_adapter",
]


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


def _fused_splits(module: str, config: dict[str, Any] | None, out_dim: int) -> list[int] | None:
    """Row blocks of a fused module's B, in TensorRT-LLM order (after the gate/up swap)."""
    if module == "mlp_gate_up":
        return [out_dim // 2, out_dim // 2]
    if module == "attn_qkv":
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


def _energy(w: LoraWeights, *, use_rslora: bool) -> float:
    """‖scale·B·A‖²_F in float64, through the r×r Gram matrices (never the dense product)."""
    a, b = w.a.double(), w.b.double()
    return float(w.scale(use_rslora=use_rslora) ** 2 * torch.trace((b.T @ b) @ (a @ a.T)))


def _misread_dense(adapter: LoraAdapter, amap: ArchitectureMap) -> list[str]:
    """o_proj modules the runtime would read wrongly: attn_dense is ``hidden × hidden`` there.

    ``LoraModule::createLoraModules`` sizes attn_dense A as ``[r, hidden]``; where the model's
    o_proj takes num_heads × head_dim ≠ hidden inputs (Gemma, Gemma 2, some Qwen3), the cache
    slices the row at ``r·hidden`` and applies a wrong delta with no error.
    """
    found = []
    for path, w in adapter.modules.items():
        hit = amap.match(path)
        if hit is not None and hit[0].trtllm == "attn_dense" and w.a.shape[1] != w.b.shape[0]:
            found.append(path)
    return sorted(found)


def _drop_misread_dense(adapter: LoraAdapter, amap: ArchitectureMap, *, strict: bool) -> tuple[list[str], float]:
    """The o_proj paths to leave out and the share of the adapter's update energy they carry."""
    paths = _misread_dense(adapter, amap)
    if not paths:
        return [], 0.0
    total = sum(_energy(w, use_rslora=adapter.use_rslora) for w in adapter.modules.values()) or 1.0
    lost = sum(_energy(adapter.modules[p], use_rslora=adapter.use_rslora) for p in paths)
    w0 = adapter.modules[paths[0]]
    hidden, width = w0.b.shape[0], w0.a.shape[1]
    problem = (
        f"TensorRT-LLM reads attn_dense (o_proj) LoRA as A [rank, hidden_size={hidden}] "
        f"(LoraModule::createLoraModules), but this model's o_proj takes num_heads × head_dim = {width} inputs: "
        f"its rows would apply a wrong delta without any error"
    )
    if strict:
        raise OptionError(
            problem,
            where=paths[0] + (f" and {len(paths) - 1} more" if len(paths) > 1 else ""),
            expected="o_proj input width = hidden_size",
            found=f"{width} ≠ {hidden}",
            fix="drop --strict to leave o_proj out (its update energy is reported), serve this adapter "
            "through PEFT on vLLM, or extract without o_proj (--target-modules)",
        )
    share = lost / total
    log.warning(
        "%s. Left out o_proj in %d layers: the adapter loses %.2f%% of its update energy (‖ΔW‖²).",
        problem,
        len(paths),
        100 * share,
    )
    return paths, share


RowKey = tuple[int, int]  # (layer, TensorRT-LLM module id): one row of lora_weights


@dataclass(frozen=True, order=True)
class RowMember:
    """One adapter module's share of a row (members sort by expert, then path)."""

    expert: int  # MoE expert index (0 elsewhere)
    path: str  # the adapter's module path
    part: int  # which of ``parts`` even row blocks of the module's B this row takes
    parts: int  # how many rows the module is written as (2 for Phi-3's gate_up_proj, else 1)


@dataclass(frozen=True)
class LaidOutRow:
    """One row ready to pack: float32 values, its ``lora_config`` entry and its sidecar description."""

    values: np.ndarray
    module_id: int
    layer: int
    rank: int
    meta: TrtllmRow


def expert_rows_at_tp(
    modules: Iterable[str], tp: int, *, where: str, setting: str, error: type[PhloraError]
) -> PhloraError | None:
    """The error for expert (MoE) rows at tensor parallelism > 1, or None.

    ``LoraCache::copyToPages`` splits every row by its module's TP split dim with no notion of
    experts: a rank would get whole experts' blocks instead of every expert's slice (correct at TP 1).
    """
    experts = sorted(set(modules) & set(MOE_SPLIT_MODULES))
    if tp <= 1 or not experts:
        return None
    return error(
        "TensorRT-LLM cannot split expert (MoE) LoRA rows over tensor-parallel ranks",
        where=where,
        expected=f"{setting} 1 for adapters with expert modules",
        found=f"{setting} {tp} with {', '.join(experts)} rows",
        fix="serve MoE adapters from a tp_size 1 engine, or extract attention-only adapters (--target-modules)",
    )


def _check_layout_request(adapter: LoraAdapter, dtype: str, tp: int) -> None:
    parse_dtype(dtype, "dtype of the TensorRT-LLM weights")
    if tp < 1:
        raise OptionError("tensor parallelism must be ≥ 1", where="--tp", found=str(tp))
    if adapter.modules_to_save or adapter.lora_biases:
        raise InputError(
            "the adapter carries full tensors (modules_to_save or bias deltas) TensorRT-LLM cannot apply",
            where=", ".join(sorted(adapter.modules_to_save)[:3] + sorted(adapter.lora_biases)[:3]),
            expected="LoRA factors of linear modules only",
            fix="re-extract with --extra drop (the default)",
        )


def _group_rows(adapter: LoraAdapter, amap: ArchitectureMap, left_out: set[str]) -> dict[RowKey, list[RowMember]]:
    """Which adapter modules go into which row; every module the runtime has no row for is reported."""
    groups: dict[RowKey, list[RowMember]] = {}
    problems: list[PhloraError] = []
    for path in sorted(adapter.modules):
        hit = amap.match(path)
        if hit is None or not hit[0].trtllm_rows or hit[1] is None:
            problems.append(
                InputError(
                    "module has no TensorRT-LLM LoRA module",
                    where=path,
                    expected=f"a {amap.family} module with a trtllm entry",
                    fix="drop it",
                )
            )
            continue
        if path in left_out:
            continue
        spec, layer = hit
        m = spec.pattern.fullmatch(path)
        expert = int(m.groupdict()["expert"]) if m is not None and m.groupdict().get("expert") else 0
        parts = spec.trtllm_rows
        for k, module in enumerate(parts):
            member = RowMember(expert=expert, path=path, part=k, parts=len(parts))
            groups.setdefault((layer, TRTLLM_MODULE_IDS[module]), []).append(member)
    raise_all(problems, summary="cannot lay out the adapter for TensorRT-LLM")
    if not groups:
        raise InputError(
            "nothing of the adapter is left for TensorRT-LLM",
            where=", ".join(sorted(adapter.modules)[:3]),
            expected="at least one module the runtime applies correctly",
            fix="serve this adapter through PEFT (vLLM)",
        )
    return {key: sorted(members) for key, members in groups.items()}


def _tp_splits(module: str, config: dict[str, Any] | None, out_dim: int, tp: int, *, where: str) -> list[int] | None:
    """:func:`_fused_splits`, checked to interleave over ``tp`` ranks where it has to."""
    splits = _fused_splits(module, config, out_dim)
    if tp > 1 and module in ("attn_qkv", "mlp_gate_up"):
        if splits is None:
            raise OptionError(
                "fused qkv_proj needs the model config to interleave for --tp",
                where="--tp",
                fix="pass --config with the base model's config.json",
            )
        if any(s % tp for s in splits):
            raise OptionError(
                "fused module rows do not split evenly over tensor-parallel ranks",
                where=where,
                expected=f"blocks {splits} divisible by {tp}",
                found=str(tp),
            )
    return splits


def _lay_out_row(
    adapter: LoraAdapter, key: RowKey, members: list[RowMember], *, config: dict[str, Any] | None, tp: int
) -> LaidOutRow:
    """Encode one row: every member zero-padded to the row's rank, its scale folded into B."""
    layer, module_id = key
    module = TRTLLM_MODULES[module_id]
    ws = [adapter.modules[m.path] for m in members]
    rank = max(w.rank for w in ws)
    parts = members[0].parts
    in_dim, out_dim = ws[0].a.shape[1], ws[0].b.shape[0] // parts
    splits = _tp_splits(module, config, out_dim, tp, where=members[0].path)
    pairs = []
    for member, w in zip(members, ws, strict=True):
        # Heterogeneous expert ranks: zero-pad to the row's rank (the product is unchanged).
        a = torch.zeros(rank, in_dim)
        b = torch.zeros(out_dim, rank)
        a[: w.rank] = w.a.float()
        b[:, : w.rank] = w.b.float().chunk(parts, dim=0)[member.part] * w.scale(use_rslora=adapter.use_rslora)
        if module == "mlp_gate_up":
            b = _swap_halves(b)
        if tp > 1 and splits is not None:
            b = interleave_for_tp(b, splits, tp)
        pairs.append((a.numpy(), b.numpy()))
    meta = TrtllmRow(
        modules=tuple(m.path for m in members),
        in_dim=in_dim,
        out_dim=out_dim,
        trtllm=module,
        splits=tuple(splits) if splits is not None else None,
        part=(members[0].part, parts) if parts > 1 else None,
    )
    return LaidOutRow(values=encode_row(pairs), module_id=module_id, layer=layer, rank=rank, meta=meta)


def _zero_qkv_rows(
    groups: dict[RowKey, list[RowMember]], adapter: LoraAdapter, config: dict[str, Any] | None
) -> list[LaidOutRow]:
    """Rank-1 zero rows for q/k/v modules missing beside present ones.

    TensorRT-LLM's attention runs q/k/v LoRA as one plugin call with all three or none
    (``Attention.forward`` asserts it); its HF loader fills the missing ones with zeros
    (``LoraManager.load_from_hf``). Rank 1 zeros: the cheapest row the runtime takes.
    """
    dims = hf_runtime_dims(config) if config and config.get("hidden_size") else {}
    by_layer: dict[int, dict[str, int]] = {}
    for (layer, module_id), members in groups.items():
        name = TRTLLM_MODULES[module_id]
        if name in QKV:
            by_layer.setdefault(layer, {})[name] = adapter.modules[members[0].path].a.shape[1]
    zeros = []
    for layer, present in sorted(by_layer.items()):
        hidden = next(iter(present.values()))
        for name in QKV:
            if name not in present:
                in_dim, out_dim = dims.get(name, (hidden, hidden))
                zeros.append(
                    LaidOutRow(
                        values=np.zeros(row_length(1, in_dim, out_dim), dtype=np.float32),
                        module_id=TRTLLM_MODULE_IDS[name],
                        layer=layer,
                        rank=1,
                        meta=TrtllmRow(modules=(), in_dim=in_dim, out_dim=out_dim, trtllm=name),
                    )
                )
    return zeros


def adapter_to_trtllm(
    adapter: LoraAdapter,
    *,
    config: dict[str, Any] | None = None,
    architecture: ArchitectureMap | None = None,
    dtype: str = "float16",
    tp: int = 1,
    strict: bool = False,
) -> TrtllmLora:
    """Lay a LoRA adapter out as TensorRT-LLM's ``lora_weights`` / ``lora_config`` tensors.

    Writes only what the engine computes correctly: o_proj is left out (with a warning giving the
    energy lost) where its input width is not the hidden size, Phi-3's ``gate_up_proj`` becomes the
    ``mlp_h_to_4h`` + ``mlp_gate`` pair, and q/k/v missing beside present ones get zero rows.

    Args:
        adapter: any LoRA adapter (scales are folded into B).
        config: the base model's ``config.json`` (needed for fused ``qkv_proj`` at ``tp > 1``).
        architecture: the family's map, as the extraction plan found it (default: found from
            ``config``, else from the module paths).
        dtype: engine dtype: ``float16``, ``bfloat16`` or ``float32``.
        tp: tensor parallelism of the engine.
        strict: refuse, rather than leave out, modules the runtime would read wrongly.

    Raises:
        OptionError: bad dtype/tp, fused rows that do not split evenly over ``tp``, expert rows at
            ``tp > 1``, or (``strict``) an o_proj the runtime misreads.
        InputError: modules with no TensorRT-LLM equivalent.

    Example:
        >>> lora = adapter_to_trtllm(adapter, config=config, dtype="float16")  # doctest: +SKIP
        >>> save_trtllm(lora, folder)  # doctest: +SKIP
    """
    _check_layout_request(adapter, dtype, tp)
    amap = architecture or _infer_map(sorted(adapter.modules), config)
    dropped, dropped_energy = _drop_misread_dense(adapter, amap, strict=strict)
    groups = _group_rows(adapter, amap, set(dropped))
    moe = expert_rows_at_tp(
        (TRTLLM_MODULES[mid] for _, mid in groups), tp, where="--tp", setting="--tp", error=OptionError
    )
    if moe is not None:
        raise moe
    rows = [_lay_out_row(adapter, key, groups[key], config=config, tp=tp) for key in sorted(groups)]
    rows += _zero_qkv_rows(groups, adapter, config)
    rows.sort(key=lambda r: (r.layer, r.module_id))
    return TrtllmLora(
        weights=pack_rows([r.values for r in rows], dtype),
        config=np.asarray([[[r.module_id, r.layer, r.rank] for r in rows]], dtype=np.int32),
        rows=tuple(r.meta for r in rows),
        dtype=dtype,
        tp=tp,
        dropped=tuple(dropped),
        dropped_energy=dropped_energy,
    )


def trtllm_to_adapter(lora: TrtllmLora, *, source: str = "lora") -> LoraAdapter:
    """Turn the npy pair back into a PEFT-layout adapter (alpha = r: scales are already in B).

    Needs the sidecar rows (module paths and dims), written by :func:`save_trtllm`. Zero rows
    added for q/k/v are skipped; a module written as several rows (Phi-3's gate_up_proj) is put
    back together.
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
    parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = {}
    for i, meta in enumerate(lora.rows):
        rank = int(lora.config[0, i, 2])
        if not meta.modules:
            continue
        a_all, b_all = decode_row(
            torch.from_numpy(weights[i]),
            rank=rank,
            in_dim=meta.in_dim,
            out_dim=meta.out_dim,
            experts=len(meta.modules),
        )
        for e, path in enumerate(meta.modules):
            b = b_all[e]
            if lora.tp > 1 and meta.splits:
                b = deinterleave_for_tp(b, list(meta.splits), lora.tp)
            if meta.trtllm == "mlp_gate_up":
                b = _swap_halves(b)
            if meta.part is not None:
                k, n = meta.part
                parts.setdefault(path, {})[k] = (a_all[e].clone(), b.clone(), n)
                continue
            modules[path] = LoraWeights(a=a_all[e].clone(), b=b.clone(), alpha=float(rank))
    modules.update(_joined_parts(parts, source=source))
    return LoraAdapter(modules=modules)


def _joined_parts(
    parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, int]]], *, source: str
) -> dict[str, LoraWeights]:
    """Modules written as several rows, put back together (B's row blocks in part order)."""
    modules = {}
    for path, pieces in parts.items():
        n = next(iter(pieces.values()))[2]
        if sorted(pieces) != list(range(n)):
            raise InputError(
                "a module written as several rows is missing some",
                where=f"{source} {path}",
                expected=f"{n} rows",
                found=f"parts {sorted(pieces)}",
                fix="export the adapter again",
            )
        a = pieces[0][0]
        b = torch.cat([pieces[k][1] for k in range(n)], dim=0)
        modules[path] = LoraWeights(a=a, b=b, alpha=float(a.shape[0]))
    return modules


def check_engine(lora: TrtllmLora, engine_config: dict[str, Any], *, where: str) -> None:
    """Refuse what a TensorRT-LLM engine would reject, or silently mishandle: dtype, tensor
    parallelism, layers, modules, rank, row length, dims, and expert rows at TP > 1.

    The runtime does not check prefetched adapters (``PeftCacheManager::prefetchLoraWeights``
    skips ``loraValidateRequestTensors``): one it cannot take stops the server at start, so every
    adapter written for ``lora_prefetch_dir`` goes through here first.

    Args:
        lora: the laid-out adapter.
        engine_config: the engine's ``config.json``.
        where: the engine config path, for messages.

    Raises:
        InputError: every problem found, in one error.
    """
    spec = engine_spec(engine_config)
    if not spec.lora_plugin:
        raise InputError(
            "the engine was built without LoRA support",
            where=f"{where} plugin_config.lora_plugin",
            expected="a dtype such as float16",
            found=repr(spec.lora_plugin),
            fix="rebuild with trtllm-build --lora_plugin <dtype> (see `phlora-nim engine-plan`)",
        )
    problems = _build_problems(lora, spec, where=where)
    moe = expert_rows_at_tp(
        (TRTLLM_MODULES[int(m)] for m in lora.config[0, :, 0]),
        spec.tp,
        where=f"{where} pretrained_config.mapping.tp_size",
        setting="tp_size",
        error=InputError,
    )
    if moe is not None:
        problems.append(moe)
    problems += _row_problems(lora, spec)
    problems += _dims_problems(lora, spec)
    raise_all(problems, summary=f"the engine {where} would reject this adapter")


def _build_problems(lora: TrtllmLora, spec: EngineSpec, *, where: str) -> list[PhloraError]:
    """Dtype, tensor parallelism and q/k/v targets of the engine's build against the adapter's layout."""
    problems: list[PhloraError] = []
    # The runtime compares with the model dtype; a LoRA plugin built for another dtype cannot take it either.
    wanted = sorted({d for d in (spec.dtype, spec.lora_plugin) if d and d != "auto"})
    if any(d != lora.dtype for d in wanted):
        problems.append(
            InputError(
                DTYPE_MISMATCH,
                where=f"{where} pretrained_config.dtype / plugin_config.lora_plugin",
                expected=" and ".join(wanted),
                found=lora.dtype,
                fix=f"export with --dtype {spec.dtype or wanted[0]}",
            )
        )
    if spec.tp != lora.tp:
        problems.append(
            InputError(
                "the adapter is laid out for another tensor parallelism than the engine's",
                where=f"{where} pretrained_config.mapping.tp_size",
                expected=f"--tp {spec.tp}",
                found=f"--tp {lora.tp}",
                fix=f"convert or export with --tp {spec.tp}",
            )
        )
    built_qkv = [m for m in QKV if m in spec.targets]
    if built_qkv and len(built_qkv) < len(QKV):
        problems.append(
            InputError(
                "the engine lists only some of attn_q/attn_k/attn_v: TensorRT-LLM's attention needs all three or none",
                where=f"{where} build_config.lora_config.lora_target_modules",
                expected=", ".join(QKV),
                found=", ".join(built_qkv),
                fix="rebuild with the modules `phlora-nim engine-plan` prints",
            )
        )
    return problems


def _row_problems(lora: TrtllmLora, spec: EngineSpec) -> list[PhloraError]:
    """Layers, modules, ranks and row lengths the engine's LoRA cache would refuse."""

    def dims(module_id: int, _layer: int) -> tuple[int, int] | None:
        return spec.module_dims(module_name(module_id)) if module_id < len(TRTLLM_MODULES) else None

    found = row_problems(
        lora.config[0], lora.weights.shape[2], dims=dims, num_layers=spec.num_layers, max_rank=spec.max_rank
    )
    return [
        InputError(
            p.message,
            where=f"row {p.row} ({p.module}, layer {p.layer})",
            fix="prune the adapter (`phlora-nim prune --rank`), or rebuild the engine with this module in "
            "--lora_target_modules (see `phlora-nim engine-plan`)",
        )
        for p in found
    ]


def _dims_problems(lora: TrtllmLora, spec: EngineSpec) -> list[PhloraError]:
    """Rows laid out for other dims than the engine's modules read (a wrong delta, no runtime error)."""
    problems: list[PhloraError] = []
    for i, meta in enumerate(lora.rows):
        engine_dims = spec.dims.get(meta.trtllm)
        if not engine_dims or not meta.modules:  # unknown dims, or a zero row: only its length matters
            continue
        factor = len(meta.modules) if meta.trtllm in MOE_SPLIT_MODULES else 1
        laid_out = (meta.in_dim * factor, meta.out_dim * factor)
        if laid_out != engine_dims:
            problems.append(
                InputError(
                    "the row is laid out for other dims than the engine reads: it would apply a wrong delta",
                    where=f"row {i} ({meta.trtllm}, {meta.modules[0]})",
                    expected=f"[in, out] = {list(engine_dims)} (LoraModule::createLoraModules)",
                    found=str(list(laid_out)),
                    fix="convert against this engine's base model",
                )
            )
    return problems
