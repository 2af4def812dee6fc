"""The flag tables of the commands on single adapters (``extract``, ``prune``, ``export``); the rank,
fidelity and decomposition tables they share with ``convert`` are in ``cli/extraction_flags.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phlora_nim.cli.flags import argument, option
from phlora_nim.converters.scale_rules import LAYOUTS
from phlora_nim.core.bounds import OneOf, share

# Texts of the options several commands take.
FORCE_HELP = "Replace the output folder if it exists."
STORAGE_DTYPE_HELP = "Adapter storage dtype: auto (as the fine-tune), float32, float16 or bfloat16."
LAYOUT_HELP = (
    "How ranks that differ per module are stored. padded: every module zero-padded to the largest "
    "rank, r = lora_alpha = that rank, no patterns; read alike by PEFT, vLLM/NIM and TensorRT-LLM (vLLM pads "
    "to max_lora_rank anyway). mixed: each module at its own rank (rank_pattern, scale folded into lora_B "
    "for lora_alpha / rank); no padding, read alike by PEFT and TensorRT-LLM's HF loader (LLM API, "
    "trtllm-serve, Triton llmapi), not by vLLM before 0.32. The report gives both sizes."
)
LAYOUT = OneOf("unknown adapter layout", LAYOUTS, fix="--layout padded or --layout mixed")
STRICT_HELP = (
    "TensorRT-LLM rows: refuse a module the engine would compute wrongly (o_proj where heads × head_dim ≠ "
    "hidden size) instead of leaving it out with a warning giving the energy lost."
)
OUT_HELP = "Adapter folder to create."


@dataclass(frozen=True)
class ExtractFlags:
    """``extract``'s inputs, output and what the adapter holds."""

    base: Path = option("--base", "Base checkpoint: HF model folder, .safetensors file or hub id (owner/name).")
    finetuned: Path = option("--finetuned", "Full fine-tune of the base, same layout (folder, file or hub id).")
    out: Path = option("--out", OUT_HELP, short="-o")
    exact: bool = option("--exact", "Full SVD instead of randomized (slower).", default=False)
    extra: str = option(
        "--extra",
        "Deltas outside linear modules (embeddings, lm_head, norms, biases): drop (measure and "
        "warn), save (as modules_to_save, tied heads and resized vocabularies included; not servable by "
        "vLLM/NIM/TensorRT-LLM) or error.",
        default="drop",
    )
    target_modules: str | None = option(
        "--target-modules",
        r"Regex over module paths to decompose instead of the architecture map, e.g. '.*\.(q_proj|v_proj)'.",
        default=None,
    )
    components: str | None = option(
        "--components",
        "Multi-part models (VLMs): comma-separated parts to write adapters for, e.g. "
        "language_model,vision_tower,multi_modal_projector (default: the language model; the others' "
        "share of the delta is reported). Tower/projector LoRA is served by vLLM with "
        "--enable-tower-connector-lora only.",
        default=None,
    )
    dtype: str = option("--dtype", STORAGE_DTYPE_HELP, default="auto")
    seed: int = option("--seed", "Seed of the randomized sketches.", default=0)
    layout: str = option("--layout", LAYOUT_HELP, default="padded", bound=LAYOUT)
    no_plot: bool = option("--no-plot", "Skip energy.png.", default=False)
    force: bool = option("--force", FORCE_HELP, default=False)

    @property
    def component_names(self) -> tuple[str, ...] | None:
        """``--components`` as names (None: the architecture map's default parts)."""
        if not self.components:
            return None
        return tuple(c.strip() for c in self.components.split(",") if c.strip())


@dataclass(frozen=True)
class InspectFlags:
    """``inspect``: which adapter's report, shown how."""

    adapter_dir: Path = argument("Folder written by `phlora-nim extract` or `prune`.")
    as_json: bool = option("--json", "Print the raw report as JSON.", default=False)
    top: int = option("--top", "Rows to show, worst energy kept first (0 = all).", default=20)


@dataclass(frozen=True)
class PruneFlags:
    """``prune``'s input and output (its rank policy is a :class:`RankFlags`)."""

    adapter_dir: Path = argument("Any PEFT LoRA adapter folder (ours or third-party).")
    out: Path = option("--out", OUT_HELP, short="-o")
    dtype: str = option("--dtype", STORAGE_DTYPE_HELP, default="auto")
    force: bool = option("--force", FORCE_HELP, default=False)
    layout: str = option("--layout", LAYOUT_HELP, default="padded", bound=LAYOUT)


@dataclass(frozen=True)
class ExportFlags:
    """``export``: which adapter, into which format, for which engine."""

    adapter_dir: Path = argument("A PEFT LoRA adapter folder (ours or third-party).")
    fmt: str = option(
        "--format",
        "trtllm (npy pair for TensorRT-LLM / Triton), nim (a folder in a NIM adapter store) or peft.",
        short="-f",
    )
    out: Path = option("--out", "Output folder (for nim: the store; the adapter goes into OUT/NAME).", short="-o")
    dtype: str = option(
        "--dtype",
        "Storage dtype. trtllm: the engine dtype (auto = the "
        "engine config's, else float16); peft/nim: auto keeps the adapter's.",
        default="auto",
    )
    tp: int = option(
        "--tp", "Tensor parallelism of the engine (interleaves fused qkv/gate_up rows per rank).", default=1
    )
    engine_config: Path | None = option(
        "--engine-config",
        "A TensorRT-LLM engine config.json: refuse what the engine would reject.",
        default=None,
    )
    name: str | None = option(
        "--name", "Adapter name in a NIM store (default: the adapter folder's name).", default=None
    )
    config: Path | None = option(
        "--config",
        "Base model config.json (or its folder), for fused modules at --tp > 1 "
        "(default: found via the adapter's base_model_name_or_path).",
        default=None,
    )
    with_trtllm: bool = option("--with-trtllm", "nim: add the TensorRT-LLM npy pair.", default=False)
    strict: bool = option("--strict", STRICT_HELP, default=False)
    force: bool = option("--force", FORCE_HELP, default=False)
    layout: str = option(
        "--layout", LAYOUT_HELP + " peft only (nim and trtllm pad by format).", default="padded", bound=LAYOUT
    )


@dataclass(frozen=True)
class VerifyFlags:
    """``verify``: the adapter, its fine-tune and base, and the gates that fail the check."""

    base: Path = option("--base", "Base checkpoint folder or hub id (owner/name).")
    finetuned: Path = option("--finetuned", "Fine-tuned checkpoint folder or hub id.")
    adapter: Path = option("--adapter", "PEFT LoRA adapter folder.")
    prompts: Path | None = option(
        "--prompts",
        "Text file, one prompt per line (needs a tokenizer in the checkpoint); default: random token sequences.",
        default=None,
    )
    max_kl: float | None = option("--max-kl", "Fail (exit 1) if mean KL exceeds this.", default=None)
    min_top1: float | None = option(
        "--min-top1", "Fail (exit 1) if top-1 agreement falls below this (0–1).", default=None
    )
    min_recovery: float | None = option(
        "--min-recovery",
        "Fail (exit 1) if the adapter closes less than this share of the reachable base→fine-tune gap, in "
        "KL ((KL_base − KL_adapter)/(KL_base − KL_floor), the floor being base + the fine-tune's whole delta on "
        "every module the adapter carries) or in top-1 disagreement (0–1); the raw share is printed beside it.",
        default=None,
        bound=share("recovery gate must be a share of the base→fine-tune gap", "0.9"),
    )
    as_json: bool = option("--json", "Print the result as JSON.", default=False)
