"""The llmapi engine's files of a registered adapter (``remove`` deletes them after the grace period)."""

from __future__ import annotations

from pathlib import Path

from phlora_nim.engines.trtllm_llmapi.deploy import store_dir
from phlora_nim.repository.registry import AdapterEntry


def engine_files(root: Path, entry: AdapterEntry) -> list[Path]:
    return [store_dir(root, entry.task_id)]
