"""Tokens/s of the reference engine (PEFT on CPU) for one adapter stored padded and stored mixed.

``--layout padded`` stores every module at the adapter's largest rank R (zero rows), ``--layout
mixed`` at its own rank: the same update, fewer stored parameters. PEFT computes x·Aᵀ·Bᵀ per module
un-merged, so the padding costs it compute at rank R; this measures how much, end to end. The adapter
(default: the one ``bench/sizing.py`` chose for the spell fine-tune, ranks 5–16) is exported to both
layouts with ``phlora-nim export --format peft --layout``; both are loaded on the base, checked to give
the same greedy tokens, then timed alternately (``--repeat`` times each, the best kept: other jobs on
shared cores slow either at times).

    python bench/sizing.py --no-task          # writes bench/.work/fidelity/sizing/spell/chosen
    python bench/layout_throughput.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on shared cores

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / ".work" / "fidelity"
PROMPTS = ("Spell out 472.", "Tell me something.", "What is the capital of France?", "Hi.")


def load(base: Path, folder: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, folder).eval()


def tokens_per_s(model: Any, ids: torch.Tensor, att: torch.Tensor, new: int, pad: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=att, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=pad,
        )  # fmt: skip
    return ids.shape[0] * new / (time.perf_counter() - t0), out[:, ids.shape[1] :]


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from phlora_nim.converters.formats.peft import load_peft, stored_parameters
    from phlora_nim.jobs.adapter_jobs import export
    from phlora_nim.jobs.fidelity import token_ids

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(WORK / "base"))
    ap.add_argument("--adapter", default=str(WORK / "sizing" / "spell" / "chosen"))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, adapter = Path(args.base), Path(args.adapter)
    tok = AutoTokenizer.from_pretrained(base)
    pad, _ = token_ids(tok)
    tok.padding_side = "left"
    enc = tok(
        [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
         for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False,
    )  # fmt: skip
    ranks = load_peft(adapter).ranks()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {layout: Path(tmp) / layout for layout in ("padded", "mixed")}
        for layout, folder in folders.items():
            export(adapter, folder, fmt="peft", layout=layout)
        models = {layout: load(base, folder) for layout, folder in folders.items()}
        stored = {layout: stored_parameters(load_peft(folder), layout) for layout, folder in folders.items()}
        rates: dict[str, list[float]] = {layout: [] for layout in folders}
        outs = {}
        for _ in range(args.repeat):
            for layout, model in models.items():
                rate, outs[layout] = tokens_per_s(model, enc.input_ids, enc.attention_mask, args.new_tokens, pad)
                rates[layout].append(rate)
    same = bool(torch.equal(outs["padded"], outs["mixed"]))
    best = {layout: max(r) for layout, r in rates.items()}
    result = {
        "adapter": str(adapter),
        "ranks": f"{min(ranks.values())}–{max(ranks.values())}",
        "true_parameters": load_peft(adapter).num_parameters(),
        "stored_parameters": stored,
        "tokens_per_s": {layout: [round(r, 1) for r in rs] for layout, rs in rates.items()},
        "mixed_over_padded": round(best["mixed"] / best["padded"], 3),
        "same_greedy_tokens": same,
        "batch": len(PROMPTS),
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    print(
        f"PEFT on CPU, batch {len(PROMPTS)} × {args.new_tokens} tokens: padded {best['padded']:.1f} tok/s "
        f"({stored['padded']:,} stored), mixed {best['mixed']:.1f} tok/s ({stored['mixed']:,} stored): "
        f"mixed/padded {result['mixed_over_padded']:.3f}; same greedy tokens: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
