"""TensorRT-LLM LoRA module names and ids (``LoraModule::ModuleType``)."""

from __future__ import annotations

# Order is the C++ enum's: the id is the index. gate_proj maps to mlp_h_to_4h (5) and up_proj to
# mlp_gate (7), as the runtime code does (the comments in Triton's config.pbtxt have them swapped).
TRTLLM_MODULES: tuple[str, ...] = (
    "attn_qkv",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_dense",
    "mlp_h_to_4h",
    "mlp_4h_to_h",
    "mlp_gate",
    "cross_attn_qkv",
    "cross_attn_q",
    "cross_attn_k",
    "cross_attn_v",
    "cross_attn_dense",
    "moe_h_to_4h",
    "moe_4h_to_h",
    "moe_gate",
    "moe_router",
    "mlp_router",
    "mlp_gate_up",
)

TRTLLM_MODULE_IDS: dict[str, int] = {name: i for i, name in enumerate(TRTLLM_MODULES)}
