"""The ``phlora-nim`` Typer app and what its command groups share: logging, error handling, option
types, the rank policy and the progress bar.

User errors (bad input, options, output paths) print one paragraph and exit with code 2; no
traceback. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from phlora_nim.core.errors import PhloraError

if TYPE_CHECKING:
    from rich.progress import Progress

    from phlora_nim.converters.rank_policy import RankPolicy

app = typer.Typer(
    name="phlora-nim",
    help="Post-hoc LoRA: turn full fine-tunes into LoRA adapters (data-free, gradient-free) and "
    "serve them from one TensorRT-LLM / Triton engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
out_console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("phlora_nim")
# The arguments of this run, as given to :func:`run_app` (recorded in reports).
_invocation: list[str] = []


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], format="%(message)s", force=True
    )
    for noisy in ("transformers", "peft", "matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


RankOpt = Annotated[
    int | None,
    typer.Option("--rank", "-r", help="Same rank R for every module.", rich_help_panel="Rank policy (choose one)"),
]
EnergyOpt = Annotated[
    float | None,
    typer.Option(
        "--energy",
        help="Per module, the smallest rank keeping ≥ F of its delta energy ‖ΔW‖²_F (0 < F ≤ 1).",
        rich_help_panel="Rank policy (choose one)",
    ),
]
BudgetOpt = Annotated[
    int | None,
    typer.Option(
        "--budget-params",
        help="One global budget of N LoRA parameters, spent where it buys the most energy: ranks differ per "
        "module. The default --layout padded stores every module at the largest rank (zero-padded, what vLLM "
        "needs); --layout mixed stores the true ranks.",
        rich_help_panel="Rank policy (choose one)",
    ),
]
MaxRankOpt = Annotated[
    int | None,
    typer.Option(
        "--max-rank",
        help="Cap per module for --energy/--budget-params (default 256).",
        rich_help_panel="Rank policy (choose one)",
    ),
]
SnapOpt = Annotated[
    str | None,
    typer.Option(
        "--snap-ranks",
        help="Round ranks up to a server's allowed set: 'vllm' = {1,8,16,32,64,128,256,320,512}.",
        rich_help_panel="Rank policy (choose one)",
    ),
]
LayoutOpt = Annotated[
    str,
    typer.Option(
        "--layout",
        help="How ranks that differ per module are stored. padded: every module zero-padded to the largest "
        "rank, r = lora_alpha = that rank, no patterns; read alike by PEFT, vLLM/NIM and TensorRT-LLM (vLLM pads "
        "to max_lora_rank anyway). mixed: each module at its own rank (rank_pattern, scale folded into lora_B "
        "for lora_alpha / rank); no padding, read alike by PEFT and TensorRT-LLM's HF loader (LLM API, "
        "trtllm-serve, Triton llmapi), not by vLLM before 0.32. The report gives both sizes.",
    ),
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Adapter storage dtype: auto (as the fine-tune), float32, float16 or bfloat16.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda[:N] for the decomposition.")]
StrictOpt = typer.Option(
    "--strict",
    help="TensorRT-LLM rows: refuse a module the engine would compute wrongly (o_proj where heads × head_dim ≠ "
    "hidden size) instead of leaving it out with a warning giving the energy lost.",
)
RepoOpt = Annotated[
    Path,
    typer.Option("--model-repository", "-m", help="Triton model repository folder (created if missing)."),
]


def rank_policy(
    rank: int | None,
    energy: float | None,
    budget: int | None,
    max_rank: int | None,
    snap: str | None,
    *,
    default_rank: int | None = None,
) -> RankPolicy:
    """The rank policy of the options given (``default_rank`` when none of rank/energy/budget is)."""
    from phlora_nim.converters.rank_policy import RankPolicy

    if rank is None and energy is None and budget is None:
        rank = default_rank
    return RankPolicy(rank=rank, energy=energy, budget_params=budget, max_rank=max_rank, snap=snap)  # type: ignore[arg-type]


def tensor_progress(verb: str) -> Progress:
    """The progress bar of tensor-by-tensor work (to stderr, gone when done)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn(f"[bold]{verb}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    return Progress(*columns, console=err_console, transient=True)


def command_line() -> str:
    """The command line as the user typed it, recorded in reports."""
    return shlex.join(["phlora-nim", *(_invocation or sys.argv[1:])])


def run_app(argv: list[str] | None = None) -> None:
    """Run the CLI: user errors print one paragraph and exit with their code (2), never a traceback."""
    _invocation[:] = list(sys.argv[1:] if argv is None else argv)
    try:
        # Standalone mode: usage errors print and exit 2, --help exits 0, typer.Exit(n) exits n.
        app(args=argv, prog_name="phlora-nim")
    except PhloraError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
