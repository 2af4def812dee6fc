"""`phlora-nim export`: TensorRT-LLM, NIM and PEFT outputs from our and third-party adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.core.errors import InputError
from phlora_nim.core.names import validate_adapter_name
from phlora_nim.engines.trtllm_legacy.tensors import load_trtllm, trtllm_to_adapter


@pytest.fixture
def adapter_dir(model_pairs, run_cli, tmp_path: Path) -> Path:
    base, ft = model_pairs("llama")
    out = tmp_path / "support-bot"
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, "--rank", "4", "--no-plot")
    assert code == 0, err
    return out


def _same_updates(a: Path, b_modules: dict, atol: float) -> None:
    ref = load_peft(a)
    assert ref.modules.keys() == b_modules.keys()
    for name, w in ref.modules.items():
        assert torch.allclose(b_modules[name].delta(), w.delta(), atol=atol), name


def test_export_trtllm_round_trips(adapter_dir: Path, run_cli, tmp_path: Path) -> None:
    out = tmp_path / "trt"
    code, _stdout, err = run_cli("export", adapter_dir, "--format", "trtllm", "--out", out, "--dtype", "float32")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} >= {"model.lora_weights.npy", "model.lora_config.npy"}
    _same_updates(adapter_dir, trtllm_to_adapter(load_trtllm(out)).modules, atol=1e-6)


def test_export_nim_store(adapter_dir: Path, run_cli, tmp_path: Path) -> None:
    store = tmp_path / "store"
    for name in ("alpha", "beta"):
        code, _, err = run_cli(
            "export", adapter_dir, "--format", "nim", "--out", store, "--name", name, "--with-trtllm"
        )
        assert code == 0, err
    assert sorted(p.name for p in store.iterdir()) == ["alpha", "beta"]
    folder = store / "alpha"
    assert {p.name for p in folder.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "model.lora_weights.npy",
        "model.lora_config.npy",
    }
    # The .bin (what NIM 1.x on TensorRT-LLM reads) holds the same tensors as the safetensors file.
    from safetensors.torch import load_file

    st = load_file(str(folder / "adapter_model.safetensors"))
    binary = torch.load(folder / "adapter_model.bin", weights_only=True)
    assert st.keys() == binary.keys() and all(torch.equal(st[k], binary[k]) for k in st)
    _same_updates(adapter_dir, load_peft(folder).modules, atol=0)


def test_export_peft_with_dtype(adapter_dir: Path, run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("export", adapter_dir, "--format", "peft", "--out", tmp_path / "p", "--dtype", "bfloat16")
    assert code == 0, err
    assert {w.a.dtype for w in load_peft(tmp_path / "p").modules.values()} == {torch.bfloat16}


def test_export_checks_engine(adapter_dir: Path, run_cli, tmp_path: Path) -> None:
    engine = tmp_path / "config.json"
    engine.write_text(
        json.dumps(
            {
                "pretrained_config": {"dtype": "bfloat16", "num_hidden_layers": 2},
                "build_config": {
                    "lora_config": {"max_lora_rank": 2, "lora_target_modules": ["attn_q", "attn_v"]},
                    "plugin_config": {"lora_plugin": "bfloat16"},
                },
            }
        )
    )
    out = tmp_path / "trt"
    code, _, err = run_cli("export", adapter_dir, "--format", "trtllm", "--out", out, "--engine-config", engine)
    assert code == 2 and "Invalid low_rank" in err and "not enabled for this model" in err
    assert not out.exists()
    # dtype defaults to the engine's
    engine.write_text(
        json.dumps(
            {
                "pretrained_config": {"dtype": "bfloat16", "num_hidden_layers": 2},
                "build_config": {"lora_config": {"max_lora_rank": 8}, "plugin_config": {"lora_plugin": "auto"}},
            }
        )
    )
    code, _, err = run_cli("export", adapter_dir, "--format", "trtllm", "--out", out, "--engine-config", engine)
    assert code == 0, err
    assert np.load(out / "model.lora_weights.npy").dtype == np.dtype("V2")


BAD_NAMES = ["../x", "a/b", "", "x" * 65, "..", "a..b", ".hidden", "-flag", "sp ace", "tab\t", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_adapter_names(name: str) -> None:
    with pytest.raises(InputError, match="adapter name"):
        validate_adapter_name(name)


@pytest.mark.parametrize("name", ["../x", "a/b"])
def test_export_rejects_bad_names_and_writes_nothing(name: str, adapter_dir: Path, run_cli, tmp_path: Path) -> None:
    store = tmp_path / "store"
    code, _, err = run_cli("export", adapter_dir, "--format", "nim", "--out", store, "--name", name)
    assert code == 2 and "adapter name" in err
    assert not store.exists() and not (tmp_path / "x").exists()


def test_export_bad_format(adapter_dir: Path, run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("export", adapter_dir, "--format", "onnx", "--out", tmp_path / "o")
    assert code == 2 and "unknown export format" in err


def test_export_peft_mixed_layout_stores_true_ranks_with_the_same_updates(model_pairs, run_cli, tmp_path: Path) -> None:
    """A padded folder of mixed ranks (--budget-params) exported --layout mixed: every module at its own
    rank, the same updates under PEFT's rule; nim and trtllm refuse it (exit 2, nothing written)."""
    from safetensors.torch import load_file

    base, ft = model_pairs("llama")
    padded = tmp_path / "padded"
    code, _, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", padded, "--budget-params", "3000", "--no-plot"
    )
    assert code == 0, err
    ranks = load_peft(padded).ranks()
    assert len(set(ranks.values())) > 1  # the budget gave the modules different ranks
    code, stdout, err = run_cli("export", padded, "--format", "peft", "--out", tmp_path / "m", "--layout", "mixed")
    assert code == 0, err
    assert "(peft, mixed)" in " ".join(stdout.split())
    stored = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    a_ranks = {
        k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0] for k, v in stored.items() if ".lora_A" in k
    }
    assert a_ranks == ranks  # no padding: each module's tensors at its true rank
    assert sum(v.numel() for v in stored.values()) < sum(
        v.numel() for v in load_file(str(padded / "adapter_model.safetensors")).values()
    )
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # PEFT reads each module's rank from it
    _same_updates(padded, load_peft(tmp_path / "m").modules, atol=1e-6)
    for fmt in ("nim", "trtllm"):
        code, _, err = run_cli("export", padded, "--format", fmt, "--out", tmp_path / fmt, "--layout", "mixed")
        assert code == 2 and "--layout mixed is for PEFT folders" in err and not (tmp_path / fmt).exists()
