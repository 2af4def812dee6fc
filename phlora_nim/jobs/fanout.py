"""One fine-tune of a list per process: conversion fanned out over a cluster.

A Kubernetes Indexed Job runs one pod per fine-tune, each with the whole list and its own completion
index (``JOB_COMPLETION_INDEX``): :func:`one_of` narrows the job to that entry. Every pod writes its adapter
into the shared repository by renames, and the registry is merged under its lock (``registry.py``), so
pods finish in any order, and a pod retried after a failure redoes only its own fine-tune: the same weights
register as a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from phlora_nim.core.errors import OptionError
from phlora_nim.engines.trtllm_legacy.cache_plan import PENDING_ADAPTERS
from phlora_nim.jobs.convert import ConvertJob


def one_of(job: ConvertJob, index: int, *, where: str = "--index") -> ConvertJob:
    """``job`` narrowed to its ``index``-th fine-tune (0-based), named as it would be in the whole list.

    Raises:
        OptionError: ``index`` outside the list (a chart whose ``parallelism``/``completions`` disagree with
            its list of fine-tunes, say).
    """
    count = len(job.finetuned)
    if not 0 <= index < count:
        raise OptionError(
            "index outside the list of fine-tunes",
            where=where,
            expected=f"0 ≤ index < {count} (one per --finetuned)",
            found=str(index),
            fix="give as many Job completions as --finetuned entries",
        )
    names = job.adapter_names()
    return dataclasses.replace(job, finetuned=(Path(job.finetuned[index]),), names=(names[index],))


@contextlib.contextmanager
def siblings_pending(job: ConvertJob, index: int) -> Iterator[None]:
    """While converting entry ``index`` of ``job``: the other entries' adapters count as coming.

    ``--prefetch`` may name any adapter of the whole list; until its own process registers it, a commit
    preloads the named adapters registered so far instead of refusing the name as unknown.
    """
    names = job.adapter_names()
    token = PENDING_ADAPTERS.set(frozenset(n for i, n in enumerate(names) if i != index))
    try:
        yield
    finally:
        PENDING_ADAPTERS.reset(token)
