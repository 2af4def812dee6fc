"""Check an adapter against the fine-tune it came from.

Two levels: per-module reconstruction error of the update (any checkpoint), and for causal LMs
that transformers can load, the logits of base + adapter (applied by PEFT, as users will) against
the fine-tuned model's: mean KL divergence and top-1 agreement per token.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.adapter import LoraAdapter
from phlora_nim.converters.belonging import config_mismatch
from phlora_nim.converters.calibration import load_tokenizer, read_prompts
from phlora_nim.converters.checkpoint import DeltaReader, open_checkpoint
from phlora_nim.converters.decompose import frobenius_energy
from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.converters.hub import resolve
from phlora_nim.converters.rank_policy import recovery
from phlora_nim.core.cpus import set_torch_threads
from phlora_nim.core.errors import InputError
from phlora_nim.jobs.target_kl import MIN_GAP_KL

log = logging.getLogger("phlora_nim.jobs.verify")


def reconstruction_errors(base: Path, finetuned: Path, adapter_dir: Path) -> dict[str, Any]:
    """‖(ΔW, Δb) − (scale·B·A, b̂)‖_F / ‖(ΔW, Δb)‖_F per adapter module, streamed one module at a time.

    b̂ is the adapter's bias change (``lora_biases``; zero without one), so a fine-tune's bias change
    the adapter does not carry counts against it, as it would in the served output.
    """
    adapter = load_peft(adapter_dir)
    errors: dict[str, float] = {}
    with open_checkpoint(base) as b, open_checkpoint(finetuned) as f:
        reader = DeltaReader(b, f)
        for name, w in sorted(adapter.modules.items()):
            weight = f"{name}.weight"
            if weight not in f.tensors:
                raise InputError(
                    "adapter module has no weight in the checkpoint",
                    where=f"{adapter_dir} {name}",
                    expected=f"tensor {weight} in {finetuned}",
                    found="no such tensor",
                    fix="verify against the checkpoints the adapter was extracted from",
                )
            delta = reader.delta(weight)
            if tuple(delta.shape) != (w.b.shape[0], w.a.shape[1]):
                raise InputError(
                    "adapter module shape does not match the checkpoint",
                    where=f"{adapter_dir} {name}",
                    expected=str(tuple(delta.shape)),
                    found=f"{(w.b.shape[0], w.a.shape[1])}",
                )
            total = frobenius_energy(delta)
            resid = frobenius_energy(delta - w.delta(use_rslora=adapter.use_rslora))
            bias_total, bias_resid = _bias_energies(reader, f.tensors, name, adapter.lora_biases.get(name))
            total, resid = total + bias_total, resid + bias_resid
            errors[name] = math.sqrt(resid / total) if total else math.sqrt(resid)
    worst = max(errors, key=lambda k: errors[k]) if errors else None
    return {
        "modules": len(errors),
        "mean_relative_error": sum(errors.values()) / len(errors) if errors else 0.0,
        "max_relative_error": errors[worst] if worst else 0.0,
        "worst_module": worst,
        "per_module": errors,
    }


def _bias_energies(
    reader: DeltaReader, tensors: Mapping[str, Any], name: str, carried: torch.Tensor | None
) -> tuple[float, float]:
    """‖Δb‖² and ‖Δb − carried‖² of a module's bias (0, 0 without one): the update is (ΔW, Δb)."""
    bias = f"{name}.bias"
    if bias not in tensors:
        return 0.0, 0.0
    delta = reader.delta(bias)
    change = delta if carried is None else delta - carried.float()
    return frobenius_energy(delta), frobenius_energy(change)


def _token_batches(finetuned: Path, base: Path, vocab: int, prompts: Path | None, *, seed: int) -> list[list[int]]:
    if prompts is None:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (48,), generator=gen).tolist() for _ in range(8)]
    lines = read_prompts(prompts)
    tok = load_tokenizer(finetuned, base, purpose="--prompts")
    return [tok(line, return_tensors="pt").input_ids[0, :512].tolist() for line in lines]


@torch.no_grad()
def log_probs(
    model: Any,
    sequences: Sequence[list[int]],
    *,
    starts: Sequence[int] | None = None,
    batch_size: int = 16,
    shared_prefix: int = 0,
) -> list[torch.Tensor]:
    """Next-token log-probabilities of ``model`` at the scored positions of each sequence.

    Position p scores the token after p; sequence i is scored from ``starts[i]`` (default 0) to its
    end. Sequences are right-padded into batches, which leaves a causal model's real positions as
    they are alone. With ``shared_prefix`` = P > 0 (every sequence starts with the same P tokens and
    no position before P is scored), the prefix runs once per batch and its KV cache is shared:
    a chat template's system prompt is then paid for once.
    """
    out: list[torch.Tensor] = []
    prefix = list(sequences[0][:shared_prefix]) if shared_prefix else []
    for lo in range(0, len(sequences), batch_size):
        chunk = sequences[lo : lo + batch_size]
        width = max(len(s) for s in chunk) - len(prefix)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        att = torch.zeros((len(chunk), len(prefix) + width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s) - len(prefix)] = torch.tensor(s[len(prefix) :])
            att[i, : len(s)] = 1
        if prefix:
            cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(chunk))
            positions = torch.arange(len(prefix), len(prefix) + width).expand(len(chunk), -1)
            logits = model(
                input_ids=ids, attention_mask=att, past_key_values=cache, position_ids=positions, use_cache=True
            ).logits
        else:
            logits = model(input_ids=ids, attention_mask=att).logits
        for i, s in enumerate(chunk):
            first = (starts[lo + i] if starts is not None else 0) - len(prefix)
            out.append(torch.log_softmax(logits[i, first : len(s) - len(prefix)].float(), -1))
    return out


def common_prefix(sequences: Sequence[list[int]], starts: Sequence[int]) -> int:
    """Tokens every sequence starts with, up to the first scored position."""
    limit = min(min(starts), *(len(s) for s in sequences))
    n = 0
    while n < limit and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def compare_log_probs(ref: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> tuple[float, float, int]:
    """(mean KL(ref ‖ other) per position, top-1 agreement, positions) over matching log-prob rows."""
    kl_sum, agree, n = 0.0, 0, 0
    for p, q in zip(ref, other, strict=True):
        kl_sum += float((p.exp() * (p - q)).sum(-1).double().sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += p.shape[0]
    return (kl_sum / n, agree / n, n) if n else (0.0, 1.0, 0)


@contextlib.contextmanager
def merged(model: Any, adapter: LoraAdapter) -> Iterator[Any]:
    """``model`` with the adapter's updates added to its weights and biases (restored exactly on exit).

    Mathematically what PEFT computes (x Wᵀ + x Aᵀ Bᵀ, plus ``lora_B.bias``), in one matmul per
    module: fast enough to evaluate many adapters of one base in a search. A bias change on a
    module without a bias gives it one for the duration.
    """
    weights = ((name, w.delta(use_rslora=adapter.use_rslora)) for name, w in adapter.modules.items())
    with added(model, weights, adapter.lora_biases) as m:
        yield m


@contextlib.contextmanager
def added(model: Any, weights: Iterable[tuple[str, torch.Tensor]], biases: Mapping[str, torch.Tensor]) -> Iterator[Any]:
    """``model`` with weight changes (module name → ΔW, taken one at a time: ``weights`` may be lazy)
    and bias changes added, restored exactly on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    created: list[torch.nn.Module] = []
    try:
        with torch.no_grad():
            for name, delta in weights:
                weight = model.get_submodule(name).weight
                saved.append((weight, weight.detach().clone()))
                weight.add_(delta.to(weight.dtype))
            for name, change in biases.items():
                module = model.get_submodule(name)
                if module.bias is None:
                    module.bias = torch.nn.Parameter(torch.zeros_like(change, dtype=module.weight.dtype))
                    created.append(module)
                else:
                    saved.append((module.bias, module.bias.detach().clone()))
                module.bias.add_(change.to(module.bias.dtype))
        yield model
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)
            for module in created:
                module.bias = None


def logit_agreement(
    base: Path, finetuned: Path, adapter_dir: Path, *, prompts: Path | None = None, seed: int = 0
) -> dict[str, Any]:
    """Mean KL(fine-tuned ‖ base+adapter) and top-1 agreement over token positions.

    The base is prepared as a user must before loading the adapter under PEFT: resized to the
    fine-tune's vocabulary when tokens were added, and with its head untied from its embedding when
    the adapter saves either whole (the floor replaces each by the fine-tune's).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft_model = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    carried = load_peft(adapter_dir)
    resized = _match_vocabulary(base_model, ft_model, seed=seed)
    if carried.modules_to_save:
        _untie_head(base_model)
    batches = _token_batches(finetuned, base, ft_model.config.vocab_size, prompts, seed=seed)
    ft_logp = log_probs(ft_model, batches, batch_size=1)
    base_logp = log_probs(base_model, batches, batch_size=1)
    # The floor: base + the fine-tune's whole delta on every module the adapter carries, and the
    # fine-tune's own tensors where the adapter saves them whole (modules_to_save).
    weights = [
        (f"{name}.weight", ft_model.get_submodule(name).weight - base_model.get_submodule(name).weight)
        for name in carried.modules
    ] + [(name, ft_model.get_parameter(name) - base_model.get_parameter(name)) for name in carried.modules_to_save]
    with shifted(base_model, weights, carried.lora_biases) as floor_model:
        floor_logp = log_probs(floor_model, batches, batch_size=1)
    del ft_model
    adapted = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    ad_logp = log_probs(adapted, batches, batch_size=1)
    kl, top1, n = compare_log_probs(ft_logp, ad_logp)
    base_kl, base_top1, _ = compare_log_probs(ft_logp, base_logp)
    floor_kl, floor_top1, _ = compare_log_probs(ft_logp, floor_logp)
    recovery_kl, recovery_top1 = recovery(kl, top1, base_kl, base_top1, floor_kl, floor_top1)
    raw_kl, raw_top1 = recovery(kl, top1, base_kl, base_top1)
    # No reachable gap (the floor is no closer to the fine-tune than the base, or too little closer to
    # measure): recovery is undefined, not 100 %.
    if base_kl - floor_kl < MIN_GAP_KL:
        recovery_kl = None
    if floor_top1 - base_top1 <= 0:
        recovery_top1 = None
    return {
        "tokens": n,
        "mean_kl": kl,
        "top1_agreement": top1,
        "base_mean_kl": base_kl,
        "base_top1_agreement": base_top1,
        "floor_mean_kl": floor_kl,
        "floor_top1_agreement": floor_top1,
        "recovery_kl": recovery_kl,  # share of the reachable gap (base → floor): what --min-recovery gates
        "recovery_top1": recovery_top1,
        "raw_recovery_kl": raw_kl,  # share of the whole base → fine-tune gap
        "raw_recovery_top1": raw_top1,
        "base_resized_to": resized,
    }


def _match_vocabulary(base_model: Any, ft_model: Any, *, seed: int) -> int | None:
    """Resize the base to the fine-tune's vocabulary (added tokens), as PEFT needs before loading
    an adapter that saves the resized tensors. Returns the new size (None: same vocabulary)."""
    vocab = ft_model.get_input_embeddings().weight.shape[0]
    if base_model.get_input_embeddings().weight.shape[0] == vocab:
        return None
    torch.manual_seed(seed)  # new rows are drawn at random: the same ones every run
    base_model.resize_token_embeddings(vocab)
    return int(vocab)


def _untie_head(model: Any) -> None:
    """Give a tied output head its own copy of the weights (same values), so the floor can set the
    head and the embedding separately; PEFT then reads the same numbers."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False


@contextlib.contextmanager
def shifted(
    model: Any, deltas: Iterable[tuple[str, torch.Tensor]], biases: Mapping[str, torch.Tensor]
) -> Iterator[Any]:
    """``model`` with changes added to parameters (by parameter name) and bias changes, restored exactly on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, delta in deltas:
                param = model.get_parameter(name)
                saved.append((param, param.detach().clone()))
                param.add_(delta.to(param.dtype))
        with added(model, (), biases) as m:
            yield m
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)


def gate_failures(
    logits: dict[str, Any], *, max_kl: float | None, min_top1: float | None, min_recovery: float | None
) -> tuple[list[str], list[str]]:
    """(failed gates, warnings) of ``verify``'s --max-kl / --min-top1 / --min-recovery on a logit check.

    Warns when the base model alone would pass the absolute gates: they then say nothing about
    what the adapter keeps.
    """
    failed: list[str] = []
    if max_kl is not None and (not logits or logits["mean_kl"] > max_kl):
        failed.append(f"mean KL {logits.get('mean_kl', 'n/a')} > --max-kl {max_kl}")
    if min_top1 is not None and (not logits or logits["top1_agreement"] < min_top1):
        failed.append(f"top-1 agreement {logits.get('top1_agreement', 'n/a')} < --min-top1 {min_top1}")
    if min_recovery is not None:
        failed.extend(_recovery_failures(logits, min_recovery))
    warnings: list[str] = []
    absolute = max_kl is not None or min_top1 is not None
    if logits and absolute:
        base_passes = (max_kl is None or logits["base_mean_kl"] <= max_kl) and (
            min_top1 is None or logits["base_top1_agreement"] >= min_top1
        )
        if base_passes:
            warnings.append(
                f"the base model alone passes --max-kl/--min-top1 on these tokens (KL {logits['base_mean_kl']:.4g}, "
                f"top-1 {logits['base_top1_agreement']:.2%}): the gate says nothing about the adapter; give task "
                "prompts with --prompts or gate on --min-recovery"
            )
    return failed, warnings


def _recovery_failures(logits: dict[str, Any], min_recovery: float) -> list[str]:
    """--min-recovery: fails when recovery is undefined (no reachable gap) or a defined share is below."""
    if not logits:
        return [f"no logit check: recovery unknown < --min-recovery {min_recovery}"]
    if logits["recovery_kl"] is None:
        return [
            f"recovery undefined: the floor (base + every carried module at full rank + saved tensors) is not "
            f"closer to the fine-tune than the base (KL {logits['floor_mean_kl']:.4g} vs {logits['base_mean_kl']:.4g}, "
            f"reachable gap below {MIN_GAP_KL} nats/token): --min-recovery cannot judge the adapter on these "
            "tokens; give prompts of the fine-tune's task with --prompts, and check that it is a fine-tune of this base"
        ]
    shares = [v for v in (logits["recovery_kl"], logits["recovery_top1"]) if v is not None]
    if min(shares) < min_recovery:
        return [
            f"recovery {_share(logits['recovery_kl'])} (KL) / {_share(logits['recovery_top1'])} (top-1) of the "
            f"reachable gap (base → floor, every carried module at full rank) < --min-recovery {min_recovery}"
        ]
    return []


def _share(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.1%}"


def verify_adapter(base: Path, finetuned: Path, adapter_dir: Path, *, prompts: Path | None = None) -> dict[str, Any]:
    """Both checks; the logit check is skipped (with the reason) when the model cannot be loaded."""
    set_torch_threads()  # the CPUs this process may use, not the machine's cores
    base = resolve(base, flag="--base").path
    finetuned = resolve(finetuned, flag="--finetuned").path
    result: dict[str, Any] = {"reconstruction": reconstruction_errors(base, finetuned, adapter_dir)}
    with open_checkpoint(base) as b, open_checkpoint(finetuned) as f:
        # The floor runs with the base's config: a change no adapter carries is outside what recovery sees.
        result["warnings"] = [str(e) for e in config_mismatch(b, f)]
    try:
        result["logits"] = logit_agreement(base, finetuned, adapter_dir, prompts=prompts)
    except InputError:
        raise
    except ImportError as exc:
        result["logits_skipped"] = f"transformers/peft not installed ({exc}); pip install 'phlora-nim[hf]'"
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        log.debug("logit check failed", exc_info=True)
        result["logits_skipped"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result
