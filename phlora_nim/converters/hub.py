"""Checkpoints named by Hugging Face hub id (``owner/name[@revision]``), through huggingface_hub's cache.

A path that exists is always a path. Otherwise an ``owner/name`` spelling is looked up in the hub
cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), and downloaded there with
huggingface_hub's progress bars when missing, unless ``HF_HUB_OFFLINE`` is set: then only the
cache is read. Only what an extraction reads is fetched: configs, tokenizer files and the weights
(safetensors when the repository has them, else ``pytorch_model*.bin``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from phlora_nim.core.errors import InputError

log = logging.getLogger("phlora_nim.hub")

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
_ALWAYS = ["*.json", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Resolved:
    """Where a checkpoint given on the command line is on disk, and how to name it in an adapter."""

    path: Path
    hub_id: str | None = None  # the id as given, when it came from the hub

    @property
    def name(self) -> str:
        """``base_model_name_or_path``: the hub id, or the absolute path (valid from any directory)."""
        return self.hub_id or str(self.path.resolve())


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
    """The hub cache as set now (``HF_HUB_CACHE``, else huggingface_hub's default)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve(spec: str | Path, *, flag: str = "--base") -> Resolved:
    """A local path as is; an ``owner/name[@revision]`` that is no path, from the hub cache.

    Raises:
        InputError: no such path and not a hub id; not in the cache while offline; not on the hub.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return Resolved(path)
    text = str(spec)
    match = _HUB_ID.fullmatch(text)
    if match is None or text.startswith((".", "/", "~")):
        what = {"--base": "base ", "--finetuned": "fine-tuned "}.get(flag, "")
        raise InputError(
            f"{what}checkpoint not found",
            where=text,
            expected="a model folder, a .safetensors file, or a Hugging Face hub id (owner/name)",
            found="no such path",
            fix=f"check {flag}",
        )
    return Resolved(_snapshot(match["repo"], match["revision"], text, flag), hub_id=text)


def _download(repo: str, revision: str | None, cache: str, local_only: bool, weights: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo, revision=revision, cache_dir=cache, local_files_only=local_only, allow_patterns=[*_ALWAYS, weights]
    )


def _snapshot(repo: str, revision: str | None, text: str, flag: str) -> Path:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_only, cache = offline(), cache_dir()
    where = f"{flag} {text}"
    try:
        folder = Path(_download(repo, revision, cache, local_only, "*.safetensors"))
        if not any(folder.glob("*.safetensors")):
            folder = Path(_download(repo, revision, cache, local_only, "*.bin"))
    except LocalEntryNotFoundError:
        raise InputError(
            "not a local path, and not in the Hugging Face cache"
            + (" (offline: HF_HUB_OFFLINE is set)" if local_only else ""),
            where=where,
            expected=f"a model folder, or the hub id of a model in {cache}",
            found="no such path, no cached snapshot" + (f" of revision {revision}" if revision else ""),
            fix="check the path, or download the model once with network (`hf download "
            f"{repo}`), or unset HF_HUB_OFFLINE",
        ) from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise InputError(
            f"not a local path, and the hub refused the id ({type(exc).__name__})",
            where=where,
            expected="a model folder, or the id of a model you may read on the hub",
            found="no such path; " + str(exc).splitlines()[0][:200],
            fix="check the path or the id; for a gated model log in (`hf auth login`) and accept its licence",
        ) from None
    except (HFValidationError, OSError, ValueError) as exc:
        raise InputError(
            f"cannot fetch the checkpoint from the hub ({type(exc).__name__}: {str(exc)[:200]})",
            where=where,
            expected="a reachable hub, or the model in the local cache",
            fix="check the network, or set HF_HUB_OFFLINE=1 to use the cache only",
        ) from None
    log.info("%s: %s", text, folder)
    return folder


def config_json(spec: str | Path) -> Path | None:
    """The ``config.json`` of a model folder, or of a hub id (only that file is fetched, from the cache
    when offline); None when there is none to be had."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    match = _HUB_ID.fullmatch(str(spec))
    if path.exists() or match is None:
        return None
    from huggingface_hub import hf_hub_download

    try:
        found = hf_hub_download(
            match["repo"], "config.json", revision=match["revision"], cache_dir=cache_dir(), local_files_only=offline()
        )
        return Path(found)
    except (OSError, ValueError) as exc:  # not cached offline, unknown id, no network
        log.debug("config.json of %s not found: %s", spec, exc)
        return None
