"""A stand-in LoRA deployment: what router tests and benchmarks serve, without an LLM.

A Triton repository (``standin_repo/``: an ``ensemble`` and a decoupled ``stream`` model under the
Python backend) that implements TensorRT-LLM's LoRA cache protocol with the runtime's messages, and
a registry of tiny adapters for it.

Every adapter's ``lora_weights`` sum to its ``offset`` (an integer exact in float16 and bfloat16),
so the stand-in model's ``y = x + offset`` proves which adapter a response was computed with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np

from phlora_nim.core.dtypes import DTYPES
from phlora_nim.engines.trtllm_legacy.contract import CONFIG_FILE, WEIGHTS_FILE
from phlora_nim.repository.layout import prefetch_dir
from phlora_nim.repository.registry import AdapterEntry, Registry, task_id_for

STANDIN_REPO = Path(__file__).resolve().parent / "standin_repo"


def adapter_tensors(offset: int, dtype: str, *, rows: int = 2, width: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``lora_weights`` [1, rows, width] summing to ``offset`` and ``lora_config`` [1, rows, 3]."""
    weights = np.zeros((1, rows, width), dtype=np.float32)
    weights[0, :, :4] = 0.25  # rows·1.0 in small values, the rest in one element
    weights[0, 0, 4] = offset - rows
    config = np.array([[[1, layer, 2] for layer in range(rows)]], dtype=np.int32)
    return weights.astype(DTYPES[dtype].numpy), config


def add_adapters(root: Path, adapters: dict[str, tuple[int, str]]) -> dict[str, AdapterEntry]:
    """Register ``name → (offset, dtype)`` adapters in ``root`` (tensors first, then the registry)."""
    registry = Registry(root)
    with registry.locked() as state:
        taken = {e.task_id: e.digest for e in state.adapters.values()} | dict(state.retired)
        for name, (offset, dtype) in adapters.items():
            digest = hashlib.sha256(f"{name}:{offset}:{dtype}".encode()).hexdigest()
            task_id = task_id_for(digest, taken)
            taken[task_id] = digest
            weights, config = adapter_tensors(offset, dtype)
            folder = prefetch_dir(root, task_id)
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / WEIGHTS_FILE, weights)  # bfloat16 lands as '<V2'
            np.save(folder / CONFIG_FILE, config)
            state.adapters[name] = AdapterEntry(
                name=name,
                task_id=task_id,
                digest=digest,
                ranks={"q_proj": 2},
                modules=["q_proj"],
                dtype=dtype,
                sources={"test": name},
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            )
        return dict(state.adapters)


def remove_adapter(root: Path, name: str) -> None:
    with Registry(root).locked() as state:
        state.remove(name)


def standin_repo(dest: Path, *, capacity: int = 2, weights_type: str = "TYPE_FP16") -> Path:
    """A copy of the stand-in repository with another cache capacity or ``lora_weights`` dtype.

    The copy goes to ``dest/repo``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    repo = dest / "repo"
    shutil.copytree(STANDIN_REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    for config in repo.glob("*/config.pbtxt"):
        text = config.read_text()
        text = re.sub(r'(key: "lora_cache_capacity" value: \{ string_value: )"\d+"', rf'\1"{capacity}"', text)
        text = text.replace(
            'name: "lora_weights" data_type: TYPE_FP16', f'name: "lora_weights" data_type: {weights_type}'
        )
        config.write_text(text)
    return repo
