"""A small LLaVA-style vision-language model built from a config and fully fine-tuned on CPU.

A CLIP vision tower, the two-layer projector and a Llama language model, as LLaVA 1.5 has them, small
enough to fine-tune in seconds: real transformers classes, real optimizer steps on text and on images
(synthetic pixel tensors), real ``save_pretrained`` folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from phlora_nim.demo.toy_models import _COMMON, training_batch
from phlora_nim.jobs.vlm_verify import image_tokens

IMAGE_TOKEN = 95  # the last id of the toy vocabulary


def tiny_llava_config() -> Any:
    """A LLaVA config: CLIP tower (28×28 images, 14×14 patches: 4 image tokens), Llama language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
    )
    text = LlamaConfig(**_COMMON)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def image_batch(config: Any, *, batch: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompts of an image (a synthetic pixel tensor) followed by text the seed's rule generates.

    The image's pixels set where the text starts, so the fine-tune must read the image to predict it.
    """
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    text = training_batch(config.text_config.vocab_size - 1, batch=batch, length=length, seed=seed)
    start = (pixels.mean(dim=(1, 2, 3)) > 0).long() * 7  # two image classes, two starts
    text = (text + start[:, None]) % (config.text_config.vocab_size - 4) + 3
    n = image_tokens(config)
    ids = torch.cat([torch.full((batch, n), config.image_token_index), text], dim=1)
    labels = ids.clone()
    labels[:, :n] = -100
    return {"input_ids": ids, "pixel_values": pixels, "labels": labels}


def make_llava_pair(root: Path, *, steps: int = 12, seed: int = 0, linear_only: bool = False) -> tuple[Path, Path]:
    """Save a tiny LLaVA and its full fine-tune (text and image batches) under ``root/base``, ``root/finetuned``.

    Every weight trains except the embeddings and the head, so the tower and the projector change too; with
    ``linear_only`` only the linear weights of the language model, the tower's encoder and the projector do
    (a full-rank adapter of every part then reproduces the fine-tune exactly).
    """
    from transformers import LlavaForConditionalGeneration

    root = Path(root)
    torch.manual_seed(seed)
    config = tiny_llava_config()
    model = LlavaForConditionalGeneration(config).float()
    base_dir, ft_dir = root / "base", root / "finetuned"
    model.eval().save_pretrained(base_dir)
    frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    params = [p for p in model.parameters() if id(p) not in frozen]
    if linear_only:
        inner = model.model
        parts = (
            inner.language_model.layers,
            inner.vision_tower.vision_model.encoder
            if hasattr(inner.vision_tower, "vision_model")
            else inner.vision_tower.encoder,
            inner.multi_modal_projector,
        )
        linear = {id(m.weight) for part in parts for m in part.modules() if isinstance(m, torch.nn.Linear)}
        params = [p for p in params if id(p) in linear]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    images = image_batch(config, seed=seed)
    text = training_batch(config.text_config.vocab_size - 1, seed=seed)
    model.train()
    for _ in range(steps):
        loss = model(**images).loss + model(input_ids=text, labels=text).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval().save_pretrained(ft_dir)
    return base_dir, ft_dir
