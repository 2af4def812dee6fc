"""``verify`` for vision-language models: logits on text prompts and on image prompts.

The fine-tune, the base, the base with the adapter (through PEFT, as users serve it) and the floor (the
base plus the fine-tune's whole delta on every module the adapter carries) are compared on random token
sequences and on prompts that start with an image: a synthetic pixel tensor, seeded, in the tower's
input size. An adapter of the language model alone leaves the tower's and projector's changes out: the
image check shows what that costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.architecture import ArchitectureMap, find_map
from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.jobs.verify import added, agreement_figures, module_weight


def is_vision_language(config: dict[str, Any] | None) -> bool:
    """A config whose family map has parts (a VLM's language model, tower, projector)."""
    amap = find_map(config)
    return amap is not None and bool(amap.components) and "vision_config" in (config or {})


def image_prompts_built_for(config: dict[str, Any] | None) -> bool:
    """Whether image prompts can be built for this VLM here: LLaVA-style (one token per patch) only."""
    amap = find_map(config)
    return amap is not None and amap.family == "llava"


def image_tokens(config: Any) -> int:
    """Image tokens one image takes in a LLaVA-style prompt: one per patch (plus CLS with ``full``)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


def _inputs(config: Any, *, seed: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Text prompts (no image token) and image prompts (the image's tokens, then text), one per entry."""
    gen = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    image_id = config.image_token_index
    size = config.vision_config.image_size
    n = image_tokens(config)

    def tokens(length: int) -> torch.Tensor:
        t = torch.randint(0, vocab - 1, (1, length), generator=gen)
        return torch.where(t >= image_id, t + 1, t) % vocab  # never the image token

    text = [{"input_ids": tokens(48)} for _ in range(6)]
    image = [
        {
            "input_ids": torch.cat([torch.full((1, n), image_id), tokens(24)], dim=1),
            "pixel_values": torch.randn(1, 3, size, size, generator=gen),
            "first": torch.tensor(n),
        }
        for _ in range(6)
    ]
    return {"text": text, "image": image}


@torch.no_grad()
def _log_probs(model: Any, prompts: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        inputs = {k: v for k, v in p.items() if k != "first"}
        logits = model(**inputs).logits[0, int(p.get("first", 0)) :]
        out.append(torch.log_softmax(logits.float(), -1))
    return out


def vlm_logit_agreement(base: Path, finetuned: Path, adapter_dir: Path, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{"text": …, "image": …}``: the figures of :func:`~phlora_nim.jobs.verify.logit_agreement` on text
    prompts and on image prompts."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    ft_model = AutoModelForImageTextToText.from_pretrained(str(finetuned), dtype=torch.float32).eval()
    base_model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32).eval()
    amap: ArchitectureMap | None = find_map(ft_model.config.to_dict())
    prompts = _inputs(ft_model.config, seed=seed)
    ft_lp = {kind: _log_probs(ft_model, p) for kind, p in prompts.items()}
    base_lp = {kind: _log_probs(base_model, p) for kind, p in prompts.items()}
    carried = load_peft(adapter_dir)
    weights = [
        (name, module_weight(ft_model, amap, name) - module_weight(base_model, amap, name)) for name in carried.modules
    ]
    with added(base_model, weights, carried.lora_biases) as floor_model:
        floor_lp = {kind: _log_probs(floor_model, p) for kind, p in prompts.items()}
    del ft_model
    adapted = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    ad_lp = {kind: _log_probs(adapted, p) for kind, p in prompts.items()}
    return {kind: agreement_figures(ft_lp[kind], ad_lp[kind], base_lp[kind], floor_lp[kind]) for kind in prompts}
