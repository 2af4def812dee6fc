"""The legacy ``inflight_batcher_llm`` repository: its four models and their ``config.pbtxt`` files.

Models (as TensorRT-LLM's Triton backend ships them): ``preprocessing`` (tokenizer),
``tensorrt_llm`` (token-level model: the real TensorRT-LLM backend, or the CPU reference model with
the same contract), ``postprocessing`` (detokenizer) and an ``ensemble`` giving clients the text
interface, with ``lora_task_id`` / ``lora_weights`` / ``lora_config`` passed through to
``tensorrt_llm``. LoRA cache parameters are sized from the registered adapters
(:mod:`phlora_nim.engines.trtllm_legacy.cache_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from phlora_nim.core.atomic import atomic_write_text
from phlora_nim.core.dtypes import DTYPES
from phlora_nim.core.errors import OptionError
from phlora_nim.engines.trtllm_legacy.cache_plan import LoraCachePlan
from phlora_nim.engines.trtllm_legacy.cache_settings import (
    engine_spec_of,
    lora_cache_parameters,
    lora_cache_plan,
    planned_adapters,
    write_preload,
)
from phlora_nim.repository.layout import (
    ENSEMBLE_MODEL,
    LLM_MODEL,
    POSTPROCESSING_MODEL,
    PREFETCH_DIR,
    PRELOAD_DIR,
    PREPROCESSING_MODEL,
)
from phlora_nim.repository.pbtxt import model_input, model_output, set_parameters, write_config
from phlora_nim.repository.registry import RegistryState
from phlora_nim.repository.settings import RepositorySettings

# Input names that changed between the Triton backend releases (--trtllm-version).
SEED_INPUT = {"0.20": "seed", "0.19": "random_seed"}
# The runtime's words when chunked context meets an engine without paged context FMHA
# (TrtGptModelInflightBatching's constructor).
CHUNKED_CONTEXT_NEEDS = (
    "Chunked context requires context FMHA, paged kv_cache and paged context FMHA all enabled at the same time."
)
# The thin model.py files copied into every repository (package data beside this module).
TEMPLATES = Path(__file__).resolve().parent / "templates"


def lora_inputs(dtype: str, *, for_llm: bool) -> list[mc.ModelInput]:
    """The three optional LoRA inputs, typed as TensorRT-LLM's ``tensorrt_llm`` model declares them.

    ``lora_weights`` takes the engine dtype (upstream ships TYPE_FP16 and asks bf16 users to edit it).
    """
    return [
        model_input("lora_task_id", mc.TYPE_UINT64, [1], optional=True, reshape=[] if for_llm else None),
        model_input("lora_weights", mc.DataType.Value(DTYPES[dtype].triton), [-1, -1], optional=True, ragged=True),
        model_input("lora_config", mc.TYPE_INT32, [-1, 3], optional=True, ragged=True),
    ]


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
    spec = engine_spec_of(settings)
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
            model_input("input_ids", i32, [-1], optional=True, ragged=True),
            model_input("input_lengths", i32, [1], reshape=[]),
            model_input("request_output_len", i32, [1], reshape=[]),
            model_input("end_id", i32, [1], optional=True, reshape=[]),
            model_input("pad_id", i32, [1], optional=True, reshape=[]),
            model_input("streaming", boolean, [1], optional=True, reshape=[]),
            model_input("temperature", f32, [1], optional=True, reshape=[]),
            model_input("runtime_top_k", i32, [1], optional=True, reshape=[]),
            model_input("runtime_top_p", f32, [1], optional=True, reshape=[]),
            model_input(SEED_INPUT[settings.trtllm_version], u64, [1], optional=True, reshape=[]),
            *lora_inputs(settings.dtype, for_llm=True),
        ]
    )
    config.output.extend([model_output("output_ids", i32, [-1, -1]), model_output("sequence_length", i32, [-1])])
    config.model_transaction_policy.decoupled = settings.decoupled
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    if plan is None and engine_spec_of(settings) is not None:
        plan = lora_cache_plan(settings, planned_adapters(state, root))
    params: dict[str, Any] = {**lora_cache_parameters(state, settings, plan)}
    params |= prefetch_parameter(settings, root, plan)
    params |= {
        "max_beam_width": 1,
        "exclude_input_in_output": "true",
    }
    if not settings.engine_row.cpu_reference:
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
    set_parameters(config, params)
    return config


def preprocessing_config(settings: RepositorySettings) -> mc.ModelConfig:
    """Tokenizer: ``QUERY`` text → ``INPUT_ID`` tokens (plus lengths and the tokenizer's end/pad ids)."""
    i32 = mc.TYPE_INT32
    config = mc.ModelConfig(name=PREPROCESSING_MODEL, backend="python", max_batch_size=settings.max_batch_size)
    config.input.extend(
        [model_input("QUERY", mc.TYPE_STRING, [1]), model_input("REQUEST_OUTPUT_LEN", i32, [1], optional=True)]
    )
    config.output.extend(
        [
            model_output("INPUT_ID", i32, [-1]),
            model_output("REQUEST_INPUT_LEN", i32, [1]),
            model_output("REQUEST_OUTPUT_LEN", i32, [-1]),
            model_output("OUT_END_ID", i32, [1]),
            model_output("OUT_PAD_ID", i32, [1]),
        ]
    )
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    # Upstream's preprocessing/1/model.py indexes model_config['parameters'] for tokenizer_dir and
    # multimodal_model_path (empty: a text-only model), so its model.py loads this config too.
    set_parameters(config, {"tokenizer_dir": settings.tokenizer, "multimodal_model_path": "", "default_max_tokens": 16})
    return config


def postprocessing_config(settings: RepositorySettings) -> mc.ModelConfig:
    """Detokenizer: ``TOKENS_BATCH`` (+ ``SEQUENCE_LENGTH``) → ``OUTPUT`` text."""
    config = mc.ModelConfig(name=POSTPROCESSING_MODEL, backend="python", max_batch_size=settings.max_batch_size)
    config.input.extend(
        [
            model_input("TOKENS_BATCH", mc.TYPE_INT32, [-1, -1]),
            model_input("SEQUENCE_LENGTH", mc.TYPE_INT32, [-1], optional=True),
        ]
    )
    config.output.append(model_output("OUTPUT", mc.TYPE_STRING, [-1]))
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    set_parameters(config, {"tokenizer_dir": settings.tokenizer, "skip_special_tokens": "true"})
    return config


def ensemble_config(settings: RepositorySettings) -> mc.ModelConfig:
    """The text interface clients use; LoRA inputs go straight to ``tensorrt_llm``."""
    i32, f32, u64 = mc.TYPE_INT32, mc.TYPE_FP32, mc.TYPE_UINT64
    config = mc.ModelConfig(name=ENSEMBLE_MODEL, platform="ensemble", max_batch_size=settings.max_batch_size)
    config.input.extend(
        [
            model_input("text_input", mc.TYPE_STRING, [1]),
            model_input("max_tokens", i32, [1], optional=True),
            model_input("stream", mc.TYPE_BOOL, [1], optional=True),
            model_input("temperature", f32, [1], optional=True),
            model_input("top_k", i32, [1], optional=True),
            model_input("top_p", f32, [1], optional=True),
            model_input(SEED_INPUT[settings.trtllm_version], u64, [1], optional=True),
            *lora_inputs(settings.dtype, for_llm=False),
        ]
    )
    config.output.append(model_output("text_output", mc.TYPE_STRING, [-1]))
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


def _install_model_py(root: Path, model: str) -> None:
    """Copy the thin ``model.py`` (Triton API → importable code in ``phlora_nim``) into version 1."""
    source = TEMPLATES / model / "1" / "model.py"
    target = Path(root) / model / "1" / "model.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_bytes() != source.read_bytes():
        atomic_write_text(target, source.read_text(encoding="utf-8"))


def write_repository(root: Path, settings: RepositorySettings, state: RegistryState, fit: Any = None) -> list[Path]:
    """(Re)write every model of the repository for ``settings`` and the adapters in ``state``
    (``fit``: what staging's ``check_fit`` returned; nothing for this engine).

    Returns:
        The config files written.

    Raises:
        OptionError / InputError: the adapters cannot fit the engine's LoRA cache (nothing written).
    """
    root = Path(root)
    plan = lora_cache_plan(settings, planned_adapters(state, root)) if engine_spec_of(settings) else None
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
    if settings.engine_row.cpu_reference:
        _install_model_py(root, LLM_MODEL)
    else:
        # The TensorRT-LLM backend is a C++ backend: version 1 stays empty.
        llm_py.unlink(missing_ok=True)
        (root / LLM_MODEL / "1").mkdir(parents=True, exist_ok=True)
    (root / ENSEMBLE_MODEL / "1").mkdir(parents=True, exist_ok=True)
    settings.save(root)
    return written
