"""PHLoRA extraction: base + full fine-tune → LoRA adapter, data-free and gradient-free.

Two steps, as in mergekit: :func:`plan_extraction` decides everything from metadata alone (which
tensors are LoRA targets, their ranks to compute, what is extra) and rejects bad input before any
heavy work; :func:`run_extraction` streams one tensor pair at a time through the decomposition.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.architecture import ArchitectureMap, ModuleSpec, custom_map, evaluate, find_map
from phlora_nim.converters.belonging import Similarity, config_mismatch, unrelated_weights, weight_similarity
from phlora_nim.converters.checkpoint import Checkpoint, DeltaReader
from phlora_nim.converters.decompose import Factors, decompose, frobenius_energy, module_seed
from phlora_nim.converters.embeddings import HEAD, align_heads, both_tied, input_embedding
from phlora_nim.converters.rank_policy import FidelityTarget, RankPolicy
from phlora_nim.converters.whitening import WhitenedFactors, weight_captured, whitened_decompose
from phlora_nim.core.dtypes import DTYPES, parse_dtype
from phlora_nim.core.errors import InputError, OptionError, PhloraError, raise_all

if TYPE_CHECKING:
    from phlora_nim.converters.calibration import InputStatistics

log = logging.getLogger("phlora_nim.extract")

# What to do with deltas outside linear modules (``--extra``).
NonLinearDeltas = Literal["drop", "save", "error"]
# Storage dtypes of adapters: the engine dtypes, float32 first.
_CONFIG_KEYS_MUST_MATCH = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "num_local_experts",
)


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract. Illegal combinations are rejected on construction.

    Args:
        policy: the rank policy.
        exact: full SVD instead of the randomized range finder.
        device: ``cpu`` or ``cuda`` (``cuda:N``) for the decomposition.
        non_linear_deltas: what to do with deltas outside linear modules (embeddings, norms, biases,
            lm_head): ``drop`` (measure them), ``save`` (as ``modules_to_save``) or ``error``.
        dtype: storage dtype of the adapter; ``auto`` keeps the fine-tuned checkpoint's.
        target_modules: regex over module paths, overriding the architecture map.
        seed: seed of the randomized sketches.
        calibration: a prompts file: decompose ΔW weighted by the base model's input activations
            on them (whitened SVD) instead of plain SVD.
        target: pick the smallest budget meeting this fidelity (``policy`` is then the ceiling).
        allow_mismatch: extract even when the fine-tune does not look like one of this base
            (config fields no adapter carries differ, or unrelated weights): warn instead of refusing.
    """

    policy: RankPolicy
    exact: bool = False
    device: str = "cpu"
    non_linear_deltas: NonLinearDeltas = "drop"
    dtype: str = "auto"
    target_modules: str | None = None
    seed: int = 0
    calibration: Path | None = None
    target: FidelityTarget | None = None
    allow_mismatch: bool = False
    threads: int | None = None  # torch threads (None: $PHLORA_THREADS, else the CPUs this process may use)

    def __post_init__(self) -> None:
        if self.non_linear_deltas not in ("drop", "save", "error"):
            raise OptionError(
                "unknown --extra mode",
                where="--extra",
                expected="drop, save or error",
                found=repr(self.non_linear_deltas),
            )
        parse_dtype(self.dtype, "--dtype", auto=True)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError(
                "CUDA is not available",
                where="--device",
                expected="a machine with a CUDA GPU",
                found="torch.cuda.is_available() is False",
                fix="use --device cpu",
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise OptionError("unknown device", where="--device", expected="cpu or cuda[:N]", found=self.device)


@dataclass(frozen=True)
class TargetPlan:
    """A linear module to decompose."""

    module: str
    weight: str
    module_type: str
    trtllm: str | None
    layer: int | None
    out_dim: int
    in_dim: int
    sketch_rank: int

    @property
    def short_side(self) -> int:
        return min(self.out_dim, self.in_dim)


@dataclass(frozen=True)
class ExtraPlan:
    """A tensor whose delta LoRA cannot carry: measured, then dropped or saved whole."""

    name: str
    kind: str
    base_shape: tuple[int, ...]
    ft_shape: tuple[int, ...]

    @property
    def resized(self) -> bool:
        return self.base_shape != self.ft_shape


@dataclass(frozen=True)
class ExtractionPlan:
    """What :func:`run_extraction` will do, decided from metadata alone.

    ``family`` names the map that chose the targets (``custom`` for ``--target-modules``,
    ``generic`` for an unknown family); ``architecture`` is the family's own map, which also lays
    the adapter out for TensorRT-LLM (None for an unknown family).
    """

    family: str
    targets: tuple[TargetPlan, ...]
    extras: tuple[ExtraPlan, ...]
    out_dtype: torch.dtype
    warnings: tuple[str, ...] = ()
    architecture: ArchitectureMap | None = None
    similarity: Similarity | None = None  # how much of the base the fine-tune's weights keep


@dataclass
class ModuleResult:
    plan: TargetPlan
    factors: Factors | None  # None: the delta is exactly zero
    lora: tuple[torch.Tensor, torch.Tensor] | None = None  # final (A, B) when the rank was known up front
    rank: int = 0
    load_s: float = 0.0
    decompose_s: float = 0.0


@dataclass
class ExtraResult:
    plan: ExtraPlan
    energy: float  # ‖ΔW‖²; for a resized tensor the change of the shared rows plus the added rows whole
    action: str
    added_rows: int = 0  # rows the fine-tune added (a resized vocabulary); negative: removed
    added_energy: float = 0.0  # ‖rows added‖² (part of energy)


@dataclass
class ExtractionResult:
    """Everything :func:`run_extraction` produced: the adapter and the measurements behind it."""

    adapter: LoraAdapter
    modules: list[ModuleResult]
    extras: list[ExtraResult]
    plan: ExtractionPlan
    timings: dict[str, float] = field(default_factory=dict)


def _classify(name: str) -> str:
    low = name.lower()
    if "lm_head" in low:
        return "lm_head"
    if "embed" in low or low.startswith(("wte.", "wpe.")) or ".wte." in low or ".wpe." in low:
        return "embedding"
    if "norm" in low or low.endswith(".ln_f.weight"):
        return "norm"
    if low.endswith(".bias"):
        return "bias"
    return "other"


def _fallback_linear(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and _classify(name) == "other"


def _same_config(base: Checkpoint, ft: Checkpoint) -> list[PhloraError]:
    if base.config is None or ft.config is None:
        return []
    problems: list[PhloraError] = []
    archs = (base.config.get("architectures"), ft.config.get("architectures"))
    if archs[0] and archs[1] and archs[0] != archs[1]:
        problems.append(
            InputError(
                "base and fine-tuned checkpoints are different architectures",
                where=f"{ft.path}/config.json architectures",
                expected=str(archs[0]),
                found=str(archs[1]),
                fix="pass a fine-tune of this base model",
            )
        )
    for key in _CONFIG_KEYS_MUST_MATCH:
        b, f = base.config.get(key), ft.config.get(key)
        if b is not None and f is not None and b != f:
            problems.append(
                InputError(
                    "base and fine-tuned configs disagree",
                    where=f"{ft.path}/config.json {key}",
                    expected=repr(b),
                    found=repr(f),
                    fix="pass a fine-tune of this base model",
                )
            )
    return problems


def _config_problems(ckpt: Checkpoint, amap: ArchitectureMap) -> list[PhloraError]:
    """Every config.json field ``amap`` sizes modules (and counts layers) with, present in ``ckpt``'s config.

    Without them, the module shapes checked here and the model served later would silently disagree.
    """
    if ckpt.config is None:
        return []
    exprs = [(f"module {m.name}", e) for m in amap.modules for e in (m.in_expr, m.out_expr) if e is not None]
    if amap.num_layers:
        exprs.append(("num_layers", amap.num_layers))
    problems: dict[str, PhloraError] = {}
    for what, expr in exprs:
        try:
            evaluate(expr, amap.resolved_config(ckpt.config), where=f"{amap.family}.yaml {what}")
        except InputError as exc:
            problems.setdefault(
                exc.problem,
                InputError(
                    exc.problem,
                    where=f"{ckpt.path}/config.json",
                    expected=f"{exc.expected} (the {amap.family} architecture map needs it)",
                    found=exc.found,
                    fix="use the config.json saved with the checkpoint",
                ),
            )
    return list(problems.values())


def plan_extraction(base: Checkpoint, ft: Checkpoint, options: ExtractOptions) -> ExtractionPlan:
    """Decide targets, sketch ranks and extras from metadata; reject bad input with one error.

    Raises:
        InputError: incompatible checkpoints, missing tensors, shape mismatches, vocabulary resizes
            (unless ``non_linear_deltas="save"``), unsupported dtypes.
        OptionError: a rank above a module's dimensions, or nothing to extract.
    """
    align_heads(base, ft)
    problems = _same_config(base, ft)
    problems.extend(config_mismatch(base, ft, allow=options.allow_mismatch))
    raise_all(problems, summary="the checkpoints do not match")
    config = ft.config or base.config or {}
    warnings: list[str] = []
    amap, family_map = _maps(base, ft, options, config, problems=problems, warnings=warnings)
    problems.extend(_missing_tensor_problems(base, ft))
    targets: list[TargetPlan] = []
    extras: list[ExtraPlan] = []
    for name in ft.names():
        if name not in base.tensors:
            continue
        item, problem = _plan_tensor(name, base, ft, amap, options, config)
        if problem is not None:
            problems.append(problem)
        if isinstance(item, TargetPlan):
            targets.append(item)
        elif isinstance(item, ExtraPlan):
            extras.append(item)
    problems.extend(_resize_problem(extras, ft, options))
    problems.extend(_rank_problems(targets, options))
    if not targets and not problems:
        problems.append(
            OptionError(
                "no LoRA target modules found",
                where=str(ft.path),
                expected="linear weights matched by the architecture map or --target-modules",
                found=f"{len(ft.tensors)} tensors, none matched",
                fix="pass --target-modules REGEX",
            )
        )
    raise_all(problems, summary="cannot extract an adapter")
    # Before any decomposition: a few tensor reads say whether this is a fine-tune of this base at all.
    similarity = weight_similarity(base, ft, [t.weight for t in targets])
    raise_all(unrelated_weights(similarity, base, ft, allow=options.allow_mismatch), summary="")
    storage = parse_dtype(options.dtype, "--dtype", auto=True)
    out_dtype = storage.torch if storage is not None else ft.info(targets[0].weight).dtype
    return ExtractionPlan(
        family=amap.family if amap else "generic",
        targets=tuple(targets),
        extras=tuple(extras),
        out_dtype=out_dtype,
        warnings=tuple(warnings),
        architecture=family_map,
        similarity=similarity,
    )


def _maps(
    base: Checkpoint,
    ft: Checkpoint,
    options: ExtractOptions,
    config: dict[str, Any],
    *,
    problems: list[PhloraError],
    warnings: list[str],
) -> tuple[ArchitectureMap | None, ArchitectureMap | None]:
    """The map that chooses targets (``--target-modules``, else the family's) and the family's own.

    The family's map also lays the adapter out for TensorRT-LLM later. None: an unknown family
    (then every 2-D linear weight is a target, with a warning).
    """
    family_map = find_map(config)
    if options.target_modules:
        return custom_map(options.target_modules), family_map
    if family_map is None:
        warnings.append(
            f"unknown architecture {config.get('architectures') or config.get('model_type') or '(no config.json)'}:"
            " targeting every 2-D linear weight; pass --target-modules REGEX to choose"
        )
        return None, None
    for ckpt in (base, ft):
        problems.extend(_config_problems(ckpt, family_map))
    return family_map, family_map


def _missing_tensor_problems(base: Checkpoint, ft: Checkpoint) -> list[PhloraError]:
    """Tensors one side has and the other lacks (the first 20 of each side)."""
    base_names, ft_names = set(base.tensors), set(ft.tensors)
    problems: list[PhloraError] = []
    for missing_in, names in ((base, ft_names - base_names), (ft, base_names - ft_names)):
        side = "base" if missing_in is base else "fine-tuned"
        for name in sorted(names)[:20]:
            problems.append(
                InputError(
                    f"tensor {name!r} is missing in the {side} checkpoint",
                    where=str(missing_in.path),
                    expected="the same tensors on both sides",
                    fix="pass matching checkpoints",
                )
            )
    return problems


# What planning one tensor gives: a target, an extra or nothing, and the problem it raises if any.
PlannedTensor = tuple[TargetPlan | ExtraPlan | None, PhloraError | None]


def _plan_tensor(
    name: str,
    base: Checkpoint,
    ft: Checkpoint,
    amap: ArchitectureMap | None,
    options: ExtractOptions,
    config: dict[str, Any],
) -> PlannedTensor:
    """One tensor present on both sides: a target to decompose, an extra to measure, or nothing
    (integer buffers), with the problem it raises if any."""
    bi, fi = base.info(name), ft.info(name)
    if not (fi.dtype.is_floating_point and bi.dtype.is_floating_point):
        if not name.endswith(".weight"):
            return None, None  # integer buffers (position ids, masks) are not weights
        # A weight LoRA cannot carry (integer or quantized); skipping it would lose its delta.
        return None, InputError(
            "weight tensor is not floating point",
            where=f"{ft.path} {name}",
            expected="float32, float16 or bfloat16 on both sides",
            found=f"{str(bi.dtype).removeprefix('torch.')} in the base, "
            f"{str(fi.dtype).removeprefix('torch.')} in the fine-tune",
            fix="pass unquantized checkpoints saved in a float dtype",
        )
    floats = {d.torch for d in DTYPES.values()}
    if fi.dtype not in floats or bi.dtype not in floats:
        return None, InputError(
            "unsupported tensor dtype",
            where=f"{ft.path} {name}",
            expected="float32, float16 or bfloat16",
            found=f"{bi.dtype} / {fi.dtype}",
        )
    module = name.removesuffix(".weight") if name.endswith(".weight") else None
    matched = amap.match(module) if (amap is not None and module is not None and len(fi.shape) == 2) else None
    if module is None or not (matched is not None or (amap is None and _fallback_linear(name, fi.shape))):
        # A resize is refused once for all resized tensors (_resize_problem) unless they are saved.
        return ExtraPlan(name=name, kind=_classify(name), base_shape=bi.shape, ft_shape=fi.shape), None
    if bi.shape != fi.shape:
        return None, InputError(
            "weight shapes differ",
            where=f"{ft.path} {name}",
            expected=f"{bi.shape} as in the base",
            found=str(fi.shape),
            fix="pass a fine-tune of this exact base model",
        )
    return _plan_target(name, module, matched, fi.shape, amap, options, config, ft)


def _plan_target(
    name: str,
    module: str,
    matched: tuple[ModuleSpec, int | None] | None,
    shape: tuple[int, ...],
    amap: ArchitectureMap | None,
    options: ExtractOptions,
    config: dict[str, Any],
    ft: Checkpoint,
) -> PlannedTensor:
    """A linear target, its shape checked against what the architecture map derives from config.json."""
    out_dim, in_dim = shape
    spec, layer = matched if matched is not None else (None, None)
    if spec is not None and amap is not None and config:
        dims = amap.dims(spec, config)
        if dims is not None and dims != (in_dim, out_dim):
            return None, InputError(
                "weight shape does not follow from config.json",
                where=f"{ft.path} {name}",
                expected=f"[out={dims[1]}, in={dims[0]}] for {amap.family} {spec.name}",
                found=f"[out={out_dim}, in={in_dim}]",
                fix="check that config.json belongs to these weights",
            )
    target = TargetPlan(
        module=module,
        weight=name,
        module_type=spec.name if spec is not None and spec.name != "*" else module.rsplit(".", 1)[-1],
        trtllm=spec.trtllm if spec is not None else None,
        layer=layer,
        out_dim=out_dim,
        in_dim=in_dim,
        sketch_rank=options.policy.sketch_rank(min(out_dim, in_dim)),
    )
    return target, None


def _resize_problem(extras: list[ExtraPlan], ft: Checkpoint, options: ExtractOptions) -> list[PhloraError]:
    """One error for every tensor the fine-tune resized (added tokens), unless ``--extra save`` keeps them."""
    resized = [e for e in extras if e.resized]
    if not resized or options.non_linear_deltas == "save":
        return []
    return [
        InputError(
            "the fine-tune resized tensors (vocabulary or size change)",
            where=str(ft.path),
            expected="the base's shapes",
            found=", ".join(f"{e.name} {tuple(e.ft_shape)} (base {tuple(e.base_shape)})" for e in resized),
            fix="LoRA cannot carry a resize: pass --extra save to keep the resized tensors as modules_to_save "
            "(the base must then be resized to the fine-tune's vocabulary before loading the adapter)",
        )
    ]


def _rank_problems(targets: list[TargetPlan], options: ExtractOptions) -> list[PhloraError]:
    """A fixed ``--rank`` above some modules' smaller side."""
    rank = options.policy.rank
    too_big = [f"{t.module} [{t.out_dim}×{t.in_dim}]" for t in targets if rank is not None and rank > t.short_side]
    if not too_big:
        return []
    return [
        OptionError(
            "rank is above some modules' dimensions",
            where="--rank",
            expected=f"a rank ≤ the smaller side of every module ({min(t.short_side for t in targets)})",
            found=f"{rank} for {len(too_big)} modules, e.g. {', '.join(too_big[:3])}",
            fix="lower --rank, or use --energy/--budget-params with --max-rank",
        )
    ]


def _check_finite(delta: torch.Tensor, energy: float, name: str, reader: DeltaReader) -> None:
    """Refuse a non-finite delta, naming the checkpoint file that holds the non-finite values."""
    if math.isfinite(energy):
        return
    culprit = reader.finetuned
    for side in (reader.base, reader.finetuned):
        if not bool(torch.isfinite(side.load(name)).all()):
            culprit = side
            break
    bad = int((~torch.isfinite(culprit.load(name))).sum())
    # bad == 0: finite values whose squares overflowed, still a broken checkpoint for LoRA
    bad_desc = f"{bad} NaN/Inf values" if bad else "values too large to square in float32"
    which = "base" if culprit is reader.base else "fine-tuned"
    raise InputError(
        f"the weight delta is not finite, from the {which} checkpoint",
        where=f"{culprit.info(name).file} {name}",
        expected="finite weights",
        found=bad_desc,
        fix="the checkpoint is damaged (diverged training?): re-export it",
    )


def run_extraction(
    plan: ExtractionPlan,
    base: Checkpoint,
    ft: Checkpoint,
    options: ExtractOptions,
    *,
    progress: Callable[[str], None] | None = None,
    statistics: InputStatistics | None = None,
) -> ExtractionResult:
    """Stream every planned tensor pair through the decomposition and assemble the adapter.

    Peak memory is one float32 delta buffer plus the kept factors: it depends on the largest
    tensor, not on the number of layers.

    Args:
        plan: from :func:`plan_extraction`.
        base, ft: the opened checkpoints the plan was made for.
        options: the same options.
        progress: called with each tensor name once it is done.
        statistics: input second moments of the base model: modules with one are decomposed
            activation-aware (whitened SVD), the others by plain SVD.

    Returns:
        The adapter and per-module measurements.

    Raises:
        InputError: a delta holds NaN/Inf.
    """
    start = time.perf_counter()
    reader = DeltaReader(base, ft)
    # Extras first: measuring them is cheap, and --extra error must refuse before the expensive part.
    extras, saved, biases = _measure_extras(plan, reader, ft, options, progress=progress)
    _refuse_changed_extras(extras, ft, options)
    results = []
    for t in plan.targets:
        results.append(_decompose_target(t, reader, ft, options, statistics=statistics, out_dtype=plan.out_dtype))
        if progress:
            progress(t.weight)
    adapter = LoraAdapter(
        modules=_assign_ranks(results, options.policy),
        base_model_name_or_path=base.name or str(base.path.resolve()),
        modules_to_save=saved,
        lora_biases=biases,
        ensure_weight_tying=HEAD in saved and both_tied(base, ft),
    )
    return ExtractionResult(
        adapter=adapter,
        modules=results,
        extras=extras,
        plan=plan,
        timings={
            "load_s": sum(r.load_s for r in results),
            "decompose_s": sum(r.decompose_s for r in results),
            "extract_s": time.perf_counter() - start,
        },
    )


def _measure_extras(
    plan: ExtractionPlan,
    reader: DeltaReader,
    ft: Checkpoint,
    options: ExtractOptions,
    *,
    progress: Callable[[str], None] | None,
) -> tuple[list[ExtraResult], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every extra's delta energy and what became of it; with ``--extra save`` also the tensors kept
    whole (``modules_to_save``) and the bias deltas of LoRA targets (``lora_biases``)."""
    target_modules = {t.module for t in plan.targets}
    tied = both_tied(reader.base, ft)
    extras: list[ExtraResult] = []
    saved: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for e in plan.extras:
        added_rows, added_energy = 0, 0.0
        if e.resized:
            energy, added_rows, added_energy = _resized_energy(reader, e)
        else:
            energy = reader.energy(e.name)
            if not math.isfinite(energy):
                _check_finite(reader.delta(e.name), energy, e.name, reader)
        if energy == 0.0:
            action = "unchanged"
        elif options.non_linear_deltas == "save":
            action = "saved"
            owner = e.name.rsplit(".", 1)[0]
            if e.kind == "bias" and owner in target_modules and not e.resized:
                biases[owner] = reader.delta(e.name).clone()
            else:
                saved[e.name] = ft.load(e.name).clone()
                if tied and e.name == input_embedding(ft):
                    saved[HEAD] = saved[e.name].clone()  # the head is this embedding: PEFT must get both
        else:
            action = "dropped"
        extras.append(ExtraResult(e, energy, action, added_rows=added_rows, added_energy=added_energy))
        if progress:
            progress(e.name)
    return extras, saved, biases


def _resized_energy(reader: DeltaReader, e: ExtraPlan) -> tuple[float, int, float]:
    """(energy, rows added, their energy) of a resized tensor: the change of the rows both sides
    have, plus the rows only one side has, whole (added tokens count as changed from nothing)."""
    b, f = reader.base.load(e.name), reader.finetuned.load(e.name)
    if b.dim() != 2 or f.dim() != 2 or b.shape[1] != f.shape[1]:
        return frobenius_energy(f.float()), 0, 0.0
    shared = min(b.shape[0], f.shape[0])
    common = 0.0
    for i in range(0, shared, 256):
        j = min(i + 256, shared)
        common += frobenius_energy(f[i:j].float() - b[i:j].float())
    extra_rows = f[shared:] if f.shape[0] > shared else b[shared:]
    extra = frobenius_energy(extra_rows.float()) if extra_rows.numel() else 0.0
    return common + extra, int(f.shape[0] - b.shape[0]), extra


def _refuse_changed_extras(extras: list[ExtraResult], ft: Checkpoint, options: ExtractOptions) -> None:
    changed = [x for x in extras if x.action != "unchanged"]
    if options.non_linear_deltas == "error" and changed:
        names = ", ".join(x.plan.name for x in changed[:5])
        raise InputError(
            "the fine-tune changed tensors that are not linear modules",
            where=str(ft.path),
            expected="changes only in LoRA target modules (--extra error)",
            found=f"{len(changed)} changed tensors: {names}",
            fix="pass --extra drop to measure and drop them, or --extra save to keep them",
        )


def _decompose_target(
    t: TargetPlan,
    reader: DeltaReader,
    ft: Checkpoint,
    options: ExtractOptions,
    *,
    statistics: InputStatistics | None,
    out_dtype: torch.dtype,
) -> ModuleResult:
    """Decompose one target's delta (whitened where ``statistics`` has its inputs), keeping only what
    the rank policy can still use: the final factors when the rank is known now, else the sketch."""
    t0 = time.perf_counter()
    delta = reader.delta(t.weight)
    energy = frobenius_energy(delta)
    _check_finite(delta, energy, t.weight, reader)
    t1 = time.perf_counter()
    if energy == 0.0:
        return ModuleResult(plan=t, factors=None, load_s=t1 - t0)
    seed = module_seed(t.module, options.seed)
    chol = statistics.cholesky(t.module) if statistics is not None else None
    f: Factors
    if chol is not None:
        f = whitened_decompose(delta, chol, t.sketch_rank, exact=options.exact, device=options.device, seed=seed)
    else:
        f = decompose(delta, t.sketch_rank, exact=options.exact, device=options.device, seed=seed, total_energy=energy)
    fixed = options.policy.fixed_rank(t.short_side)
    lora = None
    if fixed is not None:
        # Rank known now: keep the final factors in the storage dtype and only the spectrum of the
        # sketch, so what is held per module is the adapter itself.
        a, b = f.lora(min(fixed, f.available_rank))
        lora = (a.to(out_dtype), b.to(out_dtype))
        f = f.spectrum_only()
    else:
        # Ranks are assigned across modules later: keep up to the cap, in compact storage.
        f = f.truncated(min(f.available_rank, t.sketch_rank)).compact()
    return ModuleResult(plan=t, factors=f, lora=lora, load_s=t1 - t0, decompose_s=time.perf_counter() - t1)


def _policy_ranks(live: list[ModuleResult], policy: RankPolicy) -> list[int]:
    """``policy``'s rank for every module with factors, in order."""
    return policy.assign([(r.factors, r.plan.short_side, r.plan.in_dim + r.plan.out_dim) for r in live])  # type: ignore[misc]


def _assign_ranks(results: list[ModuleResult], policy: RankPolicy) -> dict[str, LoraWeights]:
    """Give every decomposed module its rank (recorded in ``results``) and its final factors."""
    live = [r for r in results if r.factors is not None]
    modules: dict[str, LoraWeights] = {}
    for r, rank in zip(live, _policy_ranks(live, policy), strict=True):
        r.rank = rank
        if rank == 0 or r.factors is None:
            continue
        if r.lora is not None:
            a, b = r.lora
            rank = int(a.shape[0])
        else:
            rank = min(rank, r.factors.available_rank)
            a, b = r.factors.lora(rank)
        r.rank = rank
        # alpha = r: PEFT's scale alpha/r is exactly 1, so B·A is the update as stored.
        modules[r.plan.module] = LoraWeights(a=a, b=b, alpha=float(rank))
    return modules


def summary_energy(result: ExtractionResult) -> dict[str, Any]:
    """Totals in float64: energy kept over linear modules, and over the whole delta (weight space, also
    for activation-aware factors, whose output-space share is reported beside it)."""
    pairs = [weight_captured(r.factors, r.rank) for r in result.modules if r.factors is not None]
    linear = sum(total for _, total in pairs)
    kept = sum(k for k, _ in pairs)
    extra = sum(x.energy for x in result.extras)
    saved = sum(x.energy for x in result.extras if x.action == "saved")
    totals = {
        "linear_delta_energy": linear,
        "linear_kept_energy": kept,
        "energy_kept_linear": kept / linear if linear else 1.0,
        "extra_delta_energy": extra,
        "extra_kept_energy": saved,
        "energy_kept_total": (kept + saved) / (linear + extra) if (linear + extra) else 1.0,
    }
    whitened = [r for r in result.modules if isinstance(r.factors, WhitenedFactors)]
    if whitened:
        # E‖ΔW x‖² on the calibration inputs: the share the adapter reproduces of the output change.
        out_total = sum(r.factors.total_energy for r in whitened if r.factors is not None)
        out_kept = sum(r.factors.captured(r.rank) for r in whitened if r.factors is not None)
        totals["activation_aware_modules"] = len(whitened)
        totals["output_energy_kept_linear"] = out_kept / out_total if out_total else 1.0
    return totals


def reassign(result: ExtractionResult, policy: RankPolicy) -> ExtractionResult:
    """The same extraction truncated by another policy, from the spectra already computed.

    ``result`` must hold the factors (an extraction whose policy left ranks to be assigned across
    modules, e.g. :func:`~phlora_nim.converters.rank_policy.search_policy`); ranks above what was
    computed are capped there. Extras and saved tensors are kept as they are.
    """
    live = [r for r in result.modules if r.factors is not None]
    if any(r.lora is not None for r in live):
        raise ValueError("reassign needs an extraction that kept its factors (a budget or energy policy)")
    ranks = _policy_ranks(live, policy)
    new_ranks = {id(r): min(rank, r.factors.available_rank) for r, rank in zip(live, ranks, strict=True)}  # type: ignore[union-attr]
    modules_out: list[ModuleResult] = []
    weights: dict[str, LoraWeights] = {}
    for r in result.modules:
        rank = new_ranks.get(id(r), 0)
        modules_out.append(dataclasses.replace(r, rank=rank))
        if rank and r.factors is not None:
            a, b = r.factors.lora(rank)
            dtype = result.plan.out_dtype
            weights[r.plan.module] = LoraWeights(a=a.to(dtype), b=b.to(dtype), alpha=float(rank))
    adapter = dataclasses.replace(result.adapter, modules=weights)
    return dataclasses.replace(result, adapter=adapter, modules=modules_out)
