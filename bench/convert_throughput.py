"""Conversion throughput: ``phlora-nim convert`` on a Llama-3-8B-shaped pair, in MB of adapter per second.

Writes a synthetic base + fine-tune with Llama-3-8B shapes (2 decoder layers by default, bf16) with
the project's generator, then times one ``convert`` into a fresh model repository (extract → lay out
as TensorRT-LLM tensors → NIM/PEFT store → register → configs) and prints:

- adapter MB written per second (the TensorRT-LLM tensors in the engine dtype),
- checkpoint GB read per second (both checkpoints, every tensor),
- the time spent registering (lock, moves into place, configs) after the adapter was made.

Run: ``.venv/bin/python bench/convert_throughput.py [--layers 2] [--rank 16]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.jobs.convert import ConvertJob, convert
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.testing.synthetic import SyntheticLlama, write_synthetic_pair


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float16", help="engine dtype of the LoRA tensors")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="phlora-convert-bench-"))
    try:
        base, ft = write_synthetic_pair(work / "pair", SyntheticLlama(num_hidden_layers=args.layers))
        read_bytes = _size(base) + _size(ft)
        job = ConvertJob(
            base=base,
            finetuned=(ft,),
            names=("bench",),
            repository=work / "repo",
            options=ExtractOptions(policy=RankPolicy(rank=args.rank)),
            settings=RepositorySettings(backend="trtllm-legacy", base=str(base), dtype=args.dtype),
        )
        start = time.perf_counter()
        [done] = convert(job)
        total = time.perf_counter() - start
        mb = done.adapter_bytes / 1e6
        print(f"Llama-3-8B shapes, {args.layers} layers, rank {args.rank}, LoRA tensors in {args.dtype}")
        print(f"checkpoints read: {read_bytes / 1e9:.2f} GB; adapter written: {mb:.1f} MB (TensorRT-LLM npy)")
        print(f"convert wall time: {total:.1f} s")
        print(f"throughput: {mb / total:.2f} MB of adapter per second; {read_bytes / 1e9 / total:.2f} GB/s read")
        print(f"of which registration, moves and configs: {total - done.seconds:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
