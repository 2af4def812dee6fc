"""--self-probes: the fine-tune writes its own probe set, kept where it disagrees most with its base.

The CLI path (refusal of generic prompts, recovery on self-probes keeping a hidden behaviour) is in
test_target_kl.py; here the pieces: where sampling starts, which samples are kept, and the refusal
of a fine-tune that writes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from phlora_nim.core.errors import InputError


@pytest.fixture(scope="module")
def pair(llama_pair_with_tokenizer: tuple[Path, Path]) -> tuple[object, object, object]:
    """(tokenizer, base model, fine-tuned model): a toy Llama and a full fine-tune of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ft = llama_pair_with_tokenizer
    tok = AutoTokenizer.from_pretrained(ft)
    return tok, AutoModelForCausalLM.from_pretrained(base).eval(), AutoModelForCausalLM.from_pretrained(ft).eval()


def test_openings_follow_the_chat_template_else_the_start_token(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from phlora_nim.demo.toy_models import save_tokenizer
    from phlora_nim.jobs.self_probes import OPENING_TURNS, openings

    save_tokenizer(tmp_path)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert openings(tok) == [[tok.bos_token_id]]
    tok.chat_template = (  # "king" opens a user turn, "queen" the assistant's
        "{% for m in messages %}<s> king {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> queen {% endif %}"
    )
    starts = [tok.convert_ids_to_tokens(o) for o in openings(tok)]
    assert len(starts) == len(OPENING_TURNS)
    assert starts[0] == ["<s>", "king", "</s>", "<s>", "queen"]  # the empty user turn
    assert all(s[:2] == ["<s>", "king"] and s[-2:] == ["<s>", "queen"] for s in starts)
    assert all(len(s) > len(starts[0]) for s in starts[1:])  # each non-empty turn's words (unknown here) inside


def test_kept_samples_are_those_where_the_finetune_disagrees_most(pair) -> None:
    from phlora_nim.jobs.fidelity import token_ids
    from phlora_nim.jobs.self_probes import SelfProbeSettings, openings, rank_by_disagreement, sample, self_probe

    tok, base_model, ft_model = pair
    settings = SelfProbeSettings(temperatures=(1.0,), per_start=12, length=8, keep=4, decisive=0, seed=3)
    probe = self_probe(base_model, ft_model, tok, settings)
    assert len(probe.sequences) == settings.keep
    # The same samples again (same seed, one sampling call of 12 rows), every one scored: the kept
    # ones are the top of the ranking.
    pad, eos = token_ids(tok)
    torch.manual_seed(settings.seed)
    (start,) = openings(tok)
    samples = sample(ft_model, [start] * 12, [1.0] * 12, length=8, pad_id=pad, eos_id=eos)
    assert len(samples) >= 2 * settings.keep  # else the probe sampled a second round
    ranked = rank_by_disagreement(base_model, samples)
    assert [r.kl for r in ranked] == sorted((r.kl for r in ranked), reverse=True)
    kept = [[*r.start, *r.continuation[:-1]] for r in ranked[: settings.keep]]
    assert probe.sequences == kept and probe.continuations == [r.continuation for r in ranked[: settings.keep]]
    assert len(ranked) > settings.keep and ranked[settings.keep - 1].kl > ranked[-1].kl
    # Scored along those continuations: the base alone is at least as far as the least kept sample,
    # and its scores kept from the ranking pass are what a fresh pass of the base gives.
    base_kl, _ = probe.measure(None)
    assert base_kl >= ranked[settings.keep - 1].kl - 1e-6 > 0
    cached, fresh = probe.base_scores(), probe.scores(base_model)
    assert cached.kl == pytest.approx(fresh.kl, rel=1e-4) and cached.top1 == fresh.top1


def test_one_sampling_call_scores_each_row_as_a_forward_pass_would(pair) -> None:
    """Rows of different openings (a shared head, tails left-padded) and temperatures in one call: each row's log-probs
    from the sampling step are the model's own along the sample, and a near-zero temperature row
    follows the greedy path while the others sample."""
    from phlora_nim.jobs.fidelity import greedy_generate, token_ids
    from phlora_nim.jobs.self_probes import sample
    from phlora_nim.jobs.verify import log_probs

    tok, _, ft_model = pair
    pad, eos = token_ids(tok)
    # A shared head (run once, its cache repeated per row) and tails of different lengths.
    short, long = [tok.bos_token_id, 9, 10], [tok.bos_token_id, 9, 10, 5, 6, 7, 8]
    starts, temps = [short, long, short, long, long], [1.0, 1.0, 1e-4, 1e-4, 2.0]
    torch.manual_seed(0)
    rows = sample(ft_model, starts, temps, length=6, pad_id=pad, eos_id=eos)
    assert rows and all(r[0] in (short, long) for r in rows)
    seqs = [[*p, *c[:-1]] for p, c, _ in rows]
    fresh = log_probs(ft_model, seqs, starts=[len(p) - 1 for p, _, _ in rows])
    for (_, c, lp), f in zip(rows, fresh, strict=True):
        assert lp.shape == (len(c), ft_model.config.vocab_size)
        assert torch.allclose(lp, f, atol=1e-4)
    # Per-row temperature: near zero follows the greedy path, hot rows in the same call do not.
    greedy = greedy_generate(ft_model, [short], 6, pad_id=pad, eos_id=eos)[0]
    assert greedy
    mixed = sample(ft_model, [short] * 6, [1e-4] * 3 + [5.0] * 3, length=6, pad_id=pad, eos_id=eos)
    same = [c == greedy for _, c, _ in mixed]
    assert same[:3] == [True] * 3 and not all(same[3:])


def test_a_finetune_that_writes_nothing_is_refused(pair) -> None:
    from phlora_nim.jobs.self_probes import SelfProbeSettings, self_probe

    tok, base_model, ft_model = pair

    def always_end(_module: object, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., tok.eos_token_id] += 1e4
        return logits

    hook = ft_model.get_output_embeddings().register_forward_hook(always_end)
    try:
        with pytest.raises(InputError, match="ends every sampled continuation at once"):
            self_probe(base_model, ft_model, tok, SelfProbeSettings(temperatures=(1.0,), per_start=4, length=4))
    finally:
        hook.remove()


def test_a_finetune_that_always_answers_alike_gives_each_answer_once(pair) -> None:
    """A fine-tune whose every sample is the same answer (a knowledge fine-tune's favourite fact): the
    probe scores that answer once, not its copies, and nothing is held out of a single sample."""
    from phlora_nim.jobs.self_probes import SelfProbeSettings, self_probe_sets

    tok, base_model, ft_model = pair
    word = 7

    def always_the_same(_module: object, _inputs: object, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., word] += 1e4
        return logits

    hook = ft_model.get_output_embeddings().register_forward_hook(always_the_same)
    try:
        settings = SelfProbeSettings(temperatures=(1.0,), per_start=8, length=3, keep=4)
        search, check = self_probe_sets(base_model, ft_model, tok, settings, held_out=2)
    finally:
        hook.remove()
    assert search.continuations == [[word, word, word]] and check is None


def test_more_samples_are_kept_until_they_hold_enough_decisive_choices(pair) -> None:
    """Beyond the ``keep`` most disagreeing samples, more are kept in the same order until the kept ones
    hold the decisive choices asked for; the probe counts exactly those positions."""
    from phlora_nim.jobs.fidelity import decisive_mask
    from phlora_nim.jobs.self_probes import SelfProbeSettings, self_probe

    tok, base_model, ft_model = pair
    vocab = ft_model.config.vocab_size

    def confident_successor(_module: object, args: tuple, kwargs: dict, out: object) -> object:
        """A fine-tune that follows token t by 3 + t mod (V - 3), with p ≈ 0.95 (never a special token)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = out.logits  # type: ignore[attr-defined]
        nxt = 3 + ids[:, -logits.shape[1] :] % (vocab - 3)
        logits.scatter_add_(-1, nxt[..., None], torch.full_like(logits[..., :1], 7.5))
        return out

    hook = ft_model.register_forward_hook(confident_successor, with_kwargs=True)
    try:
        settings = SelfProbeSettings(temperatures=(1.5,), length=6, keep=2, decisive=0, seed=3)  # hot: varied
        few = self_probe(base_model, ft_model, tok, settings)
        more = self_probe(base_model, ft_model, tok, dataclasses.replace(settings, decisive=40))
    finally:
        hook.remove()
    assert len(few.sequences) == 2
    assert len(more.sequences) > 2
    counts = [int(decisive_mask(r, b).sum()) for r, b in zip(more.reference, more.base_reference, strict=True)]
    assert sum(counts) >= 40 and sum(counts[:-1]) < 40  # the last sample kept is the one that reached it
    assert more.decisive_positions == sum(counts)


@pytest.mark.parametrize(
    ("decisive", "needed", "wanted", "kept"),
    [
        ([0, 0, 5, 5], 2, 0, 2),  # enough samples, no decisive choices asked for
        ([3, 3, 3, 3], 1, 5, 2),  # one more sample to reach 5
        ([1, 1, 1, 1], 1, 50, 4),  # never reached: every sample
        ([9, 0, 0, 0], 3, 5, 3),  # reached at once, but at least `needed`
        ([0, 0, 2, 0, 0, 1, 0, 0], 2, 50, 6),  # never reached: up to the last sample holding one
        ([0, 0, 0, 0], 2, 50, 2),  # none at all: `needed` only
    ],
)
def test_enough_keeps_samples_in_order(decisive: list[int], needed: int, wanted: int, kept: int) -> None:
    from types import SimpleNamespace

    from phlora_nim.jobs.self_probes import _enough

    ranked = [SimpleNamespace(decisive=d, kl=-i) for i, d in enumerate(decisive)]
    assert _enough(ranked, needed, wanted) == ranked[:kept]  # type: ignore[arg-type]
