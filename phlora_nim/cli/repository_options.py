"""The flag tables of the commands on a model repository besides ``convert`` (``adapters``, ``remove``,
``engine-plan``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phlora_nim.cli.flags import argument, option
from phlora_nim.repository.layout import DEFAULT_GRACE_S, GRACE

REPOSITORY_HELP = "Triton model repository folder (created if missing)."
DEFAULT_REPOSITORY = Path("model_repository")


@dataclass(frozen=True)
class AdaptersFlags:
    """``adapters``: which repository, shown how."""

    model_repository: Path = option("--model-repository", REPOSITORY_HELP, default=DEFAULT_REPOSITORY, short="-m")
    as_json: bool = option("--json", "Print the registry entries as JSON.", default=False)


@dataclass(frozen=True)
class RemoveFlags:
    """``remove``: which adapter of which repository, and how long its files outlive it."""

    name: str = argument("Adapter to unregister.")
    model_repository: Path = option("--model-repository", REPOSITORY_HELP, default=DEFAULT_REPOSITORY, short="-m")
    grace: float = option(
        "--grace",
        "Seconds its files are kept for routers that have not yet re-read the registry; the first "
        "convert or remove after that deletes them.",
        default=DEFAULT_GRACE_S,
        bound=GRACE,
    )


@dataclass(frozen=True)
class EnginePlanFlags:
    """``engine-plan``: which repository, for which engine build, shown how."""

    model_repository: Path = option("--model-repository", REPOSITORY_HELP, default=DEFAULT_REPOSITORY, short="-m")
    checkpoint_dir: str = option(
        "--checkpoint-dir", "TensorRT-LLM checkpoint folder to show in the command.", default="<trtllm_checkpoint_dir>"
    )
    engine_config: Path | None = option(
        "--engine-config",
        "A built engine's config.json: size the LoRA cache for it (default: the engine these flags build).",
        default=None,
    )
    as_json: bool = option("--json", "Print the plan as JSON.", default=False)
