"""Does a fine-tune belong to its base? Checked before any decomposition.

An adapter is a change of weights applied on the base as served. Two things make it meaningless:

- the fine-tune changed a **config field no adapter can carry** (rope base or scaling, context
  length, activation, norm epsilon, window, soft-capping …): base + adapter would run with the
  base's value, not the fine-tune's;
- the fine-tune is **not derived from this base** at all (another base of the same shapes). Its
  weights are then unrelated to the base's. Measured cheaply on a sample of linear modules by the
  cosine similarity between W_base and W_ft (⟨W_b, W_f⟩ / ‖W_b‖‖W_f‖) beside the relative size of
  the change ‖ΔW‖/‖W_b‖.

Why the cosine and its threshold: fine-tuning moves each weight matrix a small step from where it
started, so W_ft keeps the base inside it: real full fine-tunes of LLMs sit above 0.99, and even
the toy fine-tunes of this project (tiny models, AdamW at a learning rate of 3e-3, where the change
reaches 0.7–1.3× the base's norm) keep 0.65–0.82 (measured). Two independently trained or initialised models
have nearly orthogonal weights: |cos| ≈ 1/√(elements), a few hundredths for a 64×64 matrix and
less for real ones. :data:`MIN_COSINE` = 0.2 lies between with a wide margin on both sides. The
relative change alone cannot separate them (unrelated weights give √2 ≈ 1.41, inside the toy
fine-tunes' range), so it is reported, not judged.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from phlora_nim.converters.checkpoint import Checkpoint
from phlora_nim.core.errors import InputError, PhloraError

log = logging.getLogger("phlora_nim.belonging")

# Median cosine(W_base, W_ft) over the sampled modules below which the fine-tune is not of this base.
MIN_COSINE = 0.2
# Modules sampled (spread over the depth): enough for a stable median, cheap next to the extraction.
SAMPLE = 8
ALLOW_FLAG = "--allow-mismatch"

# config.json fields that change what the model computes and that no LoRA adapter can carry. Sizes
# and layer counts are checked elsewhere (they change tensor shapes); the vocabulary and tied
# embeddings are handled as embedding changes.
CARRIED_BY_NO_ADAPTER = (
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rotary_emb_base",
    "rotary_pct",
    "partial_rotary_factor",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "hidden_act",
    "hidden_activation",
    "activation_function",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "norm_epsilon",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "attention_bias",
    "mlp_bias",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "num_experts_per_tok",
    "norm_topk_prob",
    "position_embedding_type",
)


def config_mismatch(base: Checkpoint, ft: Checkpoint, *, allow: bool = False) -> list[PhloraError]:
    """One error naming every field of :data:`CARRIED_BY_NO_ADAPTER` on which the configs differ
    (a warning instead with ``allow``)."""
    if base.config is None or ft.config is None:
        return []
    differ = [
        f"{key} (base {base.config.get(key)!r}, fine-tune {ft.config.get(key)!r})"
        for key in CARRIED_BY_NO_ADAPTER
        if base.config.get(key) != ft.config.get(key)
    ]
    if not differ:
        return []
    if allow:
        log.warning("%s: config fields no adapter can carry differ, ignored: %s", ft.path, "; ".join(differ))
        return []
    return [
        InputError(
            f"the fine-tune changed config fields no adapter can carry: {', '.join(d.split(' ')[0] for d in differ)}",
            where=f"{ft.path}/config.json",
            expected="the base's values (base + adapter runs with them)",
            found="; ".join(differ),
            fix=f"pass the base this model was fine-tuned from, serve the fine-tune whole, or pass {ALLOW_FLAG} "
            "to extract anyway (the adapter then runs with the base's values)",
        )
    ]


@dataclass(frozen=True)
class Similarity:
    """How much of the base the fine-tune's weights keep, over a sample of linear modules."""

    modules: int
    median_cosine: float
    median_relative_change: float
    lowest: str  # the sampled module with the lowest cosine

    def to_json(self) -> dict[str, object]:
        return {
            "modules_sampled": self.modules,
            "median_cosine": self.median_cosine,
            "median_relative_change": self.median_relative_change,
            "min_cosine": MIN_COSINE,
            "lowest_module": self.lowest,
        }


def _sample(names: Sequence[str]) -> list[str]:
    if len(names) <= SAMPLE:
        return list(names)
    step = (len(names) - 1) / (SAMPLE - 1)
    return [names[round(i * step)] for i in range(SAMPLE)]


def _cosine(base: torch.Tensor, ft: torch.Tensor) -> tuple[float, float]:
    """(cos(W_b, W_f), ‖W_f − W_b‖/‖W_b‖) in float64 accumulation, row block by row block."""
    b2, f2 = base.reshape(base.shape[0], -1), ft.reshape(ft.shape[0], -1)
    bb = ff = bf = 0.0
    for i in range(0, b2.shape[0], 256):
        b, f = b2[i : i + 256].double(), f2[i : i + 256].double()
        bb += float((b * b).sum())
        ff += float((f * f).sum())
        bf += float((b * f).sum())
    if bb == 0.0 or ff == 0.0:
        return (1.0 if bb == ff else 0.0), (0.0 if bb == ff else math.inf)
    change = max(bb + ff - 2 * bf, 0.0)
    return bf / math.sqrt(bb * ff), math.sqrt(change / bb)


def weight_similarity(base: Checkpoint, ft: Checkpoint, weights: Sequence[str]) -> Similarity | None:
    """:class:`Similarity` over up to :data:`SAMPLE` of ``weights`` spread over the list (None: none)."""
    rows = []
    for name in _sample(weights):
        cos, rel = _cosine(base.load(name), ft.load(name))
        if math.isfinite(cos):
            rows.append((name, cos, rel))
    if not rows:
        return None
    lowest = min(rows, key=lambda r: r[1])
    return Similarity(
        modules=len(rows),
        median_cosine=statistics.median(r[1] for r in rows),
        median_relative_change=statistics.median(r[2] for r in rows),
        lowest=lowest[0].removesuffix(".weight"),
    )


def unrelated_weights(sim: Similarity | None, base: Checkpoint, ft: Checkpoint, *, allow: bool) -> list[PhloraError]:
    """The error for a fine-tune whose weights do not come from ``base`` (a warning with ``allow``)."""
    if sim is None or sim.median_cosine >= MIN_COSINE:
        return []
    found = (
        f"median cosine(W_base, W_ft) {sim.median_cosine:.3f} over {sim.modules} linear modules (lowest in "
        f"{sim.lowest}); the weights changed by {sim.median_relative_change:.0%} of their norm"
    )
    if allow:
        log.warning("%s does not look like a fine-tune of %s (%s); extracting anyway", ft.path, base.path, found)
        return []
    return [
        InputError(
            "the fine-tune's weights are unrelated to the base's: it is not a fine-tune of this base",
            where=f"{ft.path} vs {base.path}",
            expected=f"a median cosine ≥ {MIN_COSINE} (fine-tunes keep the base inside their weights: real ones "
            "above 0.99; unrelated models of the same shapes are near 0)",
            found=found,
            fix=f"pass the base this model was fine-tuned from, or {ALLOW_FLAG} to extract anyway",
        )
    ]
