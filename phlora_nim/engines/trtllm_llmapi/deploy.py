"""The ``tensorrt_llm`` model folder of a repository for the llmapi engine (GPU) or its CPU reference.

``tensorrt_llm/config.pbtxt`` (upstream's interface) and ``tensorrt_llm/1/model.yaml`` for both; the CPU
reference also gets its ``1/model.py`` (phlora-nim's); the GPU engine's ``model.py`` / ``helpers.py`` are
NVIDIA's and are put in place by the operator or the chart (:mod:`.upstream_files`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from phlora_nim.core.atomic import atomic_write_text
from phlora_nim.engines.trtllm_llmapi import interface, model_yaml

TEMPLATE = Path(__file__).parent / "templates" / interface.MODEL_NAME / "1" / "model.py"
# One PEFT folder per adapter weights, named by lora_id (content-keyed: a path never holds other weights).
# Inside the model folder: Triton loads only its numeric version folders and skips the rest.
STORE = f"{interface.MODEL_NAME}/lora_store"


def store_dir(root: Path, lora_id: int) -> Path:
    return Path(root) / STORE / str(int(lora_id))


def model_dir(repository: Path) -> Path:
    return Path(repository) / interface.MODEL_NAME


def yaml_path(repository: Path) -> Path:
    return model_dir(repository) / "1" / model_yaml.FILE_NAME


def write_model(repository: Path, config: model_yaml.LlmapiConfig, *, cpu_reference: bool) -> list[Path]:
    """Write (or rewrite) the model folder's files; returns what was written."""
    folder = model_dir(repository)
    (folder / "1").mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.pbtxt", interface.render_config_pbtxt())
    model_yaml.write(yaml_path(repository), config)
    written = [folder / "config.pbtxt", yaml_path(repository)]
    if cpu_reference:
        target = folder / "1" / "model.py"
        tmp = target.with_suffix(".py.tmp")
        shutil.copyfile(TEMPLATE, tmp)
        tmp.replace(target)
        written.append(target)
    return written


def write_repository(root: Path, settings: Any, state: Any, fit: Any = None) -> list[Path]:
    """After ``convert`` (``fit``: its staging ``Fit``): the model folder and the settings. After
    ``remove`` (no fit): nothing to rewrite (model.yaml may keep covering a removed adapter's modules)."""
    if fit is None:
        return []
    written = write_model(root, fit.config, cpu_reference=settings.engine_row.cpu_reference)
    # Only what later runs and the router read: which engine, base and served path.
    type(settings)(
        backend=settings.backend, base=str(Path(settings.base).resolve()), served_path=settings.served_path
    ).save(root)
    return written
