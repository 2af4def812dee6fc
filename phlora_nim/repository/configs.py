"""Write the Triton model repository: the ``inflight_batcher_llm`` layout with LoRA passed through.

Models (as TensorRT-LLM's Triton backend ships them): ``preprocessing`` (tokenizer),
``tensorrt_llm`` (token-level model: the real TensorRT-LLM backend, or the CPU reference model with
the same contract), ``postprocessing`` (detokenizer) and an ``ensemble`` giving clients the text
interface, with ``lora_task_id`` / ``lora_weights`` / ``lora_config`` passed through to
``tensorrt_llm``.

Every config is built as Triton's own ``ModelConfig`` protobuf (shipped in tritonclient), written
as text, and parsed back before it replaces the old file, so what lands on disk is a config Triton
accepts. LoRA cache parameters are sized from the registered adapters.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from phlora_nim.core.atomic import atomic_write_text
from phlora_nim.core.dtypes import DTYPES, parse_dtype
from phlora_nim.core.errors import InputError, OptionError, OutputError
from phlora_nim.converters.trtllm_contract import EngineSpec, engine_spec
from phlora_nim.repository.layout import (
    ENSEMBLE_MODEL,
    LLM_MODEL,
    POSTPROCESSING_MODEL,
    PREFETCH_DIR,
    PRELOAD_DIR,
    PREPROCESSING_MODEL,
    SETTINGS_FILE,
    prefetch_dir,
)
from phlora_nim.repository.lora_cache_plan import (
    CacheRequest,
    LoraCachePlan,
    PlannedAdapter,
    engine_shape,
    plan_cache,
    read_rows,
)
from phlora_nim.repository.registry import RegistryState

BACKENDS = ("tensorrtllm", "reference")
# The TensorRT-LLM Triton backend release whose config.pbtxt names are written. v0.20.0 renamed
# random_seed → seed and min_length → min_tokens (tensorrtllm_backend commit c2e65b8, 2025-05-13; the
# templates moved to TensorRT-LLM's triton_backend/all_models/inflight_batcher_llm/ then).
TRTLLM_RELEASES = ("0.20", "0.19")
DEFAULT_TRTLLM_RELEASE = "0.20"
SEED_INPUT = {"0.20": "seed", "0.19": "random_seed"}
# The runtime's words when chunked context meets an engine without paged context FMHA
# (TrtGptModelInflightBatching's constructor).
CHUNKED_CONTEXT_NEEDS = (
    "Chunked context requires context FMHA, paged kv_cache and paged context FMHA all enabled at the same time."
)
# Engine dtype → Triton data type of lora_weights.
_MiB = 1 << 20
_DEFAULT_HOST_CACHE = 1 << 30  # TensorRT-LLM's default lora_cache_host_memory_bytes
# The thin model.py files copied into every repository (package data beside this module).
TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class RepositorySettings:
    """How a repository is generated; stored in ``phlora_repository.json`` so later runs agree.

    Args:
        backend: ``tensorrtllm`` (a real engine, GPU) or ``reference`` (CPU reference model).
        base: the base checkpoint folder (tokenizer; and the weights for ``reference``).
        dtype: the engine dtype; LoRA weights are sent and stored in it.
        engine_dir: ``tensorrtllm``: the engine folder as Triton will see it (``gpt_model_path``).
        tokenizer_dir: tokenizer folder as Triton will see it (default: ``base``).
        max_batch_size: Triton max batch size of every model.
        max_queue_delay_us: dynamic batching delay of the ``tensorrt_llm`` model.
        decoupled: stream tokens (``ModelStreamInfer``) instead of one response per request.
        max_lora_rank: the largest adapter rank the reference model accepts (engines fix theirs
            at build time: ``phlora-nim engine-plan``).
        lora_cache_bytes: host LoRA cache budget; 0 = sized from the registered adapters.
        served_path: where Triton will see this repository (``lora_prefetch_dir`` is set under it);
            default: this folder for ``reference``, ``/models`` for ``tensorrtllm``.
        llm_parameters: more ``tensorrt_llm`` model parameters, written as given.
        trtllm_version: the TensorRT-LLM Triton backend release whose input names are written
            (``0.20``: v0.20.0 and later, ``seed``; ``0.19``: earlier, ``random_seed``).
        lora_prefetch: set ``lora_prefetch_dir`` so the server loads adapters at start. Always
            off for bfloat16: the runtime's npy reader has no bfloat16 (``numpy data type 'V2' not
            supported`` stops the server), so adapters are sent by the router on first use instead.
        engine: ``tensorrtllm``: the engine's ``config.json`` (kept so later runs size the cache alike).
        prefetch_names: adapters preloaded first (``--prefetch``; only these when no limit is set).
        prefetch_limit: the most adapters preloaded (``--prefetch-limit``); None = all.
        prefetch_usage: request counts per adapter: the most used are preloaded first.
        lora_cache_spare: adapters of the largest kind the caches keep room for besides the
            preloaded ones (sent by the router on misses); None = ``max_batch_size``.
        gpu_free_memory_bytes: free GPU memory when the runtime allocates its LoRA cache (its log:
            ``Using N bytes for LoRA device cache`` at fraction F means N/F free); 0 = unknown.
    """

    backend: str = "reference"
    base: str = ""
    dtype: str = "float32"
    engine_dir: str | None = None
    tokenizer_dir: str | None = None
    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    decoupled: bool = False
    max_lora_rank: int = 64
    lora_cache_bytes: int = 0
    served_path: str | None = None
    llm_parameters: dict[str, str] = field(default_factory=dict)
    trtllm_version: str = DEFAULT_TRTLLM_RELEASE
    lora_prefetch: bool = True
    engine: dict[str, Any] = field(default_factory=dict)
    prefetch_names: tuple[str, ...] = ()
    prefetch_limit: int | None = None
    prefetch_usage: dict[str, float] = field(default_factory=dict)
    lora_cache_spare: int | None = None
    gpu_free_memory_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefetch_names", tuple(self.prefetch_names))
        for flag, value in (("--prefetch-limit", self.prefetch_limit), ("--lora-cache-spare", self.lora_cache_spare)):
            if value is not None and value < 0:
                raise OptionError("must be ≥ 0", where=flag, found=str(value))
        if self.trtllm_version not in TRTLLM_RELEASES:
            raise OptionError(
                "unknown TensorRT-LLM release for the Triton configs",
                where="--trtllm-version",
                expected=" or ".join(TRTLLM_RELEASES),
                found=repr(self.trtllm_version),
            )
        if not parse_dtype(self.dtype, "--engine-dtype").npy_readable:
            object.__setattr__(self, "lora_prefetch", False)
        if self.backend not in BACKENDS:
            raise OptionError(
                "unknown backend", where="--backend", expected=" or ".join(BACKENDS), found=repr(self.backend)
            )
        if self.max_batch_size < 1:
            raise OptionError("max batch size must be ≥ 1", where="--max-batch-size", found=str(self.max_batch_size))
        if self.max_lora_rank < 1:
            raise OptionError("max LoRA rank must be ≥ 1", where="--max-lora-rank", found=str(self.max_lora_rank))
        if self.lora_cache_bytes < 0:
            raise OptionError("LoRA cache size must be ≥ 0", where="--lora-cache-mb", found=str(self.lora_cache_bytes))
        if not self.base:
            raise OptionError("the base checkpoint is required", where="--base", fix="pass --base DIR")

    @property
    def tokenizer(self) -> str:
        return self.tokenizer_dir or self.base

    @property
    def engine_spec(self) -> EngineSpec | None:
        """The engine's LoRA facts (``tensorrtllm`` with an engine config), else None."""
        return engine_spec(self.engine) if self.backend == "tensorrtllm" and self.engine else None

    def served(self, root: Path) -> str:
        """Where Triton sees the repository: ``served_path``, else this folder (reference) or /models."""
        default = str(Path(root).resolve()) if self.backend == "reference" else "/models"
        return (self.served_path or default).rstrip("/") or "/"

    @classmethod
    def load(cls, root: Path) -> RepositorySettings | None:
        path = Path(root) / SETTINGS_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if "extra" in data:  # what older versions named llm_parameters
                data.setdefault("llm_parameters", data.pop("extra"))
            data.pop("chunked_context", None)  # older versions stored it; it follows ``engine`` now
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"unreadable repository settings ({exc})",
                where=str(path),
                expected="the JSON object phlora-nim convert writes",
                fix="remove it and run `phlora-nim convert` again",
            ) from None

    def save(self, root: Path) -> None:
        atomic_write_text(Path(root) / SETTINGS_FILE, json.dumps(asdict(self), indent=1) + "\n")


def _input(
    name: str,
    dtype: int,
    dims: list[int],
    *,
    optional: bool = False,
    ragged: bool = False,
    reshape: list[int] | None = None,
) -> mc.ModelInput:
    spec = mc.ModelInput(name=name, data_type=dtype, dims=dims, optional=optional, allow_ragged_batch=ragged)
    if reshape is not None:
        spec.reshape.shape.extend(reshape)
    return spec


def _output(name: str, dtype: int, dims: list[int]) -> mc.ModelOutput:
    return mc.ModelOutput(name=name, data_type=dtype, dims=dims)


def _params(config: mc.ModelConfig, values: dict[str, Any]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def lora_inputs(dtype: str, *, for_llm: bool) -> list[mc.ModelInput]:
    """The three optional LoRA inputs, typed as TensorRT-LLM's ``tensorrt_llm`` model declares them.

    ``lora_weights`` takes the engine dtype (upstream ships TYPE_FP16 and asks bf16 users to edit it).
    """
    return [
        _input("lora_task_id", mc.TYPE_UINT64, [1], optional=True, reshape=[] if for_llm else None),
        _input("lora_weights", mc.DataType.Value(DTYPES[dtype].triton), [-1, -1], optional=True, ragged=True),
        _input("lora_config", mc.TYPE_INT32, [-1, 3], optional=True, ragged=True),
    ]


def require_engine_config(backend: str, engine_config: Path | None, *, stored: bool = False) -> None:
    """``--backend tensorrtllm`` needs the engine's ``config.json`` to check adapters against.

    TensorRT-LLM does not validate ``lora_prefetch_dir`` (``prefetchLoraWeights`` skips
    ``loraValidateRequestTensors``): one adapter with a module, rank, dtype or tensor parallelism
    the engine lacks stops the server at start with an unhelpful message.

    Args:
        stored: the repository already holds the engine config of an earlier ``convert``.

    Raises:
        OptionError: ``tensorrtllm`` without an engine config.
    """
    if backend == "tensorrtllm" and engine_config is None and not stored:
        raise OptionError(
            "--backend tensorrtllm needs the engine's config.json: TensorRT-LLM does not check "
            "prefetched adapters, so one the engine cannot take stops the server at start",
            where="--engine-config",
            expected="the config.json trtllm-build wrote beside the engine",
            found="none given",
            fix="build the engine with the flags `phlora-nim engine-plan` prints (convert with --backend "
            "reference first to plan), then convert with --engine-config ENGINE_DIR/config.json",
        )


def with_engine(settings: RepositorySettings, engine_config: dict[str, Any] | None) -> RepositorySettings:
    """``settings`` keeping the engine's ``config.json``: chunked context follows its
    ``use_paged_context_fmha`` and the LoRA cache is sized from it (see :func:`engine_parameters`)."""
    if engine_config is None:
        return settings
    return replace(settings, engine=dict(engine_config))


def _int_parameter(settings: RepositorySettings, key: str) -> int | None:
    value = settings.llm_parameters.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise OptionError(
            "not an integer", where=f"--llm-parameter {key}", expected="a whole number", found=repr(value)
        ) from None


def cache_request(settings: RepositorySettings) -> CacheRequest:
    """What ``settings`` ask of the LoRA cache (``--llm-parameter`` values fix what they name)."""
    host = _int_parameter(settings, "lora_cache_host_memory_bytes")
    spec = settings.engine_spec
    batch = (spec.max_batch_size if spec else None) or settings.max_batch_size
    return CacheRequest(
        host_bytes=host if host is not None else settings.lora_cache_bytes,
        spare=settings.max_batch_size if settings.lora_cache_spare is None else settings.lora_cache_spare,
        prefetch=settings.lora_prefetch,
        prefetch_names=settings.prefetch_names,
        prefetch_limit=settings.prefetch_limit,
        usage=settings.prefetch_usage,
        optimal_adapter_size=_int_parameter(settings, "lora_cache_optimal_adapter_size"),
        max_adapter_size=_int_parameter(settings, "lora_cache_max_adapter_size"),
        gpu_free_bytes=settings.gpu_free_memory_bytes,
        max_batch_size=int(batch),  # the executor batches up to the engine's max_batch_size
    )


def planned_adapters(
    state: RegistryState, root: Path, *, staged: dict[str, Path] | None = None
) -> list[PlannedAdapter]:
    """Every registered adapter with its ``lora_config`` rows (read from its prefetch folder, or from
    ``staged[name]`` for one not moved into place yet).

    Raises:
        InputError: an adapter's ``model.lora_config.npy`` is missing.
    """
    out = []
    for name, entry in sorted(state.adapters.items()):
        folder = (staged or {}).get(name) or prefetch_dir(root, entry.task_id)
        try:
            rows = read_rows(folder)
        except OSError as exc:
            raise InputError(
                f"cannot read the adapter's lora_config ({exc})",
                where=str(folder),
                expected="model.lora_config.npy written by `phlora-nim convert`",
                fix=f"convert {name} again (--replace)",
            ) from None
        out.append(PlannedAdapter(name=name, task_id=entry.task_id, rows=rows))
    return out


def lora_cache_plan(settings: RepositorySettings, adapters: list[PlannedAdapter]) -> LoraCachePlan | None:
    """The page-exact cache plan for a ``tensorrtllm`` repository with an engine config, else None.

    Raises:
        OptionError / InputError: the adapters cannot fit (the numbers in the message).
    """
    if settings.engine_spec is None:
        return None
    where = "engine config.json"
    return plan_cache(adapters, engine_shape(settings.engine, where=where), cache_request(settings), where=where)


def check_served_path(settings: RepositorySettings, root: Path) -> None:
    """The path Triton will see the repository at must be this repository, here (run where Triton runs).

    TensorRT-LLM skips a ``lora_prefetch_dir`` that does not exist without an error (only a debug
    line in ``PeftCacheManager::prefetchLoraWeights``): a wrong served path serves no preloaded adapter.

    Raises:
        OutputError: the served path does not exist here or is another folder.
    """
    served = Path(settings.served(root))
    same = served.is_dir() and Path(root).is_dir() and os.path.samefile(served, root)
    if not same:
        raise OutputError(
            "the served path is not this model repository here: TensorRT-LLM would silently preload nothing",
            where="--served-path",
            expected=f"the folder Triton mounts the repository at, here the same as {Path(root).resolve()}",
            found=f"{served} ({'another folder' if served.is_dir() else 'does not exist'})",
            fix="pass --served-path set to where this pod mounts the repository (Triton mounts it there too)",
        )


def lora_cache_parameters(
    state: RegistryState, settings: RepositorySettings, plan: LoraCachePlan | None = None
) -> dict[str, str]:
    """LoRA cache parameters fitting every registered adapter.

    With an engine config: TensorRT-LLM's page rule (:mod:`phlora_nim.repository.lora_cache_plan`).
    Otherwise (the CPU reference, whose cache counts bytes): ``lora_cache_max_adapter_size`` /
    ``optimal_adapter_size`` in rank units and a host budget holding every adapter twice over.
    """
    if plan is not None:
        return plan.parameters()
    ranks = sorted(e.max_rank for e in state.adapters.values()) or [8]
    sizes = [int(e.trtllm_layout.get("bytes", 0)) for e in state.adapters.values()]
    optimal = 1 << max(0, math.ceil(math.log2(max(1, ranks[len(ranks) // 2]))))
    biggest = max(ranks[-1], settings.max_lora_rank if settings.backend == "reference" else ranks[-1])
    # An explicit budget is taken as given.
    host = settings.lora_cache_bytes or math.ceil(max(_DEFAULT_HOST_CACHE, 2 * sum(sizes)) / _MiB) * _MiB
    return {
        "lora_cache_optimal_adapter_size": str(min(optimal, biggest)),
        "lora_cache_max_adapter_size": str(max(biggest, 8)),
        "lora_cache_gpu_memory_fraction": "0.05",
        "lora_cache_host_memory_bytes": str(host),
    }


def engine_parameters(settings: RepositorySettings) -> dict[str, str]:
    """The ``tensorrtllm`` backend's own parameters: every one it reads without a default, and
    chunked context only where the engine has paged context FMHA.

    Read with no default (tensorrtllm_backend v0.19.0 ``inflight_batcher_llm/src/model_instance_state.cc``;
    TensorRT-LLM ``triton_backend/`` from v0.20.0, the same reads): ``getBatchingTypeFromParams`` reads
    ``gpt_model_type``; ``getGuidedDecodingConfigFromParams`` reads ``tokenizer_dir``,
    ``xgrammar_tokenizer_info_path`` and ``guided_decoding_backend`` (absent, the model fails to load;
    empty, as upstream's template leaves them, guided decoding is off); ``gpt_model_path`` is guarded
    but "Both encoder and decoder model paths are empty" follows.

    Raises:
        OptionError: ``enable_chunked_context=true`` asked of an engine without paged context FMHA.
    """
    spec = settings.engine_spec
    paged = bool(spec and spec.paged_context_fmha)
    asked = settings.llm_parameters.get("enable_chunked_context", "").lower() in ("true", "1")
    if asked and spec is not None and not paged:
        raise OptionError(
            f"enable_chunked_context needs an engine built with paged context FMHA ({CHUNKED_CONTEXT_NEEDS})",
            where="--llm-parameter enable_chunked_context / engine config plugin_config.use_paged_context_fmha",
            expected="use_paged_context_fmha true",
            found="false",
            fix="rebuild with trtllm-build --use_paged_context_fmha enable, or drop enable_chunked_context",
        )
    return {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": settings.engine_dir or "/engines/base",
        "tokenizer_dir": "",
        "guided_decoding_backend": "",
        "xgrammar_tokenizer_info_path": "",
        "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": "0.85",
        "enable_chunked_context": "true" if paged else "false",
    }


def prefetch_parameter(settings: RepositorySettings, root: Path, plan: LoraCachePlan | None) -> dict[str, str]:
    """``lora_prefetch_dir``: every adapter's folder, or the preload folder when only some are preloaded."""
    if not settings.lora_prefetch or (plan is not None and not plan.prefetched):
        return {}
    folder = PREFETCH_DIR if plan is None or plan.all_prefetched else PRELOAD_DIR
    return {"lora_prefetch_dir": f"{settings.served(root).rstrip('/')}/{folder}"}


def llm_config(
    settings: RepositorySettings, state: RegistryState, root: Path, *, plan: LoraCachePlan | None = None
) -> mc.ModelConfig:
    """``tensorrt_llm``: the token-level model, with TensorRT-LLM's inputs and LoRA parameters.

    ``plan``: the cache plan (computed here from the registered adapters when None).
    """
    i32, u64, f32, boolean = mc.TYPE_INT32, mc.TYPE_UINT64, mc.TYPE_FP32, mc.TYPE_BOOL
    config = mc.ModelConfig(name=LLM_MODEL, max_batch_size=settings.max_batch_size)
    config.input.extend(
        [
            _input("input_ids", i32, [-1], optional=True, ragged=True),
            _input("input_lengths", i32, [1], reshape=[]),
            _input("request_output_len", i32, [1], reshape=[]),
            _input("end_id", i32, [1], optional=True, reshape=[]),
            _input("pad_id", i32, [1], optional=True, reshape=[]),
            _input("streaming", boolean, [1], optional=True, reshape=[]),
            _input("temperature", f32, [1], optional=True, reshape=[]),
            _input("runtime_top_k", i32, [1], optional=True, reshape=[]),
            _input("runtime_top_p", f32, [1], optional=True, reshape=[]),
            _input(SEED_INPUT[settings.trtllm_version], u64, [1], optional=True, reshape=[]),
            *lora_inputs(settings.dtype, for_llm=True),
        ]
    )
    config.output.extend([_output("output_ids", i32, [-1, -1]), _output("sequence_length", i32, [-1])])
    config.model_transaction_policy.decoupled = settings.decoupled
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    if plan is None and settings.engine_spec is not None:
        plan = lora_cache_plan(settings, planned_adapters(state, root))
    params: dict[str, Any] = {**lora_cache_parameters(state, settings, plan)}
    params |= prefetch_parameter(settings, root, plan)
    params |= {
        "max_beam_width": 1,
        "exclude_input_in_output": "true",
    }
    if settings.backend == "tensorrtllm":
        config.backend = "tensorrtllm"
        params.update(engine_parameters(settings))
    else:
        config.backend = "python"
        params.update(
            base_model=str(Path(settings.base).resolve()),
            dtype=settings.dtype,
            max_lora_rank=settings.max_lora_rank,
        )
    params.update(settings.llm_parameters)
    _params(config, params)
    return config


def preprocessing_config(settings: RepositorySettings) -> mc.ModelConfig:
    """Tokenizer: ``QUERY`` text → ``INPUT_ID`` tokens (plus lengths and the tokenizer's end/pad ids)."""
    i32 = mc.TYPE_INT32
    config = mc.ModelConfig(name=PREPROCESSING_MODEL, backend="python", max_batch_size=settings.max_batch_size)
    config.input.extend([_input("QUERY", mc.TYPE_STRING, [1]), _input("REQUEST_OUTPUT_LEN", i32, [1], optional=True)])
    config.output.extend(
        [
            _output("INPUT_ID", i32, [-1]),
            _output("REQUEST_INPUT_LEN", i32, [1]),
            _output("REQUEST_OUTPUT_LEN", i32, [-1]),
            _output("OUT_END_ID", i32, [1]),
            _output("OUT_PAD_ID", i32, [1]),
        ]
    )
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    # Upstream's preprocessing/1/model.py indexes model_config['parameters'] for tokenizer_dir and
    # multimodal_model_path (empty: a text-only model), so its model.py loads this config too.
    _params(config, {"tokenizer_dir": settings.tokenizer, "multimodal_model_path": "", "default_max_tokens": 16})
    return config


def postprocessing_config(settings: RepositorySettings) -> mc.ModelConfig:
    """Detokenizer: ``TOKENS_BATCH`` (+ ``SEQUENCE_LENGTH``) → ``OUTPUT`` text."""
    config = mc.ModelConfig(name=POSTPROCESSING_MODEL, backend="python", max_batch_size=settings.max_batch_size)
    config.input.extend(
        [
            _input("TOKENS_BATCH", mc.TYPE_INT32, [-1, -1]),
            _input("SEQUENCE_LENGTH", mc.TYPE_INT32, [-1], optional=True),
        ]
    )
    config.output.append(_output("OUTPUT", mc.TYPE_STRING, [-1]))
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    _params(config, {"tokenizer_dir": settings.tokenizer, "skip_special_tokens": "true"})
    return config


def ensemble_config(settings: RepositorySettings) -> mc.ModelConfig:
    """The text interface clients use; LoRA inputs go straight to ``tensorrt_llm``."""
    i32, f32, u64 = mc.TYPE_INT32, mc.TYPE_FP32, mc.TYPE_UINT64
    config = mc.ModelConfig(name=ENSEMBLE_MODEL, platform="ensemble", max_batch_size=settings.max_batch_size)
    config.input.extend(
        [
            _input("text_input", mc.TYPE_STRING, [1]),
            _input("max_tokens", i32, [1], optional=True),
            _input("stream", mc.TYPE_BOOL, [1], optional=True),
            _input("temperature", f32, [1], optional=True),
            _input("top_k", i32, [1], optional=True),
            _input("top_p", f32, [1], optional=True),
            _input(SEED_INPUT[settings.trtllm_version], u64, [1], optional=True),
            *lora_inputs(settings.dtype, for_llm=False),
        ]
    )
    config.output.append(_output("text_output", mc.TYPE_STRING, [-1]))
    steps = config.ensemble_scheduling.step
    pre = steps.add(model_name=PREPROCESSING_MODEL, model_version=-1)
    pre.input_map.update({"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens"})
    pre.output_map.update(
        {
            "INPUT_ID": "_INPUT_ID",
            "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN",
            "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
            "OUT_END_ID": "_END_ID",
            "OUT_PAD_ID": "_PAD_ID",
        }
    )
    llm = steps.add(model_name=LLM_MODEL, model_version=-1)
    llm.input_map.update(
        {
            "input_ids": "_INPUT_ID",
            "input_lengths": "_REQUEST_INPUT_LEN",
            "request_output_len": "_REQUEST_OUTPUT_LEN",
            "end_id": "_END_ID",
            "pad_id": "_PAD_ID",
            "streaming": "stream",
            "temperature": "temperature",
            "runtime_top_k": "top_k",
            "runtime_top_p": "top_p",
            SEED_INPUT[settings.trtllm_version]: SEED_INPUT[settings.trtllm_version],
            "lora_task_id": "lora_task_id",
            "lora_weights": "lora_weights",
            "lora_config": "lora_config",
        }
    )
    llm.output_map.update({"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"})
    post = steps.add(model_name=POSTPROCESSING_MODEL, model_version=-1)
    post.input_map.update({"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"})
    post.output_map.update({"OUTPUT": "text_output"})
    return config


def parse_config(text: str, *, where: str) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` into Triton's ``ModelConfig``; a clear error when it is not one."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise InputError(
            f"not a valid Triton model config ({exc})",
            where=where,
            expected="text format of inference.ModelConfig",
        ) from None


def write_config(folder: Path, config: mc.ModelConfig) -> Path:
    """Write ``config.pbtxt`` atomically after checking it parses back to the same message."""
    text = text_format.MessageToString(config)
    path = Path(folder) / "config.pbtxt"
    if parse_config(text, where=str(path)) != config:
        raise RuntimeError(f"config for {config.name} does not round-trip through text format")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def _install_model_py(root: Path, model: str) -> None:
    """Copy the thin ``model.py`` (Triton API → importable code in ``phlora_nim``) into version 1."""
    source = TEMPLATES / model / "1" / "model.py"
    target = Path(root) / model / "1" / "model.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_bytes() != source.read_bytes():
        atomic_write_text(target, source.read_text(encoding="utf-8"))


def write_preload(root: Path, state: RegistryState, plan: LoraCachePlan | None) -> None:
    """Make :data:`PRELOAD_DIR` hold exactly the preloaded adapters (hard links to their prefetch
    files; copies where links cannot be made), or remove it when every adapter is preloaded.

    Built beside the old one and renamed into place, so Triton never sees it half made.
    """
    target = Path(root) / PRELOAD_DIR
    if plan is None or plan.all_prefetched or not plan.prefetched:
        if target.exists():
            shutil.rmtree(target)
        return
    ids = {name: state.adapters[name].task_id for name in plan.prefetched}
    scratch = Path(tempfile.mkdtemp(prefix=".lora_preload-", dir=target.parent))
    try:
        for task_id in ids.values():
            source, folder = prefetch_dir(root, task_id), scratch / str(task_id)
            folder.mkdir()
            for item in source.iterdir():
                try:
                    os.link(item, folder / item.name)
                except OSError:
                    shutil.copy2(item, folder / item.name)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".lora_preload-old-", dir=target.parent))
            os.replace(target, old / "old")
        os.replace(scratch, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_repository(root: Path, settings: RepositorySettings, state: RegistryState) -> list[Path]:
    """(Re)write every model of the repository for ``settings`` and the adapters in ``state``.

    Returns:
        The config files written.

    Raises:
        OptionError / InputError: the adapters cannot fit the engine's LoRA cache (nothing written).
    """
    root = Path(root)
    plan = lora_cache_plan(settings, planned_adapters(state, root)) if settings.engine_spec else None
    llm = llm_config(settings, state, root, plan=plan)
    (root / PREFETCH_DIR).mkdir(parents=True, exist_ok=True)
    write_preload(root, state, plan)
    written = [
        write_config(root / PREPROCESSING_MODEL, preprocessing_config(settings)),
        write_config(root / LLM_MODEL, llm),
        write_config(root / POSTPROCESSING_MODEL, postprocessing_config(settings)),
        write_config(root / ENSEMBLE_MODEL, ensemble_config(settings)),
    ]
    for model in (PREPROCESSING_MODEL, POSTPROCESSING_MODEL):
        _install_model_py(root, model)
    llm_py = root / LLM_MODEL / "1" / "model.py"
    if settings.backend == "reference":
        _install_model_py(root, LLM_MODEL)
    else:
        # The TensorRT-LLM backend is a C++ backend: version 1 stays empty.
        llm_py.unlink(missing_ok=True)
        (root / LLM_MODEL / "1").mkdir(parents=True, exist_ok=True)
    (root / ENSEMBLE_MODEL / "1").mkdir(parents=True, exist_ok=True)
    settings.save(root)
    return written
