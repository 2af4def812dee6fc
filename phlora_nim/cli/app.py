"""The ``phlora-nim`` Typer app and what its command groups share: logging, error handling and the
progress bar (options shared by several commands are flag tables: ``cli/extraction_flags.py``).

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


RepoOpt = Annotated[
    Path,
    typer.Option("--model-repository", "-m", help="Triton model repository folder (created if missing)."),
]


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
