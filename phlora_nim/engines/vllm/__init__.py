"""vLLM's OpenAI server (``vllm serve``): adapters by name, loaded at run time.

Upstream (vllm-project/vllm 0.32): ``vllm/entrypoints/openai/models/serving.py``
(``OpenAIServingModels.load_lora_adapter``, ``unload_lora_adapter``, ``_check_*_lora_adapter_request``,
``show_available_models``, ``create_error_response``), ``vllm/entrypoints/serve/lora/api_router.py``
(``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter`` when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).
"""
