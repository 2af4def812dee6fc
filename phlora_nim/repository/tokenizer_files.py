"""The tokenizer files a checkpoint ships, copied into the model repository for the router's HTTP front.

The OpenAI-compatible front tokenizes prompts itself (exact prompt-length checks and usage counts)
and renders chat templates, with the adapter's own tokenizer and template when its fine-tune
shipped them. ``convert`` copies them beside the adapter in its store folder (where vLLM and PEFT
look for an adapter's tokenizer, next to ``adapter_config.json``), and the base checkpoint's into
``tensorrt_llm/tokenizer/`` (a folder Triton skips: it is not a numeric version), so that the
router needs nothing but the repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# What transformers' ``save_pretrained`` writes for a tokenizer (fast and slow), and chat templates.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer_files(checkpoint: Path, target: Path) -> bool:
    """Copy the tokenizer files found in the folder ``checkpoint`` into ``target`` (created when needed).

    Returns:
        Whether any was found (a single ``.safetensors`` file, or a folder without a tokenizer: False).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return False
    found = [checkpoint / name for name in TOKENIZER_FILES if (checkpoint / name).is_file()]
    if not found:
        return False
    target.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.copyfile(path, target / path.name)
    return True
