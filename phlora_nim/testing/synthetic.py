"""Synthetic Llama-shaped checkpoint pairs with a realistic fine-tuning delta spectrum.

Used by the benchmarks (full-size shapes, few layers) where real checkpoints cannot be downloaded.
Each linear delta is a power-law low-rank head (σ_i ∝ i^-decay over ``head_rank`` directions)
plus a small full-rank noise floor, the shape measured on real full fine-tunes: most energy in a
few hundred directions, a long flat tail. Writes one safetensors shard per layer, so memory stays
at one layer whatever the depth.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class SyntheticLlama:
    """Shape of the generated model (defaults: Llama-3-8B widths)."""

    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    num_hidden_layers: int = 2
    vocab_size: int = 32000
    dtype: str = "bfloat16"
    head_rank: int = 256
    decay: float = 0.8
    delta_scale: float = 0.02
    noise_share: float = 0.15
    seed: int = 0

    def config(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "torch_dtype": self.dtype,
            "hidden_act": "silu",
        }


def _linear_shapes(spec: SyntheticLlama) -> dict[str, tuple[int, int]]:
    h, i = spec.hidden_size, spec.intermediate_size
    d = h // spec.num_attention_heads
    return {
        "self_attn.q_proj": (spec.num_attention_heads * d, h),
        "self_attn.k_proj": (spec.num_key_value_heads * d, h),
        "self_attn.v_proj": (spec.num_key_value_heads * d, h),
        "self_attn.o_proj": (h, spec.num_attention_heads * d),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def _delta(shape: tuple[int, int], spec: SyntheticLlama, gen: torch.Generator) -> torch.Tensor:
    m, n = shape
    k = min(spec.head_rank, m, n)
    sigma = torch.arange(1, k + 1, dtype=torch.float32).pow(-spec.decay)
    left = torch.randn(m, k, generator=gen) / m**0.5
    right = torch.randn(k, n, generator=gen) / n**0.5
    head = (left * sigma) @ right
    head *= spec.delta_scale / head.norm() * (m * n) ** 0.5 * 1e-2
    noise = torch.randn(m, n, generator=gen)
    noise *= spec.noise_share * head.norm() / noise.norm()
    return head.add_(noise)


def write_synthetic_pair(root: Path, spec: SyntheticLlama = SyntheticLlama()) -> tuple[Path, Path]:
    """Write ``root/base`` and ``root/finetuned`` HF folders (sharded safetensors + index).

    Returns:
        The two folder paths.

    Example:
        >>> base, ft = write_synthetic_pair(Path("/tmp/pair"), SyntheticLlama(num_hidden_layers=1))  # doctest: +SKIP
    """
    root = Path(root)
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(spec.seed)
    folders = (root / "base", root / "finetuned")
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
        (f / "config.json").write_text(json.dumps(spec.config(), indent=2), encoding="utf-8")
    weight_maps: tuple[dict[str, str], dict[str, str]] = ({}, {})
    h = spec.hidden_size

    def emit(shard: str, base_t: dict[str, torch.Tensor], ft_t: dict[str, torch.Tensor]) -> None:
        for folder, tensors, wmap in zip(folders, (base_t, ft_t), weight_maps, strict=True):
            save_file(
                {k: v.to(dtype).contiguous() for k, v in tensors.items()},
                str(folder / shard),
                metadata={"format": "pt"},
            )
            wmap.update(dict.fromkeys(tensors, shard))

    emb = torch.randn(spec.vocab_size, h, generator=gen) * 0.02
    emit(
        "model-embed.safetensors",
        {"model.embed_tokens.weight": emb},
        {"model.embed_tokens.weight": emb + torch.randn(emb.shape, generator=gen) * 1e-4},
    )
    del emb
    for layer in range(spec.num_hidden_layers):
        base_t: dict[str, torch.Tensor] = {}
        ft_t: dict[str, torch.Tensor] = {}
        for mod, shape in _linear_shapes(spec).items():
            name = f"model.layers.{layer}.{mod}.weight"
            w = torch.randn(shape, generator=gen) * 0.02
            base_t[name] = w
            ft_t[name] = w + _delta(shape, spec, gen)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{layer}.{norm}.weight"
            base_t[name] = torch.ones(h)
            ft_t[name] = torch.ones(h) + torch.randn(h, generator=gen) * 1e-3
        emit(f"model-layer{layer:03d}.safetensors", base_t, ft_t)
    head = torch.randn(spec.vocab_size, h, generator=gen) * 0.02
    emit(
        "model-head.safetensors",
        {"lm_head.weight": head, "model.norm.weight": torch.ones(h)},
        {"lm_head.weight": head + torch.randn(head.shape, generator=gen) * 1e-4, "model.norm.weight": torch.ones(h)},
    )
    for folder, wmap in zip(folders, weight_maps, strict=True):
        index = {"metadata": {"generator": "phlora-nim synthetic", "spec": asdict(spec)}, "weight_map": wmap}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return folders
