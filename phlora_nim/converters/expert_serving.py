"""What each engine reads of a MoE adapter, as data (``expert_serving.yaml``), and a check against it.

An engine that does not recognise an expert key drops that expert's update silently, and one that
ignores the router gate drops the router's; both change the served model without an error. So the
facts live in one data file, written from each engine's source, and :func:`serving_problems` says what
an engine would miss of a given adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Literal

import yaml

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExpertReader:
    """How one engine reads the routed experts of one family."""

    engine: str
    family: str
    source: str
    tested: str
    uniform_rank: bool
    router: Literal["read", "ignored"]
    experts: re.Pattern[str]
    router_keys: re.Pattern[str] | None = None
    trtllm_modules_to_hf_modules: Mapping[str, str] = field(default_factory=dict)


@cache
def expert_readers() -> tuple[ExpertReader, ...]:
    """Every (engine, family) entry of ``expert_serving.yaml``."""
    text = (resources.files("phlora_nim.converters") / "expert_serving.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    out = []
    for engine, entry in data["engines"].items():
        for family, keys in entry["families"].items():
            out.append(
                ExpertReader(
                    engine=engine,
                    family=family,
                    source=entry["source"],
                    tested=entry["tested"],
                    uniform_rank=bool(entry["uniform_rank"]),
                    router=entry["router"],
                    experts=re.compile(keys["experts"]),
                    router_keys=re.compile(keys["router"]) if keys.get("router") else None,
                    trtllm_modules_to_hf_modules=dict(keys.get("trtllm_modules_to_hf_modules") or {}),
                )
            )
    return tuple(out)


def expert_reader(engine: str, family: str) -> ExpertReader | None:
    """The entry for ``engine`` and ``family``, or None (the family has no routed experts there)."""
    return next((r for r in expert_readers() if r.engine == engine and r.family == family), None)


def serving_problems(reader: ExpertReader, expert_ranks: Mapping[str, int], router_modules: Iterable[str]) -> list[str]:
    """What ``reader``'s engine would miss or refuse of an adapter.

    Args:
        reader: the engine's entry.
        expert_ranks: every routed-expert module of the adapter (module path) → its stored tensor rank.
        router_modules: the adapter's router-gate modules.
    """
    problems = []
    for module in sorted(expert_ranks):
        for part in ("lora_A", "lora_B"):
            if not reader.experts.fullmatch(f"{module}.{part}.weight"):
                problems.append(f"{reader.engine} does not parse {module}.{part}.weight as an expert")
    ranks = set(expert_ranks.values())
    if reader.uniform_rank and len(ranks) > 1:
        problems.append(f"{reader.engine} needs one rank for every expert, found {sorted(ranks)}")
    routers = sorted(router_modules)
    if routers and reader.router == "ignored":
        problems.append(f"{reader.engine} ignores the router gate's LoRA ({len(routers)} modules)")
    elif routers and reader.router_keys is not None:
        for module in routers:
            if not reader.router_keys.fullmatch(f"{module}.lora_A.weight"):
                problems.append(f"{reader.engine} does not parse {module} as the router")
    return problems


def adapter_key(module: str, part: str) -> str:
    """The key PEFT writes for ``module``'s ``lora_A`` / ``lora_B`` (what every engine above reads)."""
    return f"{_PEFT_PREFIX}{module}.{part}.weight"
