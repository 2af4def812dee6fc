"""PEFT's greedy answers to text prompts, tokenized and decoded as TensorRT-LLM's llmapi model does
(``add_special_tokens`` on encode, special tokens skipped on decode): the reference the CPU model of that
engine must match token for token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def peft_text_answers(base: Path, folder: Path | None, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """The base's answers with the adapter at ``folder`` loaded by PEFT (None: the base alone)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if folder is not None:
        model = PeftModel.from_pretrained(model, folder).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=0,
            )
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out
