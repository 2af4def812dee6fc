"""Fidelity of extracted adapters to their fine-tune, measured on prompts.

A :class:`FidelityProbe` scores an adapter against the fine-tune (KL, top-1, exact match) on
prompts; it is what ``--target-recovery`` / ``--target-kl`` search on and what the calibration
check uses. The bench-only half (tasks, fine-tuning, sweeps) is in
:mod:`phlora_nim.testing.fidelity_tasks`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.calibration import encode_prompt
from phlora_nim.converters.rank_policy import DECISIVE_P
from phlora_nim.jobs.verify import common_prefix, compare_log_probs, log_probs, merged

log = logging.getLogger("phlora_nim.fidelity")

GENERIC_PROMPTS = "generic_prompts.txt"


def generic_prompts_path() -> Path:
    """The generic prompts shipped with phlora-nim (no task data): a default for fidelity checks."""
    return Path(str(resources.files("phlora_nim.jobs").joinpath("prompts", GENERIC_PROMPTS)))


def decisive_mask(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Which rows of two log-prob tables ``[positions, vocab]`` are decisive choices of the fine-tune:
    probability ≥ :data:`DECISIVE_P` on a token the base would not pick first."""
    return (finetuned.argmax(-1) != base.argmax(-1)) & (finetuned.max(-1).values >= math.log(DECISIVE_P))


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    pad_id: int,
    eos_id: int | None,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuations (end token and what follows cut off), prompts left-padded in batches."""
    outs: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            att[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=att,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for row in gen[:, width:].tolist():
            outs.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return outs


def token_ids(tokenizer: Any) -> tuple[int, int | None]:
    """(pad id, end id) of a tokenizer, pad falling back to end, then 0."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return int(pad), (int(eos) if eos is not None else None)


@dataclass
class FidelityProbe:
    """The fine-tune's behaviour on a prompt set, against which adapters on the base are measured.

    Each prompt is extended by a continuation: the fine-tuned model's own greedy answer (default), or
    given ones (a task's right answers). The scored positions are those predicting the continuation,
    so KL and top-1 measure the adapter where the fine-tune's behaviour lies, not on shared prompt
    text. One forward pass per adapter also gives exact match: greedy decoding yields the
    continuation exactly when every scored position's argmax is its next token.
    """

    base_model: Any
    sequences: list[list[int]]
    starts: list[int]
    reference: list[torch.Tensor]
    continuations: list[list[int]]
    shared_prefix: int = 0
    base_reference: list[torch.Tensor] | None = None  # the base model's log-probs, when already computed
    _decisive: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # see decisive_masks

    @property
    def tokens(self) -> int:
        return sum(r.shape[0] for r in self.reference)

    @classmethod
    def build(
        cls,
        base_model: Any,
        finetuned_model: Any,
        prompts: Sequence[list[int]],
        *,
        continuation: int = 16,
        pad_id: int = 0,
        eos_id: int | None = None,
        continuations: Sequence[list[int]] | None = None,
        reference: list[torch.Tensor] | None = None,
        base_reference: list[torch.Tensor] | None = None,
    ) -> FidelityProbe:
        """Score ``prompts`` along ``continuations`` (default: the fine-tune's greedy answers);
        ``reference`` / ``base_reference``: the fine-tune's / the base's log-probs at the scored
        positions, when already computed."""
        if continuations is None:
            conts = greedy_generate(finetuned_model, prompts, continuation, pad_id=pad_id, eos_id=eos_id)
            continuations = [[*c, eos_id] if eos_id is not None and len(c) < continuation else list(c) for c in conts]
        sequences, starts, kept = [], [], []
        for p, c in zip(prompts, continuations, strict=True):
            answer = list(c) or [pad_id]
            # Feed prompt + answer[:-1]: position len(p)-1+j predicts answer[j].
            sequences.append([*p, *answer[:-1]])
            starts.append(len(p) - 1)
            kept.append(answer)
        prefix = common_prefix(sequences, starts)
        if reference is None:
            reference = log_probs(finetuned_model, sequences, starts=starts, shared_prefix=prefix)
        return cls(base_model, sequences, starts, reference, kept, prefix, base_reference)

    def _log_probs(self, model: Any) -> list[torch.Tensor]:
        return log_probs(model, self.sequences, starts=self.starts, shared_prefix=self.shared_prefix)

    def measure(self, adapter: LoraAdapter | None) -> tuple[float, float]:
        """The same for base + ``adapter`` (merged into the base model's weights, then restored)."""
        return self.measure_all(adapter)[:2]

    def measure_all(self, adapter: LoraAdapter | None, model: Any = None) -> tuple[float, float, float]:
        """(KL, top-1, share of prompts whose greedy answer is exactly the continuation) of base +
        ``adapter`` (or of ``model``), in one forward pass."""
        ctx = contextlib.nullcontext(model) if model is not None else self._with(adapter)
        with ctx as m:
            logps = self._log_probs(m)
        kl, top1, _ = compare_log_probs(self.reference, logps)
        exact = sum(
            bool((lp.argmax(-1) == torch.tensor(c[: lp.shape[0]])).all())
            for lp, c in zip(logps, self.continuations, strict=True)
        )
        return kl, top1, exact / max(1, len(logps))

    def _with(self, adapter: LoraAdapter | None) -> contextlib.AbstractContextManager[Any]:
        return merged(self.base_model, adapter) if adapter is not None else contextlib.nullcontext(self.base_model)

    def scores(self, model: Any) -> ProbeScores:
        """:class:`ProbeScores` of ``model`` (as it is now: patched or not) on this probe."""
        return self._scores(self._log_probs(model))

    def base_scores(self) -> ProbeScores:
        """:class:`ProbeScores` of the base model alone (from its log-probs when the probe was built with them)."""
        if self.base_reference is None:
            self.base_reference = self._log_probs(self.base_model)
        return self._scores(self.base_reference)

    def decisive_masks(self) -> list[torch.Tensor]:
        """Per sequence, the scored positions where the fine-tune makes a decisive choice: probability
        ≥ :data:`DECISIVE_P` on a token the base model would not pick first."""
        if self._decisive is None:
            if self.base_reference is None:
                self.base_reference = self._log_probs(self.base_model)
            self._decisive = [decisive_mask(r, b) for r, b in zip(self.reference, self.base_reference, strict=True)]
        return self._decisive

    @property
    def decisive_positions(self) -> int:
        return sum(int(m.sum()) for m in self.decisive_masks())

    def _scores(self, logps: list[torch.Tensor]) -> ProbeScores:
        kl, top1, _ = compare_log_probs(self.reference, logps)
        greedy = sum(bool((lp.argmax(-1) == r.argmax(-1)).all()) for lp, r in zip(logps, self.reference, strict=True))
        kept = positions = 0
        for lp, r, mask in zip(logps, self.reference, self.decisive_masks(), strict=True):
            kept += int((lp.argmax(-1) == r.argmax(-1))[mask].sum())
            positions += int(mask.sum())
        decisive = kept / positions if positions else None
        return ProbeScores(kl, top1, greedy / max(1, len(logps)), decisive, positions)


@dataclass(frozen=True)
class ProbeScores:
    """KL(fine-tuned ‖ model) per scored token, top-1 agreement, the share of sequences on which
    the model's greedy choice is the fine-tune's at every scored position (it would continue each
    as the fine-tune does), and the share of the fine-tune's decisive choices (see :data:`DECISIVE_P`)
    the model makes too, with how many there are."""

    kl: float
    top1: float
    greedy: float
    decisive: float | None = None  # share of the fine-tune's decisive choices it makes too (None: there are none)
    decisive_positions: int = 0


class WeightPatcher:
    """Candidate adapters applied to a model by patching its linear weights in place.

    The base weights of the modules touched are copied once; each :meth:`apply` restores the modules
    the previous candidate touched and adds ``B @ A`` (times the scale) to the new ones with one
    ``addmm_`` each: no model is wrapped and nothing is allocated per candidate but the factors.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._originals: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()
        self._biases: list[tuple[torch.nn.Module, torch.Tensor | None]] = []  # (module, original bias or None)

    def _weight(self, name: str) -> torch.Tensor:
        weight = self.model.get_submodule(name).weight
        if name not in self._originals:
            self._originals[name] = weight.detach().clone()
        return weight

    @torch.no_grad()
    def apply(
        self,
        adapter: LoraAdapter | None,
        *,
        full: Iterable[tuple[str, torch.Tensor]] = (),
        biases: dict[str, torch.Tensor] | None = None,
    ) -> Any:
        """Patch the model to base + ``adapter`` (plus the dense ``full`` deltas and the bias changes
        ``biases``, default the adapter's); returns it."""
        self.restore()
        for name, delta in full:
            self._weight(name).add_(delta.to(torch.float32))
            self._touched.add(name)
        if adapter is not None:
            for name, w in adapter.modules.items():
                weight = self._weight(name)
                scale = w.scale(use_rslora=adapter.use_rslora)
                weight.addmm_(w.b.to(weight.dtype), w.a.to(weight.dtype), alpha=scale)
                self._touched.add(name)
        for name, change in (biases if biases is not None else adapter.lora_biases if adapter else {}).items():
            module = self.model.get_submodule(name)
            self._biases.append((module, None if module.bias is None else module.bias.detach().clone()))
            if module.bias is None:
                module.bias = torch.nn.Parameter(torch.zeros_like(change, dtype=module.weight.dtype))
            module.bias.add_(change.to(module.bias.dtype))
        return self.model

    @torch.no_grad()
    def restore(self) -> None:
        """The touched modules back to their base weights and biases, exactly."""
        for name in self._touched:
            self.model.get_submodule(name).weight.copy_(self._originals[name])
        self._touched.clear()
        for module, bias in reversed(self._biases):
            if bias is None:
                module.bias = None
            else:
                module.bias.copy_(bias)
        self._biases.clear()


def load_pair(base: Path, finetuned: Path, *, purpose: str) -> tuple[Any, Any, Any]:
    """(tokenizer, base model, fine-tuned model) of two checkpoint folders, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    from phlora_nim.converters.calibration import load_tokenizer

    tokenizer = load_tokenizer(Path(finetuned), Path(base), purpose=purpose)
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    ft_model = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).eval()
    return tokenizer, base_model, ft_model


def prompts_probe(
    base_model: Any, ft_model: Any, tokenizer: Any, prompts: Sequence[str], *, continuation: int = 16
) -> FidelityProbe:
    """A :class:`FidelityProbe` on prompts encoded as requests (chat template if any), scored along
    the fine-tune's own greedy answers."""
    pad, eos = token_ids(tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    return FidelityProbe.build(base_model, ft_model, encoded, continuation=continuation, pad_id=pad, eos_id=eos)


def probe_for_checkpoints(
    base: Path, finetuned: Path, prompts: Sequence[str] | None, *, continuation: int = 16, self_probes: bool = False
) -> FidelityProbe:
    """A :class:`FidelityProbe` for checkpoint folders: :func:`prompts_probe`, or (``self_probes``) the
    fine-tune's own samples where it disagrees most with its base."""
    purpose = "--self-probes" if self_probes else "the fidelity prompts"
    tokenizer, base_model, ft_model = load_pair(base, finetuned, purpose=purpose)
    if self_probes:
        from phlora_nim.jobs.self_probes import self_probe

        probe = self_probe(base_model, ft_model, tokenizer)
    else:
        probe = prompts_probe(base_model, ft_model, tokenizer, prompts or (), continuation=continuation)
    del ft_model
    return probe


def prompts_gap(base: Path, finetuned: Path, prompts: Sequence[str]) -> tuple[float, int]:
    """Mean KL(fine-tuned ‖ base) per token over the prompts' own tokens (encoded as requests), and how
    many tokens: how much the fine-tune acts on the inputs these prompts give its modules."""
    tokenizer, base_model, ft_model = load_pair(base, finetuned, purpose="--calibration")
    sequences = [encode_prompt(tokenizer, line) for line in prompts]
    kl, _, tokens = compare_log_probs(log_probs(ft_model, sequences), log_probs(base_model, sequences))
    return kl, tokens
