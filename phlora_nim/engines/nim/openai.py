"""NIM 2.x's facts for the router (see the package docstring for the upstream pages)."""

from __future__ import annotations

from phlora_nim.engines.openai_api import OpenAIEngineFacts

# No load endpoint: adapters come from the watched store (NIM_PEFT_SOURCE), under their folder names.
FACTS = OpenAIEngineFacts(
    selector="model",
    ready_path="/v1/health/ready",
    loading=None,
    not_resident=("does not exist",),
    not_resident_status=404,
    sources=("NIM for LLMs: Parameter-Efficient Fine-Tuning", "vllm/entrypoints/openai/models/serving.py"),
)
