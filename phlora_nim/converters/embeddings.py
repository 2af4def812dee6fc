"""Tied output heads and resized vocabularies, as checkpoints hold them.

A model with tied embeddings (``tie_word_embeddings``, the default of many small models) stores
no ``lm_head.weight``: its output head *is* the input embedding. The base and the fine-tune may
differ in this. Where one side stores a head and the other ties it, the tied side's head is read
as its embedding (an alias), so the head's change is measured, and saved with ``--extra save``,
like any other tensor. Where both tie, a saved embedding is saved as the head too and the
adapter asks PEFT to keep them tied (``ensure_weight_tying``): PEFT's ``modules_to_save`` copies
``embed_tokens`` alone otherwise, and the head would keep the base's weights.

A resized vocabulary (added tokens) makes the fine-tune's embedding and head taller than the
base's. LoRA cannot carry that; ``--extra save`` keeps the tensors whole, and the base must be
resized to the fine-tune's vocabulary before the adapter is loaded (:func:`load_instructions`).
"""

from __future__ import annotations

from phlora_nim.converters.checkpoint import Checkpoint

HEAD = "lm_head.weight"
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def input_embedding(ckpt: Checkpoint) -> str | None:
    """The name of the input embedding tensor (None: none found)."""
    for suffix in _EMBEDDING_SUFFIXES:
        for name in ckpt.tensors:
            if name == suffix or name.endswith("." + suffix):
                return name
    return None


def is_tied(ckpt: Checkpoint) -> bool:
    """True when ``ckpt`` serves its output head from its input embedding (no head tensor stored,
    and config.json does not say the two are separate)."""
    if HEAD in ckpt.tensors and HEAD not in ckpt.aliases:
        return False
    if HEAD in ckpt.aliases:
        return True
    tie = (ckpt.config or {}).get("tie_word_embeddings", True)
    return tie is not False and input_embedding(ckpt) is not None


def align_heads(base: Checkpoint, ft: Checkpoint) -> None:
    """Where one side stores ``lm_head.weight`` and the other ties it, alias the tied side's head to
    its embedding, so both sides have the tensor (idempotent)."""
    for side, other in ((base, ft), (ft, base)):
        if HEAD in other.tensors and HEAD not in side.tensors and is_tied(side):
            embedding = input_embedding(side)
            if embedding is not None:
                side.alias(HEAD, embedding)


def both_tied(base: Checkpoint, ft: Checkpoint) -> bool:
    """Base and fine-tune both tie their head to the embedding (no head tensor on either side)."""
    return HEAD not in base.tensors and HEAD not in ft.tensors and is_tied(base) and is_tied(ft)


def load_instructions(base_model: str, vocab: int | None, *, resized: bool, tied: bool) -> str:
    """How to load an adapter with saved (and possibly resized) embeddings under PEFT."""
    lines = [
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
    ]
    if resized and vocab is not None:
        lines.append(f"base.resize_token_embeddings({vocab})  # the fine-tune's vocabulary, before the adapter")
    lines.append("model = PeftModel.from_pretrained(base, ADAPTER_DIR)")
    if tied:
        lines.append("# embed_tokens and lm_head are both saved and kept tied (ensure_weight_tying)")
    return "\n".join(lines)
