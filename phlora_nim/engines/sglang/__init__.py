"""SGLang's server: ``model="<base>:<adapter>"``, adapters loaded at run time.

Upstream (sgl-project/sglang): ``python/sglang/srt/entrypoints/http_server.py`` (``/load_lora_adapter``
and ``/unload_lora_adapter`` taking ``LoadLoRAAdapterReqInput {lora_name, lora_path}``, 200 on success,
400 with ``error_message`` otherwise; ``/health``), ``python/sglang/srt/entrypoints/openai/serving_base.py``
(``_parse_model_parameter``: ``base:adapter`` in ``model``), ``docs/advanced_features/lora.md``.
"""
