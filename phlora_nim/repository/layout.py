"""Where things live inside a phlora-nim model repository (Triton's ``--model-repository``).

```
model_repository/
  phlora_registry.json         adapter registry (a file: Triton only polls folders)
  phlora_repository.json       how the repository was generated (backend, base, dtype)
  preprocessing/ tensorrt_llm/ postprocessing/ ensemble/     Triton models
  tensorrt_llm/lora_prefetch/<task_id>/model.lora_{weights,config}.npy   lora_prefetch_dir
  tensorrt_llm/adapters/<name>/                              NIM / PEFT adapter store (+ the fine-tune's tokenizer)
  tensorrt_llm/tokenizer/                                    the base checkpoint's tokenizer files
  tensorrt_llm/lora_preload/<task_id>/                       lora_prefetch_dir when only some adapters are preloaded
```

Adapters sit inside the ``tensorrt_llm`` model folder: Triton takes every top-level folder for a
model (and fails on one without a config), but inside a model folder it only loads numeric
version folders and skips the rest with a warning.
"""

from __future__ import annotations

from pathlib import Path

from phlora_nim.core.bounds import Bound

REGISTRY_FILE = "phlora_registry.json"
SETTINGS_FILE = "phlora_repository.json"
LLM_MODEL = "tensorrt_llm"
PREPROCESSING_MODEL = "preprocessing"
POSTPROCESSING_MODEL = "postprocessing"
ENSEMBLE_MODEL = "ensemble"
PREFETCH_DIR = f"{LLM_MODEL}/lora_prefetch"
ADAPTER_STORE = f"{LLM_MODEL}/adapters"
BASE_TOKENIZER = f"{LLM_MODEL}/tokenizer"
# lora_prefetch_dir when only some adapters are preloaded: links to their PREFETCH_DIR folders
# (TensorRT-LLM preloads every numeric folder of lora_prefetch_dir).
PRELOAD_DIR = f"{LLM_MODEL}/lora_preload"
# Seconds the files of removed and replaced adapters outlive their registry entry: a router reads
# the registry every second or so and may route to an adapter until it has.
DEFAULT_GRACE_S = 60.0
GRACE = Bound("the grace period must be ≥ 0 seconds", "a number of seconds ≥ 0", low=0.0)


def prefetch_dir(root: Path, task_id: int) -> Path:
    """Folder of one adapter's TensorRT-LLM tensors (``model.lora_weights.npy`` + ``model.lora_config.npy``)."""
    return Path(root) / PREFETCH_DIR / str(int(task_id))


def adapter_store_dir(root: Path, name: str) -> Path:
    """Folder of one adapter in the NIM / PEFT store (the folder name is the served model name)."""
    return Path(root) / ADAPTER_STORE / name


def base_tokenizer_dir(root: Path) -> Path:
    """Folder of the base checkpoint's tokenizer files (the router's HTTP front tokenizes with them)."""
    return Path(root) / BASE_TOKENIZER
