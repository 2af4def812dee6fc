"""TensorRT-LLM ≥ 1.3 on Triton: NVIDIA's ``llmapi`` Python model, adapters as PEFT folders read by path.

Upstream (NVIDIA/TensorRT-LLM), read for this package; nothing of it is copied:

- ``triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt``: the model's inputs and outputs
  (:mod:`.interface`).
- ``triton_backend/all_models/llmapi/tensorrt_llm/1/helpers.py`` ``get_lora_request_from_request``:
  ``lora_id`` / ``lora_name`` / ``lora_path`` together or none, ``lora_ckpt_source`` in (hf, nemo), the
  path checked on the server's filesystem; ``1/model.py`` wraps every failure as ``Error generating
  request: …`` (:mod:`.interface`).
- ``1/model.yaml``: ``LLM()`` arguments, ``backend: pytorch``, ``triton_config`` (:mod:`.model_yaml`).
- ``tensorrt_llm/_torch/peft/lora/manager.py`` ``LoraManager.load_from_hf`` and ``loaders.py``
  ``iterate_hf_lora``; ``tensorrt_llm/_torch/peft/lora/config.py`` ``LoraConfig``,
  ``get_default_trtllm_modules_to_hf_modules``, ``get_missing_qkv_modules_from_lora_modules``: how a
  PEFT folder becomes the engine's LoRA weights (:mod:`.loader_rule`).

What the package holds: the loader rule, the writer of adapter folders exact under it, the repository
files (``config.pbtxt``, ``model.yaml``), the router's per-request inputs, and phlora-nim's CPU reference
of the model (:mod:`.reference_model`). NVIDIA's ``model.py`` / ``helpers.py`` are never part of
phlora-nim: :mod:`.upstream_files` says where to get them.
"""
