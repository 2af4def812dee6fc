"""The ``llmapi`` model's Triton interface and error texts, restated from upstream as data.

Source: NVIDIA/TensorRT-LLM ``triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt`` (inputs,
outputs, ``name: "tensorrt_llm"``, ``backend: "python"``) and ``1/helpers.py``
(``get_lora_request_from_request``: the error texts), ``1/model.py`` (``_generate``: every failure is sent
as ``Error generating request: <text>``). ``tests/test_trtllm_llmapi.py`` checks this table against
the upstream file.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "tensorrt_llm"


@dataclass(frozen=True)
class Tensor:
    """One input or output of the model as ``config.pbtxt`` declares it."""

    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]
    optional: bool = False


def _opt(name: str, data_type: str, dims: tuple[int, ...] = (1,)) -> Tensor:
    return Tensor(name, data_type, dims, optional=True)


INPUTS: tuple[Tensor, ...] = (
    Tensor("text_input", "TYPE_STRING", (-1,)),
    _opt("image_url", "TYPE_STRING", (-1,)),
    _opt("streaming", "TYPE_BOOL"),
    _opt("sampling_param_best_of", "TYPE_INT32"),
    _opt("sampling_param_temperature", "TYPE_FP32"),
    _opt("sampling_param_top_k", "TYPE_INT32"),
    _opt("sampling_param_top_p", "TYPE_FP32"),
    _opt("sampling_param_frequency_penalty", "TYPE_FP32"),
    _opt("sampling_param_presence_penalty", "TYPE_FP32"),
    _opt("sampling_param_max_tokens", "TYPE_INT32"),
    _opt("sampling_param_stop", "TYPE_STRING", (-1,)),
    _opt("sampling_param_seed", "TYPE_UINT64"),
    _opt("sampling_param_exclude_input_from_output", "TYPE_BOOL"),
    _opt("sampling_param_return_perf_metrics", "TYPE_BOOL"),
    _opt("return_finish_reason", "TYPE_BOOL"),
    _opt("return_stop_reason", "TYPE_BOOL"),
    _opt("return_cumulative_logprob", "TYPE_BOOL"),
    _opt("stop", "TYPE_BOOL"),
    _opt("lora_id", "TYPE_UINT64"),
    _opt("lora_name", "TYPE_STRING"),
    _opt("lora_path", "TYPE_STRING"),
    _opt("lora_ckpt_source", "TYPE_STRING"),
)

OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "TYPE_STRING", (-1,)),
    Tensor("finish_reason", "TYPE_STRING", (-1,)),
    Tensor("stop_reason", "TYPE_STRING", (-1,)),
    Tensor("cumulative_logprob", "TYPE_FP32", (-1,)),
    Tensor("kv_cache_reused_block", "TYPE_INT32", (-1,)),
    Tensor("kv_cache_missed_block", "TYPE_INT32", (-1,)),
    Tensor("kv_cache_alloc_new_blocks", "TYPE_INT32", (-1,)),
    Tensor("kv_cache_alloc_total_blocks", "TYPE_INT32", (-1,)),
    Tensor("kv_cache_hit_rate", "TYPE_FP32", (-1,)),
    Tensor("arrival_time_ns", "TYPE_INT64", (1,)),
    Tensor("first_scheduled_time_ns", "TYPE_INT64", (1,)),
    Tensor("first_token_time_ns", "TYPE_INT64", (1,)),
    Tensor("last_token_time_ns", "TYPE_INT64", (1,)),
    Tensor("acceptance_rate", "TYPE_FP32", (1,)),
    Tensor("total_accepted_draft_tokens", "TYPE_INT32", (1,)),
    Tensor("total_draft_tokens", "TYPE_INT32", (1,)),
)

LORA_CKPT_SOURCES = ("hf", "nemo")
# SamplingParams.max_tokens when a request names none (tensorrt_llm/sampling_params.py).
DEFAULT_MAX_TOKENS = 32

# helpers.py get_lora_request_from_request
LORA_TOGETHER = "lora_id, lora_name, and lora_path must all be provided together"
LORA_PATH_MISSING = "lora_path does not exist on the Triton server's filesystem: "
# model.py _generate: the prefix of every per-request error.
GENERATE_PREFIX = "Error generating request: "


def lora_path_missing(path: str) -> str:
    return f"{LORA_PATH_MISSING}{path}"


def ckpt_source_invalid(found: str) -> str:
    return f"lora_ckpt_source must be one of {LORA_CKPT_SOURCES}, got {found!r}"


def is_lora_path_missing(text: str) -> bool:
    """Whether an upstream error says the adapter's folder is not on the replica's filesystem."""
    return LORA_PATH_MISSING in text


def is_lora_inputs_error(text: str) -> bool:
    """Whether an upstream error says the request's LoRA inputs are malformed (the router's fault)."""
    return LORA_TOGETHER in text or "lora_ckpt_source must be one of" in text


def render_config_pbtxt(*, instance_count: int = 1, parameters: dict[str, str] | None = None) -> str:
    """``tensorrt_llm/config.pbtxt``: upstream's interface; batching and decoupling come from model.yaml.

    Upstream keeps ``max_batch_size`` and ``model_transaction_policy`` out of this file (``model.py``'s
    ``auto_complete_config`` sets them from ``model.yaml``'s ``triton_config``), so this file does too.
    """

    def block(t: Tensor) -> str:
        dims = ", ".join(str(d) for d in t.dims)
        opt = "\n    optional: true" if t.optional else ""
        return f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {dims} ]{opt}\n  }}'

    lines = [
        f'name: "{MODEL_NAME}"',
        'backend: "python"',
        "",
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]",
        "",
        "input [\n" + ",\n".join(block(t) for t in INPUTS) + "\n]",
        "output [\n" + ",\n".join(block(t) for t in OUTPUTS) + "\n]",
    ]
    for key, value in sorted((parameters or {}).items()):
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"
