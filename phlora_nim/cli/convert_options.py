"""The options of ``phlora-nim convert``: its inputs, the repository settings a later convert keeps,
and what is preloaded into TensorRT-LLM's LoRA cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from phlora_nim.engines.registry import DEFAULT_ENGINE, ENGINES

# The help panel of the options a later convert into the same repository need not repeat.
KEPT = "Repository settings (kept when not given)"

BaseOpt = Annotated[
    Path, typer.Option("--base", help="Base checkpoint folder or hub id (its tokenizer is served too).")
]
FinetunedOpt = Annotated[
    list[Path], typer.Option("--finetuned", help="Full fine-tune of the base (folder or hub id); repeat for several.")
]
NameOpt = Annotated[
    list[str] | None,
    typer.Option("--name", help="Adapter name per --finetuned, in order (default: folder names)."),
]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend",
        help="The engine the repository is written for: "
        + "; ".join(f"{row.name}: {row.summary} ({row.versions})" for row in ENGINES)
        + f". Default: {DEFAULT_ENGINE}.",
        rich_help_panel=KEPT,
    ),
]
EngineDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--engine-dtype",
        help="Engine dtype: LoRA weights are laid out and sent in it (float16, bfloat16, float32; default float32).",
        rich_help_panel=KEPT,
    ),
]
# ``convert --dtype`` named the engine's dtype; everywhere else --dtype is adapter storage.
OldEngineDtypeOpt = Annotated[
    str | None, typer.Option("--dtype", hidden=True, help="Old spelling of --engine-dtype (still accepted).")
]
EngineDirOpt = Annotated[
    str | None,
    typer.Option(
        "--engine-dir", help="tensorrtllm: engine folder as Triton sees it (gpt_model_path).", rich_help_panel=KEPT
    ),
]
EngineConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--engine-config",
        help="The engine's config.json: refuse adapters it would reject, size the LoRA cache for it "
        "(required with --backend trtllm-legacy; kept for later converts).",
    ),
]
ServedPathOpt = Annotated[
    str | None,
    typer.Option(
        "--served-path",
        help="Where Triton will mount this repository (sets lora_prefetch_dir under it); default: "
        "the repository's own path for reference, /models for tensorrtllm.",
        rich_help_panel=KEPT,
    ),
]
CheckServedPathOpt = Annotated[
    bool,
    typer.Option(
        "--check-served-path",
        help="Refuse unless --served-path is this repository here (run where Triton mounts it).",
    ),
]
TokenizerDirOpt = Annotated[
    str | None,
    typer.Option(
        "--tokenizer-dir", help="Tokenizer folder as Triton will see it (default: --base).", rich_help_panel=KEPT
    ),
]
TpOpt = Annotated[int, typer.Option("--tp", help="Tensor parallelism of the engine.")]
MaxBatchSizeOpt = Annotated[
    int | None,
    typer.Option("--max-batch-size", help="Triton max batch size (default 8).", rich_help_panel=KEPT),
]
MaxLoraRankOpt = Annotated[
    int | None,
    typer.Option(
        "--max-lora-rank", help="reference: largest rank accepted on requests (default 64).", rich_help_panel=KEPT
    ),
]
LoraCacheMbOpt = Annotated[
    int | None,
    typer.Option(
        "--lora-cache-mb",
        help="Host LoRA cache (default 0 = sized from the registered adapters; tensorrtllm: in the runtime's pages).",
        rich_help_panel=KEPT,
    ),
]
DecoupledOpt = Annotated[
    bool | None,
    typer.Option(
        "--decoupled/--no-decoupled",
        help="Stream tokens (ModelStreamInfer) instead of one response (default: one response).",
        rich_help_panel=KEPT,
        show_default=False,
    ),
]
TrtllmVersionOpt = Annotated[
    str | None,
    typer.Option(
        "--trtllm-version",
        help="TensorRT-LLM Triton backend release whose input names are written: 0.20 (v0.20.0 and later: "
        "seed, min_tokens; the default) or 0.19 (random_seed, min_length).",
        rich_help_panel=KEPT,
    ),
]
LlmParameterOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--llm-parameter",
        help="KEY=VALUE parameter of the tensorrt_llm model, repeatable (e.g. max_input_len=1024, "
        "max_seq_len=2048, max_num_tokens=8192 for the reference model's limits).",
        rich_help_panel=KEPT,
    ),
]
PrefetchOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--prefetch",
        help="Adapter preloaded at start, repeatable (only these unless --prefetch-limit adds the most used).",
        rich_help_panel=KEPT,
    ),
]
PrefetchLimitOpt = Annotated[
    int | None,
    typer.Option(
        "--prefetch-limit",
        help="Preload at most N adapters: the --prefetch ones, then the most used (--prefetch-usage), "
        "then by name; the router sends the others on first use (default: all).",
        rich_help_panel=KEPT,
    ),
]
PrefetchUsageOpt = Annotated[
    Path | None,
    typer.Option(
        "--prefetch-usage",
        help="Request counts per adapter: the router's /metrics text or a JSON object {name: count}.",
        rich_help_panel=KEPT,
    ),
]
LoraCacheSpareOpt = Annotated[
    int | None,
    typer.Option(
        "--lora-cache-spare",
        help="Adapters (of the largest kind) the LoRA cache keeps room for besides the preloaded ones "
        "(default: --max-batch-size).",
        rich_help_panel=KEPT,
    ),
]
GpuFreeMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--gpu-free-memory-gib",
        help="tensorrtllm: free GPU memory when the LoRA cache is allocated; sizes "
        "lora_cache_gpu_memory_fraction (default: 0.05 as TensorRT-LLM).",
        rich_help_panel=KEPT,
    ),
]
ReplaceOpt = Annotated[
    bool, typer.Option("--replace", help="Allow a registered name to get different weights (new task id).")
]
GraceOpt = Annotated[
    float,
    typer.Option(
        "--grace", help="Seconds the old tensors of a replaced adapter are kept for routers still using them."
    ),
]
