"""SGLang's facts for the router (see the package docstring for the upstream files)."""

from __future__ import annotations

from phlora_nim.engines.openai_api import OpenAIEngineFacts, RuntimeLoading

LOADING = RuntimeLoading(
    load_path="/load_lora_adapter",
    unload_path="/unload_lora_adapter",
    already_loaded=("already loaded",),
    not_loaded=("not loaded", "not found"),
    enable=("--enable-lora", "--max-lora-rank", "--lora-target-modules"),
)

FACTS = OpenAIEngineFacts(
    selector="base-colon-adapter",
    separator=":",
    ready_path="/health",
    loading=LOADING,
    not_resident=("not loaded", "not found"),
    not_resident_status=400,
    sources=("python/sglang/srt/entrypoints/http_server.py", "docs/advanced_features/lora.md"),
)
