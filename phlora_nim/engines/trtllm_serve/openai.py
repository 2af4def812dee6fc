"""trtllm-serve's facts for the router (see the package docstring for the upstream files)."""

from __future__ import annotations

from phlora_nim.engines.openai_api import OpenAIEngineFacts

FACTS = OpenAIEngineFacts(
    selector="lora-request",
    ready_path="/health",
    loading=None,
    lists_adapters=False,
    sources=("tensorrt_llm/serve/openai_protocol.py", "examples/serve/openai_completion_client_for_lora.py"),
)
