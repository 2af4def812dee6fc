"""One dtype vocabulary: each row's numpy, torch, Triton and wire names, and one parser for options."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from phlora_nim.core.dtypes import DTYPES, as_engine_array, dtype_for_wire, dtype_name_of, parse_dtype
from phlora_nim.core.errors import OptionError


def test_each_row_names_one_dtype_in_every_vocabulary() -> None:
    assert set(DTYPES) == {"float16", "bfloat16", "float32"}
    for name, row in DTYPES.items():
        assert row.torch == getattr(torch, name)
        assert torch.empty(0, dtype=row.torch).element_size() == row.itemsize == row.numpy.itemsize
        assert dtype_for_wire(row.wire) is row and row.triton == f"TYPE_{row.wire}"
        assert dtype_name_of(np.zeros(2, dtype=row.numpy)) == name
    # TensorRT-LLM's npy reader (numpyUtils.cpp typeFromNumpyDesc) has no bfloat16.
    assert [n for n, d in DTYPES.items() if not d.npy_readable] == ["bfloat16"]
    assert dtype_for_wire("FP64") is None and dtype_name_of(np.zeros(1, np.int32)) is None


def test_void_two_byte_arrays_are_viewed_back() -> None:
    stored = np.array([1.5, -2.0], dtype=DTYPES["bfloat16"].numpy).view("V2")  # as np.save writes bfloat16
    assert dtype_name_of(stored) == "bfloat16"
    assert as_engine_array(stored, "bfloat16").astype(np.float32).tolist() == [1.5, -2.0]
    f16 = np.array([0.5], dtype=np.float16)
    assert as_engine_array(f16.view("V2"), "float16").tolist() == [0.5]


@pytest.mark.parametrize(
    ("name", "auto", "match"),
    [
        ("float8", False, r"--x: unknown dtype; expected one of float16, bfloat16, float32; found 'float8'"),
        ("auto", False, r"--x: unknown dtype; expected one of float16"),
        ("fp16", True, r"expected one of auto, float16, bfloat16, float32; found 'fp16'\. Fix: pass one of auto"),
        ("", True, r"found ''"),
    ],
)
def test_unknown_names_say_where_what_and_the_fix(name: str, auto: bool, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_dtype(name, "--x", auto=auto)


def test_auto_only_where_allowed() -> None:
    assert parse_dtype("auto", "--dtype", auto=True) is None
    assert parse_dtype("bfloat16", "--dtype", auto=True) is DTYPES["bfloat16"]
    assert parse_dtype("float32", "--engine-dtype").name == "float32"


def test_safetensors_codes_are_the_ones_safetensors_writes(tmp_path: Path) -> None:
    for name, row in DTYPES.items():
        file = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.zeros(2, dtype=row.torch)}, str(file))
        raw = file.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        assert json.loads(raw[8 : 8 + header_len])["w"]["dtype"] == row.safetensors
