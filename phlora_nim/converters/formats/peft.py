"""Hugging Face PEFT LoRA adapters: ``save_peft`` / ``load_peft``.

Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (``adapter_model.bin`` is read
too, and written on request for servers that only read it). Keys are
``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``…lora_B.weight`` ``[out, r]``.

What we write is read alike by the loaders it is meant for. They disagree on scaling when ranks
differ per module (their rules: :mod:`phlora_nim.converters.scale_rules`), so two layouts:

- ``padded`` (the default, read alike by PEFT, vLLM and TensorRT-LLM): every module zero-padded to
  the adapter's largest rank R (extra zero rows of A, zero columns of B: B·A is unchanged), its scale
  folded into B, and the config says ``r = lora_alpha = R`` with no patterns: scale 1 under every
  rule. The cost is storage at rank R for every module.
- ``mixed`` (PEFT and TensorRT-LLM's HF loader): every module at its own rank, ``rank_pattern`` for
  the ranks other than ``r``, no ``alpha_pattern``; both then scale by ``lora_alpha / r_m`` and B
  carries the rest. No padding; wrong under vLLM's global ``lora_alpha / r`` (before 0.32).

The true ranks stay in ``phlora_report.json``, and :func:`load_peft` trims any zero padding when
reading back.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights
from phlora_nim.converters.formats.peft_config import PeftAdapterConfig
from phlora_nim.converters.scale_rules import RULES, Layout, fold_factor, pattern_key, tensor_rank
from phlora_nim.converters.scale_rules import stored_parameters as _stored
from phlora_nim.core.errors import InputError, PhloraError, raise_all
from phlora_nim.core.json_files import read_json

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def portable_rank(adapter: LoraAdapter) -> int:
    """The one rank every module is written at: the largest (at least 1)."""
    return max((w.rank for w in adapter.modules.values()), default=1)


def stored_parameters(adapter: LoraAdapter, layout: Layout = "padded") -> int:
    """Parameters of the LoRA factors :func:`save_peft` writes in ``layout`` (padding included)."""
    return _stored({n: (w.rank, w.a.shape[1], w.b.shape[0]) for n, w in adapter.modules.items()}, layout)


def peft_config(adapter: LoraAdapter, layout: Layout = "padded") -> PeftAdapterConfig:
    """The ``adapter_config.json`` of ``adapter`` as :func:`save_peft` writes it.

    ``padded``: ``r = lora_alpha = R`` (the largest rank), no rank/alpha patterns, no rsLoRA: every
    loader then scales by 1, and the factors carry the true scale. ``mixed``: see
    :func:`~phlora_nim.converters.scale_rules.layout_config`.
    """
    return PeftAdapterConfig.of(
        ranks=adapter.ranks(),
        layout=layout,
        task_type=adapter.task_type,
        base_model_name_or_path=adapter.base_model_name_or_path,
        target_modules=adapter.leaf_names(),
        modules_to_save=sorted({p.rsplit(".", 1)[0].rsplit(".", 1)[-1] for p in adapter.modules_to_save}),
        lora_bias=bool(adapter.lora_biases),
        ensure_weight_tying=adapter.ensure_weight_tying,
    )


def padded_factors(
    w: LoraWeights, rank: int, *, use_rslora: bool, fold: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[rank, in]`` and B ``[out, rank]`` with the scale (times ``fold``, the engine rule's
    correction) folded into B, zero-padded: B·A = fold·scale·b·a."""
    a = torch.zeros(rank, w.a.shape[1], dtype=torch.float32)
    b = torch.zeros(w.b.shape[0], rank, dtype=torch.float32)
    a[: w.rank] = w.a.float()
    b[:, : w.rank] = w.b.float() * (w.scale(use_rslora=use_rslora) * fold)
    return a.to(w.a.dtype), b.to(w.b.dtype)


def save_peft(
    adapter: LoraAdapter,
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
    write_bin: bool = False,
    layout: Layout = "padded",
) -> None:
    """Write ``adapter`` as a PEFT LoRA folder in ``layout`` (the folder must exist; callers make it
    atomic).

    Args:
        adapter: what to write.
        folder: destination folder.
        dtype: storage dtype of the factors (default: as they are).
        write_bin: also write ``adapter_model.bin`` (NIM 1.x on TensorRT-LLM reads only that).
        layout: ``padded`` (every engine reads it alike) or ``mixed`` (true ranks; PEFT and
            TensorRT-LLM's HF loader), see :mod:`phlora_nim.converters.scale_rules`.
    """
    config = peft_config(adapter, layout).to_json()
    ranks = adapter.ranks()
    tensors: dict[str, torch.Tensor] = {}
    for name, w in adapter.modules.items():
        stored = tensor_rank(w.rank, ranks, layout)
        fold = fold_factor(config, name, stored, 1.0, layout)
        a, b = padded_factors(w, stored, use_rslora=adapter.use_rslora, fold=fold)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = _cast(a, dtype)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = _cast(b, dtype)
    for name, bias in adapter.lora_biases.items():
        # PEFT scales lora_B's bias like the update: store the change divided by that scale.
        w = adapter.modules.get(name)
        scale = RULES["peft"].scale(config, name, tensor_rank(w.rank, ranks, layout)) if w is not None else 1.0
        tensors[f"{PREFIX}{name}.lora_B.bias"] = _cast(bias if scale == 1.0 else bias.float() / scale, dtype)
    for name, tensor in adapter.modules_to_save.items():
        tensors[f"{PREFIX}{name}"] = _cast(tensor, dtype)
    save_file(tensors, str(Path(folder) / WEIGHTS_NAME), metadata={"format": "pt"})
    if write_bin:
        torch.save(tensors, Path(folder) / BIN_NAME)
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def trim_padding(w: LoraWeights, *, use_rslora: bool) -> LoraWeights:
    """Drop trailing rank components that are zero in both A and B (padding), keeping the update.

    Exact: a component with a zero A row and a zero B column adds nothing. At least rank 1 stays.
    """
    used = w.a.ne(0).any(dim=1) | w.b.ne(0).any(dim=0)
    nonzero = torch.nonzero(used).flatten()
    keep = max(int(nonzero[-1]) + 1 if nonzero.numel() else 1, 1)
    if keep == w.rank:
        return w
    scale = w.scale(use_rslora=use_rslora)
    alpha = scale * (math.sqrt(keep) if use_rslora else keep)
    return LoraWeights(a=w.a[:keep].clone(), b=w.b[:, :keep].clone(), alpha=alpha)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (t if dtype is None else t.to(dtype)).contiguous()


def load_peft_config(folder: Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``: it must describe a plain LoRA adapter."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise InputError(
            "adapter folder not found",
            where=str(folder),
            expected="a PEFT adapter folder",
            found="no such folder",
            fix="check the path",
        )
    if not path.exists():
        raise InputError(
            "not a PEFT adapter: adapter_config.json is missing",
            where=str(folder),
            expected="adapter_config.json + adapter_model.safetensors",
            fix="point at a folder written by PEFT's save_pretrained or phlora-nim",
        )
    cfg = read_json(path, what="adapter config", fix="restore the file")
    problems: list[PhloraError] = []
    if cfg.get("peft_type") != "LORA":
        problems.append(
            InputError(
                "not a LoRA adapter",
                where=f"{path} peft_type",
                expected='"LORA"',
                found=repr(cfg.get("peft_type")),
                fix="only LoRA adapters can be used here",
            )
        )
    if cfg.get("use_dora"):
        problems.append(
            InputError(
                "DoRA adapters are not supported",
                where=f"{path} use_dora",
                expected="false",
                found="true",
                fix="merge the DoRA magnitude first",
            )
        )
    if cfg.get("fan_in_fan_out"):
        problems.append(
            InputError(
                "fan_in_fan_out (Conv1D) adapters cannot be expressed",
                where=f"{path} fan_in_fan_out",
                expected="false",
                found="true",
                fix="use an adapter trained on nn.Linear modules",
            )
        )
    raise_all(problems, summary=f"{path} cannot be used")
    return cfg


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st, binf = Path(folder) / WEIGHTS_NAME, Path(folder) / BIN_NAME
    if st.exists():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as exc:
            raise InputError(
                f"corrupt or truncated adapter weights ({exc})",
                where=str(st),
                expected="a complete safetensors file",
                fix="re-export the adapter",
            ) from None
    if binf.exists():
        if not zipfile.is_zipfile(binf):
            raise InputError(
                "corrupt adapter weights",
                where=str(binf),
                expected="a torch.save zip file",
                fix="re-export the adapter",
            )
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for unreadable pickles
            raise InputError(
                f"cannot load adapter weights safely ({exc})",
                where=str(binf),
                fix="re-export the adapter as safetensors",
            ) from None
    raise InputError(
        "adapter weights are missing",
        where=str(folder),
        expected=f"{WEIGHTS_NAME} or {BIN_NAME}",
        found="neither",
        fix="re-export the adapter",
    )


_Tensors = dict[str, torch.Tensor]


def _sort_tensors(
    tensors: _Tensors, *, folder: Path, problems: list[PhloraError]
) -> tuple[_Tensors, _Tensors, _Tensors, _Tensors]:
    """lora_A, lora_B, lora_B.bias and modules_to_save tensors, by module path (PEFT's prefix removed)."""
    a_parts: _Tensors = {}
    b_parts: _Tensors = {}
    biases: _Tensors = {}
    saved: _Tensors = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if name.endswith(".lora_B.bias"):
            biases[name[: -len(".lora_B.bias")]] = tensor
            continue
        for marker, store in ((".lora_A.", a_parts), (".lora_B.", b_parts)):
            if marker in name:
                store[name.split(marker)[0]] = tensor
                break
        else:
            if "lora_embedding" in name or "lora_magnitude" in name:
                problems.append(
                    InputError(
                        "unsupported LoRA tensor",
                        where=f"{folder} {key}",
                        expected="lora_A/lora_B of linear modules",
                        fix="embedding LoRA and DoRA are not supported",
                    )
                )
            else:
                saved[name] = tensor
    return a_parts, b_parts, biases, saved


def load_peft(folder: Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (ours or third-party) into a :class:`LoraAdapter`.

    Raises:
        InputError: not LoRA, DoRA/fan_in_fan_out, unpaired or mis-shaped factors, corrupt files.
    """
    folder = Path(folder)
    cfg = load_peft_config(folder)
    tensors = _load_tensors(folder)
    problems: list[PhloraError] = []
    a_parts, b_parts, biases, saved = _sort_tensors(tensors, folder=folder, problems=problems)
    modules: dict[str, LoraWeights] = {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    default_alpha = cfg.get("lora_alpha", cfg.get("r", 8))
    for name in sorted(set(a_parts) | set(b_parts)):
        a, b = a_parts.get(name), b_parts.get(name)
        if a is None or b is None:
            problems.append(
                InputError(
                    "LoRA factor without its pair",
                    where=f"{folder} {name}",
                    expected="both lora_A and lora_B",
                    found="only one",
                )
            )
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(
                InputError(
                    "LoRA factor shapes do not chain",
                    where=f"{folder} {name}",
                    expected="lora_A [r, in] and lora_B [out, r]",
                    found=f"{tuple(a.shape)} and {tuple(b.shape)}",
                )
            )
            continue
        key = pattern_key(alpha_pattern, name)
        alpha = float(alpha_pattern[key] if key is not None else default_alpha)
        modules[name] = trim_padding(LoraWeights(a=a, b=b, alpha=alpha), use_rslora=use_rslora)
    if not modules and not problems:
        problems.append(
            InputError(
                "adapter holds no LoRA factors",
                where=str(folder),
                expected="lora_A/lora_B tensors",
                found=f"{len(tensors)} other tensors",
            )
        )
    raise_all(problems, summary=f"{folder} is not a usable LoRA adapter")
    return LoraAdapter(
        modules=modules,
        use_rslora=use_rslora,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type"),
        modules_to_save=saved,
        lora_biases=bias_deltas(biases, modules, use_rslora=use_rslora),
        ensure_weight_tying=bool(cfg.get("ensure_weight_tying", False)),
    )


def bias_deltas(
    biases: dict[str, torch.Tensor], modules: dict[str, LoraWeights], *, use_rslora: bool
) -> dict[str, torch.Tensor]:
    """The bias changes that stored ``lora_B.bias`` tensors make: each times its module's scale.

    PEFT's Linear forward (src/peft/tuners/lora/layer.py) adds ``lora_B(lora_A(x)) * scaling``, the
    bias inside ``lora_B``; :class:`LoraAdapter` keeps the change itself, so writing it again at scale
    1 (:func:`save_peft`) or pruning (which keeps biases) stays exact.
    """
    out = {}
    for name, bias in biases.items():
        w = modules.get(name)
        scale = 1.0 if w is None else w.scale(use_rslora=use_rslora)
        out[name] = bias if scale == 1.0 else (bias.float() * scale).to(bias.dtype)
    return out
