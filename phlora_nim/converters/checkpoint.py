"""Lazy, memory-mapped access to Hugging Face checkpoints.

A checkpoint is a model folder (``config.json`` plus ``model.safetensors``, sharded safetensors
with ``model.safetensors.index.json``, or ``pytorch_model*.bin``) or a single ``.safetensors``
file. Tensors are opened one at a time from memory maps, so reading a 70B checkpoint costs the
memory of its largest tensor, not of the model.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from phlora_nim.core.dtypes import DTYPES
from phlora_nim.core.errors import InputError

_FIX_REEXPORT = "re-download or re-save the checkpoint (save_pretrained writes a valid one)"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


@dataclass
class Checkpoint:
    """An opened checkpoint: tensor metadata up front, data on demand.

    Use :func:`open_checkpoint` to build one. ``config`` is the parsed ``config.json`` (``None``
    for a bare ``.safetensors`` file).
    """

    path: Path
    config: dict[str, Any] | None
    tensors: dict[str, TensorInfo]
    aliases: dict[str, str] = field(default_factory=dict)  # name → stored tensor it reads (a tied head)
    name: str | None = None  # how adapters name it (a hub id or an absolute path); None: the path
    _bin_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Shape/dtype of ``name``; :class:`InputError` if the checkpoint lacks it."""
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(
                f"tensor {name!r} is missing",
                where=str(self.path),
                expected="the same tensor names in base and fine-tuned checkpoints",
                found=f"{len(self.tensors)} tensors without this one",
                fix="pass checkpoints of the same architecture, saved the same way",
            ) from None

    def alias(self, name: str, stored: str) -> None:
        """Make ``name`` read the stored tensor ``stored`` (a tied output head reads the embedding)."""
        self.tensors[name] = dataclasses.replace(self.info(stored), name=name)
        self.aliases[name] = stored

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (memory-mapped where the format allows)."""
        info = self.info(name)
        name = self.aliases.get(name, name)
        try:
            if info.file.suffix == ".safetensors":
                # A fresh handle per tensor: the file map lives only as long as the returned tensor,
                # so pages of finished tensors leave the resident set (a long-lived map keeps every
                # touched page resident and RSS grows with the model).
                with safe_open(str(info.file), framework="pt") as handle:
                    return handle.get_tensor(name)
            return self._bin_state(info.file)[name]
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise InputError(
                f"cannot read tensor {name!r} ({exc})",
                where=str(info.file),
                expected="a complete, uncorrupted file",
                fix=_FIX_REEXPORT,
            ) from None

    def _bin_state(self, file: Path) -> dict[str, torch.Tensor]:
        state = self._bin_cache.get(file)
        if state is None:
            state = _torch_load(file)
            self._bin_cache.clear()  # keep one shard mapped at a time
            self._bin_cache[file] = state
        return state

    def close(self) -> None:
        """Drop every file handle and map."""
        self._bin_cache.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint folder or ``.safetensors`` file for lazy reading.

    Args:
        path: a model folder or a single ``.safetensors`` file.

    Returns:
        A :class:`Checkpoint` whose metadata is read and validated; tensor data stays on disk.

    Raises:
        InputError: the path is missing, holds no weights, or a weight file is corrupt.

    Example:
        >>> ckpt = open_checkpoint("models/llama-base")  # doctest: +SKIP
        >>> ckpt.info("model.layers.0.self_attn.q_proj.weight").shape  # doctest: +SKIP
        (4096, 4096)
    """
    root = Path(path)
    if not root.exists():
        raise InputError(
            "checkpoint not found",
            where=str(root),
            expected="a model folder or a .safetensors file",
            found="no such path",
            fix="check the path",
        )
    if root.is_file():
        if root.suffix != ".safetensors":
            raise InputError(
                "unsupported checkpoint file",
                where=str(root),
                expected="a .safetensors file or a model folder",
                found=f"a {root.suffix or 'suffix-less'} file",
                fix="point at the model folder, or convert the file to safetensors",
            )
        return Checkpoint(path=root, config=None, tensors=_safetensors_infos([root]))
    if not root.is_dir():
        raise InputError("not a file or folder", where=str(root), fix="check the path")
    if (root / "adapter_config.json").is_file() and not (root / "config.json").is_file():
        raise InputError(
            "this folder is a LoRA adapter, not a model checkpoint",
            where=str(root),
            expected="a full model folder (config.json and the weights of every layer)",
            found="adapter_config.json without config.json",
            fix="pass the full fine-tune (an adapter is what `extract` writes); to shrink an adapter use `prune`",
        )
    config = _read_config(root)
    files = _weight_files(root)
    tensors = _safetensors_infos(files) if files[0].suffix == ".safetensors" else _bin_infos(files)
    return Checkpoint(path=root, config=config, tensors=tensors)


def _read_config(root: Path) -> dict[str, Any] | None:
    cfg = root / "config.json"
    if not cfg.exists():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"config.json is not valid JSON ({exc})",
            where=str(cfg),
            fix="restore the file written by save_pretrained",
        ) from None
    if not isinstance(data, dict):
        raise InputError("config.json must hold a JSON object", where=str(cfg), found=type(data).__name__)
    return data


def _weight_files(root: Path) -> list[Path]:
    """The weight files of a folder, preferring safetensors, following index files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(
                    f"unreadable shard index ({exc})",
                    where=str(index),
                    expected='a JSON object with a "weight_map"',
                    fix=_FIX_REEXPORT,
                ) from None
            shards = sorted({root / f for f in weight_map.values()})
            missing = [s.name for s in shards if not s.exists()]
            if missing:
                raise InputError(
                    "shards named in the index are missing",
                    where=str(index),
                    found=f"missing {', '.join(missing)}",
                    fix="download every shard of the checkpoint",
                )
            return shards
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        found = sorted(root.glob(pattern))
        if found:
            return found
    raise InputError(
        "no weights in folder",
        where=str(root),
        expected="model.safetensors, sharded *.safetensors with an index, or pytorch_model*.bin",
        found=", ".join(sorted(p.name for p in root.iterdir())[:8]) or "an empty folder",
        fix="point at the folder save_pretrained wrote",
    )


def _safetensors_infos(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = handle.get_slice(name)
                    infos[name] = TensorInfo(
                        name=name, shape=tuple(sl.get_shape()), dtype=_st_dtype(sl.get_dtype(), file), file=file
                    )
        except (SafetensorError, OSError) as exc:
            raise InputError(
                f"corrupt or truncated safetensors file ({exc})",
                where=str(file),
                expected="a complete safetensors file",
                fix=_FIX_REEXPORT,
            ) from None
    return infos


# Weight dtypes from the one table; the other codes are read so that a non-float tensor reaches
# the checks that refuse it by name (a buffer of int64 position ids is not an unreadable file).
_ST_DTYPES = {d.safetensors: d.torch for d in DTYPES.values()} | {
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _st_dtype(code: str, file: Path) -> torch.dtype:
    try:
        return _ST_DTYPES[code]
    except KeyError:
        raise InputError(
            f"tensor dtype {code} is not supported",
            where=str(file),
            expected=" or ".join(d.safetensors for d in DTYPES.values()) + " weights",
            fix="dequantize the checkpoint first",
        ) from None


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """Load a ``pytorch_model*.bin`` safely: tensors only, memory-mapped, no pickled code."""
    if not zipfile.is_zipfile(file):
        raise InputError(
            "corrupt or legacy pytorch checkpoint",
            where=str(file),
            expected="a zip-format torch.save file",
            fix="re-save it with a current torch, or convert it to safetensors",
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for unreadable pickles
        raise InputError(
            f"cannot load pytorch checkpoint safely ({type(exc).__name__}: {str(exc)[:200]})",
            where=str(file),
            expected="a state dict of tensors",
            fix="convert it to safetensors",
        ) from None
    if not isinstance(state, dict):
        raise InputError("pytorch checkpoint is not a state dict", where=str(file), found=type(state).__name__)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _bin_infos(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, tensor in _torch_load(file).items():
            infos[name] = TensorInfo(name=name, shape=tuple(tensor.shape), dtype=tensor.dtype, file=file)
    return infos


class DeltaReader:
    """Forms ``W_ft − W_base`` in float32, one tensor pair at a time, in a reused buffer.

    Converting in row blocks into one preallocated buffer keeps the work in cache and avoids a
    fresh page-faulting allocation per tensor (about 6× faster than ``ft.float() - base``).
    The returned tensor is a view of the buffer: valid until the next call.
    """

    _ROWS = 32

    def __init__(self, base: Checkpoint, finetuned: Checkpoint) -> None:
        self.base = base
        self.finetuned = finetuned
        self._buffer = torch.empty(0, dtype=torch.float32)

    def _pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, fine-tuned) tensors of ``name``, checked to have one shape."""
        b = self.base.load(name)
        f = self.finetuned.load(name)
        if b.shape != f.shape:
            raise InputError(
                f"tensor {name!r} has different shapes",
                where=f"{self.base.path} vs {self.finetuned.path}",
                expected=f"{tuple(b.shape)} in both",
                found=f"{tuple(f.shape)} in the fine-tuned checkpoint",
                fix="pass a fine-tune of this exact base model",
            )
        return b, f

    def delta(self, name: str) -> torch.Tensor:
        """ΔW for ``name`` as float32 (a view into a shared buffer)."""
        b, f = self._pair(name)
        numel = b.numel()
        if self._buffer.numel() < numel:
            self._buffer = torch.empty(numel, dtype=torch.float32)
        out = self._buffer[:numel].view(b.shape)
        if b.dim() < 2:
            out.copy_(f)
            out.sub_(b)
            return out
        rows = b.shape[0]
        for i in range(0, rows, self._ROWS):
            blk = out[i : i + self._ROWS]
            blk.copy_(f[i : i + self._ROWS])
            blk.sub_(b[i : i + self._ROWS])
        return out

    def energy(self, name: str) -> float:
        """‖W_ft − W_base‖²_F in float64 without materialising the delta (NaN/Inf propagate).

        Row blocks go through a small scratch buffer: for embeddings and lm_head (the largest
        tensors, which only need measuring) this avoids a vocabulary-sized float32 copy.
        """
        b, f = self._pair(name)
        if b.dim() < 2:
            return float((f.double() - b.double()).pow(2).sum())
        b2, f2 = b.reshape(b.shape[0], -1), f.reshape(f.shape[0], -1)
        rows = 256
        scratch = torch.empty(min(rows, b2.shape[0]), b2.shape[1], dtype=torch.float32)
        total = 0.0
        for i in range(0, b2.shape[0], rows):
            blk = scratch[: min(rows, b2.shape[0] - i)]
            blk.copy_(f2[i : i + rows])
            blk.sub_(b2[i : i + rows])
            total += float(torch.linalg.vector_norm(blk, dim=1).double().pow(2).sum())
        return total
