"""How long sizing an adapter by fidelity takes against one extraction, and what size it picks.

For each SmolLM2-135M-Instruct fine-tune cached by ``bench/fidelity.py`` (a skill, ``spell``, and
knowledge injection, ``facts``), in one run on one machine:

1. ``extract --target-recovery F`` (the default probes: the fine-tune's own samples) through the
   same job the CLI runs, timed end to end (probes, decompositions, search, check, writing);
2. ``extract --rank R`` with R the chosen adapter's largest module rank (what its padded folder
   stores, and what a user guessing a fixed rank would run), timed the same way;
3. the share of the fine-tune's exact-match gain the chosen adapter keeps on the task, and the
   smallest adapter keeping ≥ 95 % of it (**needed**: the same budget search judged by the task
   itself over one decomposition at rank 64), true and stored (padded) parameters of both.

1 and 2 alternate, ``--repeat`` times each (default 2): jobs of others on the shared cores slow
either by 2-3x at times, so the least time of each is compared (every run is kept in the JSON).
Prints search time / extraction time per task, the chosen/needed table and the load average.
``--curves``: no timing; along the budget axis, recovery on the self-probes and on the held-out ones
against the share of the task gain kept (what a recovery threshold would choose, against the task).

    python bench/fidelity.py --target-only --tasks spell --steps 40 --lr 2e-4   # builds base + ft-spell
    python bench/sizing.py                     # fine-tunes from bench/.work/fidelity (see --finetunes)
    python bench/sizing.py --curves
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall LAPACK on shared cores

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phlora_nim.converters.rank_policy import DEFAULT_RECOVERY  # noqa: E402

log = logging.getLogger("bench.sizing")
DEFAULT_FINETUNES = "spell=ft-spell-40x0.0002,facts=ft-facts-60x0.0003"


def timed_extract(base: Path, ft: Path, out: Path, options: Any) -> tuple[dict[str, Any], float, float]:
    """The report, wall seconds and CPU seconds (this process, user + system: what the shared cores
    actually gave it) of one ``extract``."""
    from phlora_nim.jobs.adapter_jobs import extract

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    report = extract(base, ft, out, options, plot=False)
    return report, time.perf_counter() - t0, time.process_time() - c0


def task_side(base: Path, ft: Path, task_name: str, chosen_dir: Path, max_rank: int) -> dict[str, Any]:
    """Accuracy of base, fine-tune and the chosen adapter on the task, and the needed size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phlora_nim.converters.formats.peft import load_peft, stored_parameters
    from phlora_nim.converters.rank_policy import search_policy
    from phlora_nim.testing import fidelity_tasks as ftasks

    sys.path.insert(0, str(ROOT / "bench"))
    import fidelity as fb  # the bench's own helpers

    task = ftasks.TASKS[task_name]()
    tok = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ft_model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    tprobe = ftasks.task_probe(base_model, ft_model, tok, task)
    base_acc, ft_acc = tprobe.measure_all(None)[2], tprobe.measure_all(None, model=ft_model)[2]
    del ft_model
    chosen = load_peft(chosen_dir)
    chosen_acc = tprobe.measure_all(chosen)[2]
    gain = ft_acc - base_acc
    plain = fb.extract_at_ceiling(base, ft, max_rank, None)
    need = base_acc + fb.GAIN_KEPT * gain
    needed = fb.smallest_keeping_gain(plain, search_policy(max_rank), tprobe, need) if gain > 0 else None
    if needed is not None:
        from phlora_nim.converters.extract import reassign
        from phlora_nim.converters.rank_policy import RankPolicy

        cut = reassign(plain, RankPolicy(budget_params=needed["budget"], max_rank=max_rank))
        needed["stored_params"] = stored_parameters(cut.adapter, "padded")
        needed["share_of_gain"] = (needed["accuracy"] - base_acc) / gain
    return {
        "base_accuracy": base_acc,
        "finetuned_accuracy": ft_acc,
        "chosen_accuracy": chosen_acc,
        "chosen_share_of_gain": (chosen_acc - base_acc) / gain if gain > 0 else None,
        "needed": needed,
    }


def run_task(
    work: Path, base: Path, name: str, ft: Path, recovery: float, needed_rank: int | None, repeat: int = 2
) -> dict[str, Any]:
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import FidelityTarget, RankPolicy, search_policy

    out = work / "sizing" / name
    target = ExtractOptions(policy=search_policy(None), target=FidelityTarget(min_recovery=recovery))
    # Search and extraction alternate, `repeat` times each: other jobs on shared cores slow either one
    # by 2-3x at times, so the least of each (what the work itself costs) is compared, every run kept.
    searches, extracts = [], []
    for _ in range(repeat):
        report, *search_t = timed_extract(base, ft, out / "chosen", target)
        searches.append(search_t)
        totals = report["totals"]
        rank = int(totals["max_rank"])
        extracts.append(timed_extract(base, ft, out / f"rank{rank}", ExtractOptions(policy=RankPolicy(rank=rank)))[1:])
    (search_s, search_cpu), (extract_s, extract_cpu) = min(searches), min(extracts)
    search = report["fidelity_target"]
    row = {
        "task": name,
        "recovery_target": recovery,
        "search_s": round(search_s, 1),
        "extract_s": round(extract_s, 1),
        "ratio": round(search_s / extract_s, 2),
        "search_cpu_s": round(search_cpu, 1),
        "extract_cpu_s": round(extract_cpu, 1),
        "cpu_ratio": round(min(c for _, c in searches) / min(c for _, c in extracts), 2),
        "runs_s": {"search": [round(w, 1) for w, _ in searches], "extract": [round(w, 1) for w, _ in extracts]},
        "chosen_params": totals["adapter_parameters"],
        "chosen_stored_params": totals["stored_parameters"],
        "chosen_max_rank": rank,
        "search_timings": search["search_timings"],
        "decomposed_to": search["decomposed_to_ranks"],
        "check": {k: search["check_on_own_samples"].get(k) for k in ("recovery", "recovery_on_probes", "passed")},
        "load_average": os.getloadavg(),
    }
    log.info(
        "%s: search %.1f s (CPU %.1f s), extract --rank %d %.1f s (CPU %.1f s): ratio %.2f (CPU %.2f)",
        name, search_s, search_cpu, rank, extract_s, extract_cpu, row["ratio"], row["cpu_ratio"],
    )  # fmt: skip
    print(json.dumps(row), flush=True)
    if needed_rank is not None:
        row.update(task_side(base, ft, name, out / "chosen", needed_rank))
    return row


def curves(base: Path, ft: Path, task_name: str, max_rank: int, points: int = 14) -> list[dict[str, Any]]:
    """Along the budget axis (one decomposition at ``max_rank``, budgets a factor √2 apart downward from
    every module at its cap): recovery on the self-probes the search uses and on the held-out ones
    (KL and top-1, of the reachable gap), and the share of the task's exact-match gain kept. What a
    recovery threshold on the self-probes would choose, against what the task needs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phlora_nim.converters.extract import reassign
    from phlora_nim.converters.rank_policy import RankPolicy, decisive_recovery, recovery
    from phlora_nim.jobs.fidelity import WeightPatcher
    from phlora_nim.jobs.self_probes import self_probe_sets
    from phlora_nim.jobs.target_kl import HELD_OUT
    from phlora_nim.testing import fidelity_tasks as ftasks

    sys.path.insert(0, str(ROOT / "bench"))
    import fidelity as fb

    tok = AutoTokenizer.from_pretrained(ft)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ft_model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    search, check = self_probe_sets(base_model, ft_model, tok, held_out=HELD_OUT)
    assert check is not None
    tprobe = ftasks.task_probe(base_model, ft_model, tok, ftasks.TASKS[task_name]())
    plain = fb.extract_at_ceiling(base, ft, max_rank, None)
    patcher = WeightPatcher(base_model)
    weight = {name: m.get_submodule for name, m in (("base", base_model), ("ft", ft_model))}
    deltas = (
        (t.module, weight["ft"](t.module).weight.detach() - weight["base"](t.module).weight.detach())
        for t in plain.plan.targets
    )
    floor = patcher.apply(None, full=deltas)
    floor_scores = [p.scores(floor) for p in (search, check)]
    floors = [(sc.kl, sc.top1) for sc in floor_scores]
    patcher.restore()
    base_acc, ft_acc = tprobe.measure_all(None)[2], tprobe.measure_all(None, model=ft_model)[2]
    gain = ft_acc - base_acc
    del ft_model
    bases = [(p.base_scores().kl, p.base_scores().top1) for p in (search, check)]
    top = sum(min(max_rank, t.short_side) * (t.in_dim + t.out_dim) for t in plain.plan.targets)
    rows = []
    for k in range(points):
        candidate = reassign(plain, RankPolicy(budget_params=int(top / 2 ** (k / 2)), max_rank=max_rank))
        model = patcher.apply(candidate.adapter)
        scores = [p.scores(model) for p in (search, check)]
        rec = [recovery(sc.kl, sc.top1, *b, *f) for sc, b, f in zip(scores, bases, floors, strict=True)]
        decisive = [
            decisive_recovery(sc.decisive, fs.decisive) if sc.decisive is not None and fs.decisive else None
            for sc, fs in zip(scores, floor_scores, strict=True)
        ]
        patcher.restore()
        acc = tprobe.measure_all(candidate.adapter)[2]
        row = {
            "params": candidate.adapter.num_parameters(),
            "probes_kl": rec[0][0], "probes_top1": rec[0][1], "held_out_kl": rec[1][0], "held_out_top1": rec[1][1],
            "probes_decisive": decisive[0], "held_out_decisive": decisive[1],
            "task_accuracy": acc,
        }  # fmt: skip
        rows.append(row)
        log.info("%s: %s", task_name, row)
    for row in rows:
        row["share_of_gain"] = (row["task_accuracy"] - base_acc) / gain if gain > 0 else None
    return rows


def curves_table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{name}: | params | recovery on self-probes KL / top-1 | on held-out KL / top-1 | decisive choices kept, "
        "self-probes / held-out | share of task gain |",
        "|---:|---:|---:|---:|---:|",
    ]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v:.1%}"

    for r in rows:
        lines.append(
            f"| {r['params'] / 1e6:.3f} M | {r['probes_kl']:.1%} / {r['probes_top1']:.1%} | "
            f"{r['held_out_kl']:.1%} / {r['held_out_top1']:.1%} | {pct(r['probes_decisive'])} / "
            f"{pct(r['held_out_decisive'])} | {r['share_of_gain']:.0%} |"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | search s (CPU) | extract --rank R s (CPU) | ratio (CPU) | chosen true (stored, R) | chosen share "
        "of gain | needed true (stored) | needed share | chosen/needed true (stored) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = r.get("needed")
        need = f"{n['params'] / 1e6:.2f} M ({n['stored_params'] / 1e6:.2f} M)" if n else "–"
        nshare = f"{n['share_of_gain']:.0%}" if n else "–"
        ratio = (
            f"{r['chosen_params'] / n['params']:.2f} ({r['chosen_stored_params'] / n['stored_params']:.2f})"
            if n
            else "–"
        )
        share = f"{r['chosen_share_of_gain']:.0%}" if r.get("chosen_share_of_gain") is not None else "–"
        lines.append(
            f"| {r['task']} | {r['search_s']:.1f} ({r['search_cpu_s']:.1f}) | {r['extract_s']:.1f} "
            f"({r['extract_cpu_s']:.1f}) | {r['ratio']:.2f} ({r['cpu_ratio']:.2f}) | "
            f"{r['chosen_params'] / 1e6:.2f} M ({r['chosen_stored_params'] / 1e6:.2f} M, {r['chosen_max_rank']}) | "
            f"{share} | {need} | {nshare} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench" / ".work" / "fidelity"))
    ap.add_argument("--finetunes", default=DEFAULT_FINETUNES, help="task=folder under WORK, comma-separated")
    ap.add_argument("--recovery", type=float, default=DEFAULT_RECOVERY, help="--target-recovery (default: the CLI's)")
    ap.add_argument("--needed-rank", type=int, default=64, help="cap of the decomposition the needed size is found on")
    ap.add_argument("--no-task", action="store_true", help="times only (skip accuracy and the needed size)")
    ap.add_argument(
        "--task-only", action="store_true", help="accuracy and needed size of the adapters a --no-task run chose"
    )
    ap.add_argument(
        "--curves",
        action="store_true",
        help="recovery on the self-probes and share of the task gain along the budget axis (no timing)",
    )
    ap.add_argument("--repeat", type=int, default=2, help="searches and extractions timed per task (least kept)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "phlora_nim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    base = work / "base"
    rows = []
    if args.curves:
        for item in args.finetunes.split(","):
            name, folder = item.split("=")
            print(curves_table(name, curves(base, work / folder, name, args.needed_rank)), flush=True)
        return 0
    if args.task_only:
        rows = json.loads((work / "sizing.json").read_text())
        for row in rows:
            folder = dict(item.split("=") for item in args.finetunes.split(","))[row["task"]]
            row.update(task_side(base, work / folder, row["task"], work / "sizing" / row["task"] / "chosen", 64))
            print(json.dumps(row), flush=True)
    for item in [] if args.task_only else args.finetunes.split(","):
        name, folder = item.split("=")
        needed_rank = None if args.no_task else args.needed_rank
        rows.append(run_task(work, base, name, work / folder, args.recovery, needed_rank, args.repeat))
    (work / "sizing.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    print(f"load average at the end: {os.getloadavg()}  (threads {args.threads})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
