"""Architecture maps: which weights of a model family are LoRA targets, as data.

Each family is one YAML file in ``converters/architectures/``. An entry names the module, a regex
over module paths (with a ``layer`` group), its TensorRT-LLM module and its input/output widths
as arithmetic over ``config.json`` fields. Adding a family means adding a file, not code.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

import yaml

from phlora_nim.converters.trtllm_modules import TRTLLM_MODULE_IDS
from phlora_nim.core.errors import InputError, OptionError

_MAP_FIELDS = {"family", "description", "architectures", "model_types", "num_layers", "defaults", "modules"}
_MODULE_FIELDS = {"name", "match", "trtllm", "rows", "in", "out"}


class Matcher(Protocol):
    """What a module entry needs of a pattern: ``re.Pattern.fullmatch``."""

    def fullmatch(self, string: str) -> re.Match[str] | None: ...


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-targetable linear module of a family."""

    name: str
    pattern: Matcher
    trtllm: str | None
    in_expr: str | None
    out_expr: str | None
    rows: tuple[str, ...] = ()

    @property
    def trtllm_id(self) -> int | None:
        return TRTLLM_MODULE_IDS.get(self.trtllm) if self.trtllm else None

    @property
    def trtllm_rows(self) -> tuple[str, ...]:
        """The TensorRT-LLM modules this module's rows are written as, in the order of B's row blocks.

        Usually just ``trtllm``. A fused module an engine does not take (Phi-3's ``gate_up_proj``)
        lists the separate modules it does take; B's rows are split evenly among them.
        """
        return self.rows or ((self.trtllm,) if self.trtllm else ())


@dataclass(frozen=True)
class ArchitectureMap:
    """The LoRA targets of one model family and how their dims follow from ``config.json``."""

    family: str
    description: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    num_layers: str | None
    defaults: tuple[tuple[str, str], ...]
    modules: tuple[ModuleSpec, ...]

    def match(self, module_path: str) -> tuple[ModuleSpec, int | None] | None:
        """The spec matching a module path (weight name without ``.weight``) and its layer."""
        for spec in self.modules:
            m = spec.pattern.fullmatch(module_path)
            if m:
                layer = m.groupdict().get("layer")
                return spec, int(layer) if layer is not None else None
        return None

    def resolved_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with this family's derived fields filled where config.json omits them."""
        values = dict(config)
        for key, expr in self.defaults:
            if values.get(key) is None:
                values[key] = evaluate(expr, values, where=f"{self.family}.yaml defaults.{key}")
        return values

    def dims(self, spec: ModuleSpec, config: dict[str, Any]) -> tuple[int, int] | None:
        """(in_dim, out_dim) of ``spec`` for this config, or None if the map gives none."""
        if spec.in_expr is None or spec.out_expr is None:
            return None
        values = self.resolved_config(config)
        where = f"{self.family}.yaml module {spec.name}"
        return evaluate(spec.in_expr, values, where=where), evaluate(spec.out_expr, values, where=where)


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


def evaluate(expr: str, values: dict[str, Any], *, where: str) -> int:
    """Evaluate integer arithmetic (``+ - * //``, parentheses) over config fields, safely.

    Raises:
        InputError: a referenced field is missing from config.json or not an integer.
    """

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            value = values.get(node.id)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(
                    f"config field {node.id!r} is needed to size modules",
                    where=f"config.json (for {where})",
                    expected="an integer",
                    found=repr(value) if node.id in values else "no such field",
                    fix="use the config.json saved with the checkpoint",
                )
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise OptionError(f"unsupported expression {expr!r}", where=where, expected="+ - * // over field names")

    return ev(ast.parse(expr, mode="eval"))


def _parse_map(text: str, source: str) -> ArchitectureMap:
    data = yaml.safe_load(text)
    problems = []
    if not isinstance(data, dict):
        raise OptionError("architecture map must be a mapping", where=source)
    unknown = set(data) - _MAP_FIELDS
    if unknown:
        problems.append(f"unknown fields {sorted(unknown)}")
    modules = []
    for i, entry in enumerate(data.get("modules") or []):
        extra = set(entry) - _MODULE_FIELDS
        if extra or not {"name", "match"} <= set(entry):
            problems.append(f"modules[{i}] needs name and match, may have {sorted(_MODULE_FIELDS)}")
            continue
        trt = entry.get("trtllm")
        rows = tuple(entry.get("rows") or ())
        for name in (trt, *rows) if trt is not None else rows:
            if name not in TRTLLM_MODULE_IDS:
                problems.append(f"modules[{i}] names {name!r}, not a TensorRT-LLM module")
        if rows and trt is None:
            problems.append(f"modules[{i}].rows needs trtllm (the fused module they stand for)")
        modules.append(
            ModuleSpec(
                name=entry["name"],
                pattern=re.compile(entry["match"]),
                trtllm=trt,
                in_expr=None if entry.get("in") is None else str(entry["in"]),
                out_expr=None if entry.get("out") is None else str(entry["out"]),
                rows=rows,
            )
        )
    if problems:
        raise OptionError("invalid architecture map: " + "; ".join(problems), where=source)
    return ArchitectureMap(
        family=data["family"],
        description=data.get("description", ""),
        architectures=tuple(data.get("architectures", ())),
        model_types=tuple(data.get("model_types", ())),
        num_layers=data.get("num_layers"),
        defaults=tuple((k, str(v)) for k, v in (data.get("defaults") or {}).items()),
        modules=tuple(modules),
    )


@cache
def builtin_maps() -> tuple[ArchitectureMap, ...]:
    """Every architecture map shipped with phlora-nim."""
    folder = resources.files("phlora_nim.converters") / "architectures"
    maps = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            maps.append(_parse_map(entry.read_text(encoding="utf-8"), f"architectures/{entry.name}"))
    return tuple(maps)


def find_map(config: dict[str, Any] | None) -> ArchitectureMap | None:
    """The map for a ``config.json`` (by ``architectures``, then ``model_type``), or None."""
    if not config:
        return None
    archs = config.get("architectures") or []
    for amap in builtin_maps():
        if any(a in amap.architectures for a in archs):
            return amap
    model_type = config.get("model_type")
    for amap in builtin_maps():
        if model_type in amap.model_types:
            return amap
    return None


def custom_map(regex: str) -> ArchitectureMap:
    """A map for ``--target-modules REGEX``: every 2-D weight whose module path matches."""
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise OptionError(
            f"invalid regular expression ({exc})",
            where="--target-modules",
            expected=r"a Python regex over module paths, e.g. '.*\.(q_proj|v_proj)'",
            found=repr(regex),
        ) from None
    layered = re.compile(r".*?layers?\.(?P<layer>\d+)\..*")
    return ArchitectureMap(
        family="custom",
        description=f"modules matching {regex!r}",
        architectures=(),
        model_types=(),
        num_layers=None,
        defaults=(),
        modules=(
            ModuleSpec(name="*", pattern=_AndPattern(pattern, layered), trtllm=None, in_expr=None, out_expr=None),
        ),
    )


class _AndPattern:
    """A user regex for selection plus a layer-finding regex, behind ``re.Pattern``'s fullmatch."""

    def __init__(self, select: re.Pattern[str], layered: re.Pattern[str]) -> None:
        self.select = select
        self.layered = layered

    def fullmatch(self, string: str) -> re.Match[str] | None:
        if not self.select.fullmatch(string):
            return None
        return self.layered.fullmatch(string) or self.select.fullmatch(string)
