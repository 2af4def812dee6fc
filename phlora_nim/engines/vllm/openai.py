"""vLLM's facts for the router (see the package docstring for the upstream files)."""

from __future__ import annotations

from phlora_nim.engines.openai_api import OpenAIEngineFacts, RuntimeLoading

# OpenAIServingModels: a second load of a name answers 400 "The lora adapter '<name>' has already been
# loaded. ..."; an unload of an unknown name 404 "The lora adapter '<name>' cannot be found."; a request
# naming a model that is neither the base nor a loaded adapter 404 "The model `<name>` does not exist.".
# A load the engine refuses (rank above --max-lora-rank, unreadable folder) answers 500 (or 404 for a
# missing folder) with the engine's reason as the message.
LOADING = RuntimeLoading(
    load_path="/v1/load_lora_adapter",
    unload_path="/v1/unload_lora_adapter",
    already_loaded=("has already been",),
    not_loaded=("cannot be found",),
    enable=("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "--enable-lora"),
)

FACTS = OpenAIEngineFacts(
    selector="model",
    ready_path="/health",
    loading=LOADING,
    not_resident=("does not exist",),
    not_resident_status=404,
    # vllm/entrypoints/openai/completion/protocol.py: CompletionRequest.return_token_ids.
    token_ids_field="return_token_ids",
    sources=("vllm/entrypoints/openai/models/serving.py", "vllm/entrypoints/serve/lora/api_router.py"),
)
