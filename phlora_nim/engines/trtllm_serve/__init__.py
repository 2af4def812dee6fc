"""TensorRT-LLM's OpenAI server (``trtllm-serve``): the adapter's folder named in every request.

Upstream (NVIDIA/TensorRT-LLM): ``tensorrt_llm/serve/openai_protocol.py`` (``CompletionRequest`` and
``ChatCompletionRequest`` take ``lora_request: LoRARequest {lora_name, lora_int_id, lora_path}``),
``tensorrt_llm/serve/openai_server.py`` (``/health``, ``/v1/models`` listing the base only),
``examples/serve/openai_completion_client_for_lora.py`` (``extra_body={"lora_request": {...}}``).
The engine reads the folder at first use and caches it by ``lora_int_id``: no load step, and an id
must never name other weights (the registry's content-derived task id).
"""
