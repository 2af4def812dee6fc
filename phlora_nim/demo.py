"""The one-command demo: a small Llama, fully fine-tuned on CPU, turned into a LoRA adapter."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rich.console import Console

from converters.extract import ExtractOptions
from converters.rank_policy import RankPolicy
from phlora_nim import jobs
from phlora_nim.toy_models import make_pair
from phlora_nim.verify import verify_adapter

log = logging.getLogger("phlora_nim.demo")


def run_demo(out: Path, *, steps: int = 30, console: Console | None = None) -> dict[str, object]:
    """Build → fine-tune → extract (rank 8 and an energy policy) → verify, printing each step.

    Returns the verification result of the energy-policy adapter.
    """
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    console = console or Console()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    console.rule("[bold]1. a base model and its full fine-tune")
    base, ft = make_pair("llama", out / "checkpoints", steps=steps, freeze_embeddings=True)
    console.print(f"base: {base}\nfine-tuned ({steps} AdamW steps on CPU, every layer; embeddings frozen): {ft}")
    console.rule("[bold]2. PHLoRA extraction, rank 8")
    adapter = out / "adapter-r8"
    report = jobs.extract(base, ft, adapter, ExtractOptions(policy=RankPolicy(rank=8)), command="phlora-nim demo")
    t = report["totals"]
    console.print(
        f"{adapter}: {t['modules']} modules, {t['adapter_parameters']:,} parameters, "
        f"{t['energy_kept_linear']:.2%} of linear delta energy kept (min module {t['min_energy_kept']:.2%})"
    )
    console.print(f"energy plot: {adapter / 'energy.png'}")
    console.rule("[bold]3. energy policy: 90% per module")
    adapter90 = out / "adapter-e90"
    report90 = jobs.extract(
        base, ft, adapter90, ExtractOptions(policy=RankPolicy(energy=0.9, max_rank=64)), command="phlora-nim demo"
    )
    t90 = report90["totals"]
    console.print(
        f"{adapter90}: ranks {t90['min_rank']}–{t90['max_rank']} (mean {t90['mean_rank']:.1f}), "
        f"{t90['energy_kept_linear']:.2%} kept"
    )
    console.rule("[bold]4. verify: base + adapter (PEFT) vs the fine-tune, on random token sequences")
    result: dict[str, object] = {}
    for folder in (adapter, adapter90):
        result = verify_adapter(base, ft, folder)
        rec, lg = result["reconstruction"], result.get("logits") or {}
        console.print(f"[bold]{folder.name}[/]: reconstruction error mean {rec['mean_relative_error']:.3f}")
        if lg:
            console.print(
                f"  mean KL(fine-tuned ‖ base+adapter) {lg['mean_kl']:.5f} (base alone {lg['base_mean_kl']:.5f}); "
                f"top-1 agreement {lg['top1_agreement']:.1%} (base alone {lg['base_top1_agreement']:.1%})"
            )
    console.rule("[bold green]done")
    console.print(f"inspect it: phlora-nim inspect {adapter}")
    return result
