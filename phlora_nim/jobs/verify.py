"""Check an adapter against the fine-tune it came from.

Two levels: per-module reconstruction error of the update (any checkpoint), and for causal LMs
that transformers can load, the logits of base + adapter (applied by PEFT, as users will) against
the fine-tuned model's: mean KL divergence and top-1 agreement per token.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from phlora_nim.converters.checkpoint import DeltaReader, open_checkpoint
from phlora_nim.converters.decompose import frobenius_energy
from phlora_nim.converters.errors import InputError
from phlora_nim.converters.formats.peft import load_peft

log = logging.getLogger("phlora_nim.jobs.verify")


def reconstruction_errors(base: Path, finetuned: Path, adapter_dir: Path) -> dict[str, Any]:
    """‖ΔW − scale·B·A‖_F / ‖ΔW‖_F per adapter module, streamed one module at a time."""
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
            errors[name] = math.sqrt(resid / total) if total else math.sqrt(resid)
    worst = max(errors, key=lambda k: errors[k]) if errors else None
    return {
        "modules": len(errors),
        "mean_relative_error": sum(errors.values()) / len(errors) if errors else 0.0,
        "max_relative_error": errors[worst] if worst else 0.0,
        "worst_module": worst,
        "per_module": errors,
    }


def _token_batches(finetuned: Path, base: Path, vocab: int, prompts: Path | None, *, seed: int) -> list[torch.Tensor]:
    if prompts is None:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (1, 48), generator=gen) for _ in range(8)]
    if not prompts.exists():
        raise InputError("prompts file not found", where=str(prompts), fix="check the path")
    lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise InputError("prompts file is empty", where=str(prompts), expected="one prompt per line")
    from transformers import AutoTokenizer

    for folder in (finetuned, base):
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
            break
        except (OSError, ValueError):
            continue
    else:
        raise InputError(
            "no tokenizer to encode --prompts",
            where=f"{finetuned} and {base}",
            expected="tokenizer files saved with the model",
            found="none",
            fix="save the tokenizer beside the model, or omit --prompts to use random tokens",
        )
    return [tok(line, return_tensors="pt").input_ids[:, :512] for line in lines]


def logit_agreement(
    base: Path, finetuned: Path, adapter_dir: Path, *, prompts: Path | None = None, seed: int = 0
) -> dict[str, Any]:
    """Mean KL(fine-tuned ‖ base+adapter) and top-1 agreement over token positions."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft_model = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    batches = _token_batches(finetuned, base, ft_model.config.vocab_size, prompts, seed=seed)
    with torch.no_grad():
        ft_logp = [torch.log_softmax(ft_model(input_ids=x).logits.float(), -1) for x in batches]
        base_logp = [torch.log_softmax(base_model(input_ids=x).logits.float(), -1) for x in batches]
        adapted = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
        ad_logp = [torch.log_softmax(adapted(input_ids=x).logits.float(), -1) for x in batches]

    def compare(ref: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float, int]:
        kl_sum, agree, n = 0.0, 0, 0
        for p, q in zip(ref, other, strict=True):
            kl_sum += float((p.exp() * (p - q)).sum(-1).double().sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            n += p.shape[0] * p.shape[1]
        return kl_sum / n, agree / n, n

    kl, top1, n = compare(ft_logp, ad_logp)
    base_kl, base_top1, _ = compare(ft_logp, base_logp)
    return {
        "tokens": n,
        "mean_kl": kl,
        "top1_agreement": top1,
        "base_mean_kl": base_kl,
        "base_top1_agreement": base_top1,
    }


def verify_adapter(base: Path, finetuned: Path, adapter_dir: Path, *, prompts: Path | None = None) -> dict[str, Any]:
    """Both checks; the logit check is skipped (with the reason) when the model cannot be loaded."""
    result: dict[str, Any] = {"reconstruction": reconstruction_errors(base, finetuned, adapter_dir)}
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
