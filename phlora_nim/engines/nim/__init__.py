"""NVIDIA NIM for LLMs 2.x: vLLM (or SGLang from 2.1) inside, adapters from ``NIM_PEFT_SOURCE``.

NIM serves every folder of its store under the folder's name (``model=<adapter>``), lists them in
``/v1/models`` and answers readiness on ``/v1/health/ready``. With ``NIM_PEFT_REFRESH_INTERVAL`` set
it rescans the store (dynamic mode): the router writes nothing to it and reads residency from
``/v1/models``. Upstream: NIM for LLMs docs, "Parameter-Efficient Fine-Tuning" (``NIM_PEFT_SOURCE``,
``NIM_PEFT_REFRESH_INTERVAL``, ``NIM_MAX_GPU_LORAS``, ``NIM_MAX_CPU_LORAS``) and "API reference"
(``/v1/health/ready``); the request path is vLLM's (``vllm/entrypoints/openai/models/serving.py``).
"""
