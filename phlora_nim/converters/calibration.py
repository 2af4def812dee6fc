"""Input statistics of a base model's linear modules, for activation-aware extraction.

Forward pre-hooks on the base model (transformers) accumulate each module's input second moment
C = Σ x xᵀ over the tokens of a few calibration prompts. Modules fed the very same tensor (q/k/v
after the attention norm, gate/up after the MLP norm) share one matrix, so memory is one
``in × in`` float32 matrix per distinct input (about 0.4 GB for a 30-layer, 576-wide model),
whatever the number of prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.whitening import DEFAULT_RIDGE, cholesky_factor
from phlora_nim.core.errors import InputError

log = logging.getLogger("phlora_nim.calibration")

MAX_PROMPT_TOKENS = 512


def read_prompts(path: Path, *, where: str = "--prompts") -> list[str]:
    """Non-empty lines of a UTF-8 text file, one prompt each.

    Raises:
        InputError: missing, unreadable or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "prompts file not found",
            where=f"{where} {path}",
            expected="a text file with one prompt per line",
            found="no such file",
            fix="check the path",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"unreadable prompts file ({exc})",
            where=f"{where} {path}",
            expected="UTF-8 text",
            fix="re-save it as UTF-8",
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(
            "prompts file is empty",
            where=f"{where} {path}",
            expected="one prompt per line",
            found="no non-blank line",
            fix="add prompts, one per line",
        )
    return lines


def load_tokenizer(*folders: Path, purpose: str = "--prompts") -> Any:
    """The first tokenizer saved in ``folders`` (a fine-tune's, else the base's)."""
    from transformers import AutoTokenizer

    for folder in folders:
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError):
            continue
    raise InputError(
        f"no tokenizer to encode {purpose}",
        where=" and ".join(str(f) for f in folders),
        expected="tokenizer files saved with the model",
        found="none",
        fix="save the tokenizer beside the model (tokenizer.save_pretrained)",
    )


def encode_prompt(tokenizer: Any, text: str, *, chat: bool | None = None) -> list[int]:
    """Token ids of ``text`` as the served model sees a request: through the chat template when the
    tokenizer has one (a user turn and the assistant's generation prompt), else as plain text."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:
        ids = list(tokenizer(text, add_special_tokens=True).input_ids)
    return ids[:MAX_PROMPT_TOKENS]


@dataclass
class InputStatistics:
    """Second moments of linear-module inputs, shared by modules with the same input.

    Attributes:
        moments: group → Σ x xᵀ (float32, ``[in, in]``).
        tokens: group → number of tokens accumulated.
        groups: module path → its group (the first module seen with that input).
        ridge: relative ridge of the Cholesky factor.
    """

    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    ridge: float = DEFAULT_RIDGE
    _chol: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def cholesky(self, module: str) -> torch.Tensor | None:
        """L with L Lᵀ = E[x xᵀ] + ridge for ``module``'s input; None when it was never reached."""
        group = self.groups.get(module)
        if group is None or not self.tokens.get(group):
            return None
        if group not in self._chol:
            self._chol[group] = cholesky_factor(self.moments[group] / self.tokens[group], ridge=self.ridge)
        return self._chol[group]

    def summary(self) -> dict[str, Any]:
        return {
            "modules": len(self.groups),
            "distinct_inputs": len(self.moments),
            "tokens": max(self.tokens.values(), default=0),
            "ridge": self.ridge,
            "moment_bytes": sum(m.numel() * m.element_size() for m in self.moments.values()),
        }


@torch.no_grad()
def collect_input_statistics(
    model: Any,
    token_lists: Sequence[list[int]],
    modules: Iterable[str],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    ridge: float = DEFAULT_RIDGE,
) -> InputStatistics:
    """Run ``model`` over the prompts and accumulate the input second moment of every module.

    Args:
        model: a transformers causal LM (the *base* model: adapters are applied to its inputs).
        token_lists: encoded prompts (padding positions never count).
        modules: module paths (``model.layers.0.self_attn.q_proj``) whose inputs to measure.
    """
    stats = InputStatistics(ridge=ridge)
    mask_state: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # per forward: id(input) → (input, its group)

    def hook(name: str):
        def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            owner = seen.get(id(x))
            if owner is not None and owner[0] is x:
                stats.groups.setdefault(name, owner[1])
                if stats.groups[name] != name:
                    return
            seen[id(x)] = (x, name)  # keeps x alive, so its id cannot be reused during this pass
            stats.groups.setdefault(name, name)
            if stats.groups[name] != name:
                return
            flat = x.detach().reshape(-1, x.shape[-1])[mask_state["mask"]].float()
            acc = stats.moments.get(name)
            if acc is None:
                acc = stats.moments[name] = torch.zeros(x.shape[-1], x.shape[-1])
            acc.addmm_(flat.T, flat)
            stats.tokens[name] = stats.tokens.get(name, 0) + int(flat.shape[0])

        return pre_hook

    handles = []
    try:
        for name in modules:
            try:
                sub = model.get_submodule(name)
            except AttributeError:
                log.warning("calibration: no module %s in the base model; plain SVD for it", name)
                continue
            handles.append(sub.register_forward_pre_hook(hook(name)))
        for start in range(0, len(token_lists), batch_size):
            chunk = token_lists[start : start + batch_size]
            width = max(len(t) for t in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, t in enumerate(chunk):  # right padding: real tokens keep positions 0…n-1
                ids[i, : len(t)] = torch.tensor(t)
                att[i, : len(t)] = 1
            mask_state["mask"] = att.reshape(-1).bool()
            seen.clear()
            model(input_ids=ids, attention_mask=att, use_cache=False)
        seen.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def base_input_statistics(
    base: Path, prompts: Path, modules: Iterable[str], *, ridge: float = DEFAULT_RIDGE, where: str = "--calibration"
) -> InputStatistics:
    """:func:`collect_input_statistics` for a base checkpoint folder and a prompts file."""
    from transformers import AutoModelForCausalLM

    lines = read_prompts(prompts, where=where)
    tokenizer = load_tokenizer(Path(base), purpose=where)
    tokens = [encode_prompt(tokenizer, line) for line in lines]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stats = collect_input_statistics(model, tokens, modules, pad_id=pad, ridge=ridge)
    log.info(
        "calibration: %d prompts, %d tokens, %d distinct module inputs",
        len(lines),
        stats.summary()["tokens"],
        len(stats.moments),
    )
    return stats
