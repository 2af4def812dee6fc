"""TensorRT-LLM's LoRA contract, in one place: file names, engine dtypes, the row layout, the checks
the runtime makes and the words it makes them with.

Everything that writes, reads, checks or serves ``lora_weights`` / ``lora_config`` imports from
here: the converters (``formats/trtllm.py``), the CPU reference engine (``triton/lora_cache.py``),
the router's weight store and the Triton config writer. Importing it costs numpy only (torch is
imported where a torch dtype is asked for), so stand-in models can use the message texts too.

Layout: ``lora_weights`` ``[1, N, D]`` in the engine dtype; row i is ``A.flatten() ++ B.flatten()``
(PEFT layout, A ``[r, in]``, B ``[out, r]``; MoE rows stack the experts: A ``[E, r, in]`` then B
``[E, out, r]``) zero-padded to ``D``. ``lora_config`` ``[1, N, 3]`` int32, row i =
``[module_id, layer_idx, rank]``. Upstream: ``LoraCache::copyToPages`` (cpp/tensorrt_llm/runtime/
loraCache.cpp) reads A as ``[rank, inDim]`` then B as ``[outDim, rank]`` from offset ``rank·inDim``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phlora_nim.converters.trtllm_modules import TRTLLM_MODULES
from phlora_nim.core.dtypes import DTYPES, dtype_name_of

WEIGHTS_FILE = "model.lora_weights.npy"
CONFIG_FILE = "model.lora_config.npy"
META_FILE = "phlora_trtllm.json"  # our sidecar (module paths, dims, tp); TensorRT-LLM ignores it


# --- the runtime's words ----------------------------------------------------------------------
# Substrings a client or router matches on, and the messages of loraValidateRequestTensors
# (cpp/tensorrt_llm/runtime/loraUtils.cpp), verbatim up to the details we append.

MISS = "not found in cache"
# LoraCache::claimPagesWithEvict (cpp/tensorrt_llm/runtime/loraCache.cpp) throws LoraCacheFullException
# "Cache is full. There are no done tasks to evict"; PeftCacheManager::addRequestPeft
# (cpp/tensorrt_llm/batch_manager/peftCacheManager.cpp) rethrows it as cache_full_message below.
FULL = "Cache is full"
# When the evicted tasks free fewer pages than needed, claimPagesWithEvict's second claimPages
# returns nullopt and TLLM_CHECK(pageIds.has_value()) fails (common/assert.h → throwRuntimeError,
# "Assertion failed: <expression>"): the same back-pressure as a full cache, in other words.
PAGES_NOT_CLAIMED = "Assertion failed: pageIds.has_value()"
CACHE_FULL_TEXTS = (FULL, PAGES_NOT_CLAIMED)
DTYPE_MISMATCH = "Expected lora weights to be the same data type as base model"
LAYER_OUT_OF_RANGE = "Expected layerId to be in the range [0, numModelLayers)"
ROWS_MISMATCH = "Expected dim1 lora_weights and lora_keys to have the same size"


class LoraRequestError(Exception):
    """A per-request LoRA failure; the message is TensorRT-LLM's text for the same failure."""


def not_found_message(task_id: int) -> str:
    return f"LoRA task {task_id} {MISS}. Please send LoRA weights with request"


def cache_full_message(task_id: int) -> str:
    """``PeftCacheManager::addRequestPeft`` rethrowing LoraCacheFullException (no done task to evict)."""
    return f"PEFT {FULL}. Could not store taskId={task_id}"


def pages_exhausted_message(task_id: int) -> str:
    """``PeftCacheManager::addRequestPeft`` wrapping the failed claim (see PAGES_NOT_CLAIMED) as it
    wraps every put error: ``Error storing task=<id> in PEFT cache -- <what()>``."""
    return f"Error storing task={task_id} in PEFT cache -- [TensorRT-LLM][ERROR] {PAGES_NOT_CLAIMED} (loraCache.cpp)"


def is_cache_full(text: str) -> bool:
    """Whether a runtime error text means the LoRA cache had no room (retry elsewhere, or later)."""
    return any(marker in text for marker in CACHE_FULL_TEXTS)


def dtype_mismatch_message(expected: str, found: object) -> str:
    return f"{DTYPE_MISMATCH} ({expected}, got {found})"


def layer_message(layer: int, num_layers: int) -> str:
    return f"{LAYER_OUT_OF_RANGE} (layer {layer}, {num_layers} layers)"


ADAPTER_SIZE_NOT_POSITIVE = "Expected adapterSize to be > 0"


def rank_message(rank: int, max_rank: int) -> str:
    # loraValidateRequestTensors (cpp/tensorrt_llm/runtime/loraUtils.cpp), verbatim.
    return f"Invalid low_rank ({rank}). low_rank must be smaller than mMaxLowRank ({max_rank})"


def module_message(module: str) -> str:
    return f"lora module {module} not enabled for this model"


def too_few_values_message(module: str, layer: int, need: int, found: int) -> str:
    return f"lora_weights has to few values for {module} (layer {layer}): expected {need}, found {found}"  # sic


def module_name(module_id: int) -> str:
    """The module's name, or ``id N`` for an id TensorRT-LLM does not define."""
    return TRTLLM_MODULES[module_id] if 0 <= module_id < len(TRTLLM_MODULES) else f"id {module_id}"


# --- the row codec ----------------------------------------------------------------------------


def row_length(rank: int, in_dim: int, out_dim: int, *, experts: int = 1) -> int:
    """Values one row needs: ``rank · (in + out)`` per expert (``flattenedInOutSize`` upstream)."""
    return experts * rank * (in_dim + out_dim)


def encode_row(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One row from the (A ``[r, in]``, B ``[out, r]``) pair of every expert (one pair if not MoE).

    All A's first, then all B's (A ``[E, r, in]`` ++ B ``[E, out, r]``), as float32.
    """
    pairs = list(pairs)
    parts = [np.asarray(a, dtype=np.float32).reshape(-1) for a, _ in pairs]
    parts += [np.asarray(b, dtype=np.float32).reshape(-1) for _, b in pairs]
    return np.concatenate(parts)


def decode_row(row: Any, *, rank: int, in_dim: int, out_dim: int, experts: int = 1) -> tuple[Any, Any]:
    """A ``[E, r, in]`` and B ``[E, out, r]`` read from a row (numpy array or torch tensor) by dims.

    The dims are the reader's, not the writer's: a row laid out for other dims is read wrongly,
    exactly as the runtime's cache reads it.
    """
    a_len = experts * rank * in_dim
    a = row[:a_len].reshape(experts, rank, in_dim)
    b = row[a_len : a_len + experts * out_dim * rank].reshape(experts, out_dim, rank)
    return a, b


def pack_rows(rows: list[np.ndarray], dtype: str) -> np.ndarray:
    """``lora_weights`` ``[1, N, D]`` in the engine dtype: rows zero-padded to the longest."""
    width = max((r.size for r in rows), default=0)
    out = np.zeros((1, len(rows), width), dtype=np.float32)
    for i, r in enumerate(rows):
        out[0, i, : r.size] = r
    return out.astype(DTYPES[dtype].numpy)


# --- checks -----------------------------------------------------------------------------------


def tensor_problems(weights: np.ndarray, config: np.ndarray) -> list[str]:
    """What is wrong with the shapes and types of a ``lora_weights`` / ``lora_config`` pair.

    Shapes are ``[1, N, D]`` and ``[1, N, 3]`` (4 columns with DoRA); config int32; the weights an
    engine dtype. Messages are the runtime's where it has one.
    """
    problems = []
    if weights.ndim != 3 or weights.shape[0] != 1:
        problems.append(f"lora_weights has the wrong shape: expected [1, N, D], found {list(weights.shape)}")
    if config.ndim != 3 or config.shape[0] != 1 or config.shape[2] not in (3, 4):
        problems.append(f"lora_config has the wrong shape: expected [1, N, 3], found {list(config.shape)}")
    elif weights.ndim == 3 and weights.shape[1] != config.shape[1]:
        problems.append(ROWS_MISMATCH)
    if config.dtype != np.int32:
        problems.append(f"lora_config must be int32, found {config.dtype}")
    if dtype_name_of(weights) is None:
        problems.append(f"lora_weights dtype is not an engine dtype (float16, bfloat16, float32): {weights.dtype}")
    return problems


@dataclass(frozen=True)
class RowProblem:
    """A row the runtime would reject, with its message."""

    row: int
    module: str
    layer: int
    message: str


def row_problems(
    config_rows: np.ndarray,
    width: int,
    *,
    dims: Callable[[int, int], tuple[int, int] | None],
    num_layers: int | None,
    max_rank: int | None,
) -> list[RowProblem]:
    """Every problem ``loraValidateRequestTensors`` would reject a row for, in its order of checks
    (layer, rank > 0, module, length, rank ≤ ``max_lora_rank``); the runtime stops at the first.

    Args:
        config_rows: ``[N, 3|4]`` rows ``[module_id, layer, rank]``.
        width: D, the padded row width of the request (the runtime checks a row's need against D,
            not against the row's own length).
        dims: (module id, layer) → the engine's (in, out) for that module, None when not built in.
        num_layers: the engine's decoder layers (None: unknown, not checked).
        max_rank: the engine's ``max_lora_rank`` (None: unknown).
    """
    found = []
    for i, row in enumerate(np.asarray(config_rows)):
        module_id, layer, rank = (int(x) for x in row[:3])
        name = module_name(module_id)
        shape = dims(module_id, layer)
        if num_layers is not None and not 0 <= layer < num_layers:
            found.append(RowProblem(i, name, layer, layer_message(layer, num_layers)))
        if max_rank is not None and rank <= 0:
            found.append(RowProblem(i, name, layer, f"{ADAPTER_SIZE_NOT_POSITIVE} (found {rank})"))
        if shape is None:
            found.append(RowProblem(i, name, layer, module_message(name)))
        elif rank > 0 and row_length(rank, *shape) > width:
            found.append(
                RowProblem(i, name, layer, too_few_values_message(name, layer, row_length(rank, *shape), width))
            )
        if max_rank is not None and rank > max_rank:
            found.append(RowProblem(i, name, layer, rank_message(rank, max_rank)))
    return found


# --- the engine's view of a model -------------------------------------------------------------


def runtime_module_dims(
    *,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    experts: int = 0,
) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA module as the runtime sizes it, whatever the checkpoint says.

    ``LoraModule::createLoraModules`` (cpp/tensorrt_llm/runtime/loraModule.cpp): attn_q/k/v out
    are nH·d / nKV·d (fixed in 0.17), but **attn_dense is ``hidden × hidden``** even where
    nH·d ≠ hidden (Gemma, Gemma 2, some Qwen3). MoE modules count all experts (``hidden·E``).
    """
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    dims = {
        "attn_qkv": (hidden, q_out + 2 * kv_out),
        "attn_q": (hidden, q_out),
        "attn_k": (hidden, kv_out),
        "attn_v": (hidden, kv_out),
        "attn_dense": (hidden, hidden),
        "mlp_h_to_4h": (hidden, intermediate),
        "mlp_gate": (hidden, intermediate),
        "mlp_4h_to_h": (intermediate, hidden),
        "mlp_gate_up": (hidden, 2 * intermediate),
        "mlp_router": (hidden, 1),
    }
    if experts:
        dims.update(
            moe_h_to_4h=(hidden * experts, intermediate * experts),
            moe_gate=(hidden * experts, intermediate * experts),
            moe_4h_to_h=(intermediate * experts, hidden * experts),
            moe_router=(hidden, experts),
        )
    return dims


def hf_runtime_dims(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """:func:`runtime_module_dims` for a Hugging Face ``config.json``."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return runtime_module_dims(
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(config.get("intermediate_size") or 0),
        experts=int(config.get("num_local_experts") or config.get("num_experts") or 0),
    )


QKV = ("attn_q", "attn_k", "attn_v")
MOE_SPLIT_MODULES = ("moe_h_to_4h", "moe_4h_to_h", "moe_gate")  # split per TP rank without knowing experts


@dataclass(frozen=True)
class EngineSpec:
    """What a built TensorRT-LLM engine accepts, read from its ``config.json``.

    Fields follow ``gptJsonConfig.cpp`` (``parseJson``, ``parseLora``): ``build_config.lora_config``
    (``max_lora_rank``, ``lora_target_modules``), ``build_config.plugin_config.lora_plugin``,
    ``pretrained_config`` (``dtype``, ``mapping.tp_size`` / ``pp_size``, dims); legacy engines
    (``version`` missing) keep them under ``builder_config`` and a top-level ``plugin_config``.
    ``paged_context_fmha`` is ``plugin_config.use_paged_context_fmha`` (``parsePluginConfig``
    → ``setPagedContextFMHA``): chunked context needs it.
    """

    lora_plugin: str | None
    dtype: str | None
    tp: int
    num_layers: int | None
    max_rank: int | None
    targets: tuple[str, ...]
    dims: dict[str, tuple[int, int]]
    # plugin_config.use_paged_context_fmha: chunked context needs it (ModelInstanceState logs
    # "requires building the model with use_paged_context_fmha"; the executor refuses it otherwise).
    paged_context_fmha: bool = False
    pp: int = 1
    max_batch_size: int | None = None

    def module_dims(self, name: str) -> tuple[int, int] | None:
        """The engine's (in, out) for a built-in module; None when not built in (or dims unknown)."""
        if self.targets and name not in self.targets:
            return None
        return self.dims.get(name, (0, 0))


def engine_spec(engine_config: dict[str, Any]) -> EngineSpec:
    """Read the LoRA-relevant fields of an engine ``config.json`` (new and legacy layouts)."""
    legacy = engine_config.get("builder_config") or {}
    build = engine_config.get("build_config") or {}
    pretrained = engine_config.get("pretrained_config") or {}
    lora_cfg = build.get("lora_config") or engine_config.get("lora_config") or legacy
    plugin = build.get("plugin_config") or engine_config.get("plugin_config") or {}
    mapping = pretrained.get("mapping") or {}
    tp = mapping.get("tp_size") or legacy.get("tensor_parallel") or 1
    lora_plugin = plugin.get("lora_plugin")
    dtype = pretrained.get("dtype") or legacy.get("precision")
    if lora_plugin and lora_plugin != "auto":
        dtype = dtype or lora_plugin
    dims: dict[str, tuple[int, int]] = {}
    hidden, heads = pretrained.get("hidden_size"), pretrained.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        moe = pretrained.get("moe") or {}
        dims = runtime_module_dims(
            hidden=hidden,
            heads=heads,
            kv_heads=int(pretrained.get("num_key_value_heads") or heads),
            head_dim=int(pretrained.get("head_size") or hidden // heads),
            intermediate=int(pretrained.get("intermediate_size") or 0),
            experts=int(moe.get("num_experts") or 0),
        )
    return EngineSpec(
        lora_plugin=lora_plugin,
        dtype=dtype,
        tp=int(tp),
        num_layers=pretrained.get("num_hidden_layers", legacy.get("num_layers")),
        max_rank=lora_cfg.get("max_lora_rank"),
        targets=tuple(lora_cfg.get("lora_target_modules") or ()),
        paged_context_fmha=bool(plugin.get("use_paged_context_fmha")),
        dims=dims,
        pp=int(mapping.get("pp_size") or legacy.get("pipeline_parallel") or 1),
        max_batch_size=build.get("max_batch_size", legacy.get("max_batch_size")),
    )


# --- the runtime's npy reader (lora_prefetch_dir) ---------------------------------------------

# cpp/tensorrt_llm/runtime/utils/numpyUtils.cpp, typeFromNumpyDesc: the only descrs it knows.
NPY_DESCRS = ("?", "u1", "i1", "i4", "i8", "f2", "f4")


def npy_type_message(descr: str) -> str:
    return f"numpy data type '{descr}' not supported"


def incompatible_dtypes_message(found: str, expected: str) -> str:
    """``BufferManager::copy`` when a prefetched adapter's dtype differs from the engine's."""
    return f"Incompatible data types: {found} != {expected}"


MAP_AT = "_Map_base::at"  # what std::unordered_map::at throws for a module the engine lacks (LoraCache::put)


def npy_descr(path: str | Path) -> str:
    """The ``descr`` of an npy file's header as written (``'<f2'``, ``'<V2'``, ``'|V2'`` …).

    Raises:
        ValueError: not an npy file.
    """
    with open(path, "rb") as f:
        major, _minor = np.lib.format.read_magic(f)
        size = int.from_bytes(f.read(2 if major == 1 else 4), "little")
        try:
            header = ast.literal_eval(f.read(size).decode("latin1"))
        except SyntaxError as exc:
            raise ValueError(f"unreadable npy header ({exc})") from None
    if not isinstance(header, dict) or "descr" not in header:
        raise ValueError("npy header without descr")
    return str(header["descr"])


def runtime_npy_type(descr: str) -> str:
    """The type the runtime's reader takes from a descr: one of :data:`NPY_DESCRS`.

    ``parseNpyHeader`` drops one leading ``<``, ``>`` or ``=`` (not ``|``) and
    ``typeFromNumpyDesc`` knows only :data:`NPY_DESCRS`: bfloat16 (``<V2`` from ml_dtypes,
    ``|V2`` from TensorRT-LLM's own writer) and 1-byte types written as ``|i1`` are refused.

    Raises:
        LoraRequestError: ``numpy data type '…' not supported``.
    """
    kind = descr[1:] if descr[:1] in ("<", ">", "=") else descr
    if kind not in NPY_DESCRS:
        raise LoraRequestError(npy_type_message(kind))
    return kind


def read_runtime_npy(path: Path) -> np.ndarray:
    """An npy file as the runtime's ``loadNpy`` reads it: refused where its reader refuses it.

    Raises:
        LoraRequestError: ``numpy data type '…' not supported``, or the file is unreadable.
    """
    try:
        runtime_npy_type(npy_descr(path))
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, IndexError) as exc:
        raise LoraRequestError(f"reading tensor failed ({path}: {exc})") from None
