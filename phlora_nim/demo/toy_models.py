"""Small causal LMs of each supported family, built from a config and fully fine-tuned on CPU.

They stand in for real checkpoints (which cannot be downloaded everywhere) in the demo and the
tests: real transformers models, real optimizer steps, real ``save_pretrained`` folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe")

_COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def tiny_config(family: str, **overrides: Any) -> Any:
    """A transformers config of ``family`` small enough to train in seconds on a CPU."""
    import transformers

    kwargs = dict(_COMMON)
    cls_name = {
        "llama": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "gemma": "GemmaConfig",
        "gemma2": "Gemma2Config",
        "phi3": "Phi3Config",
        "mixtral": "MixtralConfig",
        "qwen3_moe": "Qwen3MoeConfig",
    }.get(family)
    if cls_name is None:
        raise ValueError(f"unknown toy family {family!r}; choose from {', '.join(FAMILIES)}")
    if family in ("gemma", "gemma2", "qwen3", "qwen3_moe"):
        kwargs["head_dim"] = 24  # heads × head_dim (96) ≠ hidden (64), as in real Gemma
    if family == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen3_moe":
        # The last layer keeps a dense MLP, as mlp_only_layers allows: both kinds of layer are covered.
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)
        kwargs.update(mlp_only_layers=[kwargs["num_hidden_layers"] - 1])
    if family == "phi3":
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return getattr(transformers, cls_name)(**kwargs)


def build_model(family: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised causal LM of ``family`` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return model.eval()


def training_batch(vocab: int, *, batch: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    """Token sequences with a learnable rule: each token is the previous one plus a stride.

    The stride depends on the seed (5, 11, 17, 23, …), so fine-tunes with different seeds learn
    visibly different behaviour.
    """
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(3, vocab, (batch, 1), generator=gen)
    steps = torch.arange(length)
    return (start * 7 + steps * stride_for(seed)) % (vocab - 3) + 3


def stride_for(seed: int) -> int:
    """The stride :func:`training_batch` teaches for ``seed``."""
    return 5 + 6 * (seed % 8)


def finetune(
    model: Any,
    *,
    steps: int = 12,
    lr: float = 3e-3,
    seed: int = 0,
    freeze_embeddings: bool = False,
    linear_only: bool = False,
) -> Any:
    """Full fine-tuning for ``steps`` AdamW steps on :func:`training_batch`.

    Every parameter trains, except the input embeddings and ``lm_head`` when ``freeze_embeddings``
    (as many instruction fine-tunes do, and as LoRA can then capture the whole change). With
    ``linear_only`` only the decoder's linear weights train: a full-rank adapter then reproduces
    the fine-tune exactly.
    """
    torch.manual_seed(seed)
    model.train()
    frozen = {id(p) for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    params = [p for p in model.parameters() if not (freeze_embeddings and id(p) in frozen)]
    if linear_only:
        # Linear weights, MoE routers and fused 3-D expert tensors: every ≥ 2-D parameter of the decoder layers.
        linear = {id(p) for p in _decoder_layers(model).parameters() if p.dim() >= 2}
        params = [p for p in params if id(p) in linear]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = training_batch(model.config.vocab_size, seed=seed)
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def _decoder_layers(model: Any) -> torch.nn.Module:
    """The decoder layers of a causal LM, or of a vision-language model's language model."""
    inner = model.model
    return inner.layers if hasattr(inner, "layers") else inner.language_model.layers


# Readable words for the toy vocabulary, so generated text in the demo is legible.
_WORDS = (  # noqa: SIM905 (one readable block)
    "the a an one two three red blue green small large fast slow cat dog bird fish tree river hill city road "
    "house light night day sun moon star rain wind snow fire stone gold iron wood glass paper book song word "
    "name time year hand eye door window table chair bread milk tea water salt sugar apple pear plum grape "
    "lemon rice bean corn wheat sheep horse cow goat mouse frog bee ant owl fox wolf bear deer hawk crow swan "
    "duck goose king queen knight ship boat train plane car wheel"
).split()


def save_tokenizer(folder: Path, vocab_size: int = _COMMON["vocab_size"]) -> None:
    """A word-level tokenizer over the toy vocabulary: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", *_WORDS][:vocab_size]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    fast.save_pretrained(folder)


def make_pair(
    family: str,
    root: Path,
    *,
    steps: int = 12,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    freeze_embeddings: bool = False,
    tokenizer: bool = False,
    linear_only: bool = False,
    **overrides: Any,
) -> tuple[Path, Path]:
    """Save a base model and its full fine-tune under ``root/base`` and ``root/finetuned``."""
    root = Path(root)
    model = build_model(family, seed=seed, **overrides)
    base_dir, ft_dir = root / "base", root / "finetuned"
    model.to(dtype).save_pretrained(base_dir)
    model.float()
    finetune(model, steps=steps, seed=seed, freeze_embeddings=freeze_embeddings, linear_only=linear_only)
    model.to(dtype).save_pretrained(ft_dir)
    if tokenizer:
        for folder in (base_dir, ft_dir):
            save_tokenizer(folder, model.config.vocab_size)
    return base_dir, ft_dir


def make_finetunes(
    family: str,
    root: Path,
    count: int,
    *,
    steps: int = 12,
    seed: int = 0,
    tokenizer: bool = True,
    freeze_embeddings: bool = True,
    linear_only: bool = False,
    **overrides: Any,
) -> tuple[Path, list[Path]]:
    """One base model and ``count`` different full fine-tunes of it (``root/base``, ``root/ft-<i>``).

    Each fine-tune learns from its own data seed, so their adapters differ.
    """
    root = Path(root)
    base_dir = root / "base"
    model = build_model(family, seed=seed, **overrides)
    model.save_pretrained(base_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tokenizer:
        save_tokenizer(base_dir, model.config.vocab_size)
    folders = []
    for i in range(count):
        model.load_state_dict(state)
        finetune(model, steps=steps, seed=seed + 1 + i, freeze_embeddings=freeze_embeddings, linear_only=linear_only)
        folder = root / f"ft-{i}"
        model.save_pretrained(folder)
        if tokenizer:
            save_tokenizer(folder, model.config.vocab_size)
        folders.append(folder)
    return base_dir, folders


def greedy_continuation(
    checkpoint: Path, prompt: list[int], max_new_tokens: int, *, adapter: Path | None = None, eos_token_id: int = 2
) -> list[int]:
    """Greedy decoding run directly in PyTorch (PEFT on top when ``adapter`` is given), end token excluded.

    The reference the served outputs are compared with.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens
