"""Bad input: one clear error naming the problem, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

Case = Callable[[Path, Path, Path], list[str]]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def missing_folder(base: Path, ft: Path, tmp: Path) -> list[str]:
    return ["--base", str(tmp / "nope"), "--finetuned", str(ft)]


def other_architecture(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    return ["--base", str(base), "--finetuned", str(other)]


def other_shapes(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")
    _edit_weights(other, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)}))
    return ["--base", str(base), "--finetuned", str(other)]


def missing_tensor(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")
    _edit_weights(other, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    return ["--base", str(base), "--finetuned", str(other)]


def truncated_file(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")
    data = (other / "model.safetensors").read_bytes()
    (other / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["--base", str(base), "--finetuned", str(other)]


def garbage_file(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")
    (other / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return ["--base", str(base), "--finetuned", str(other)]


def nan_delta(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")

    def poison(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")

    _edit_weights(other, poison)
    return ["--base", str(base), "--finetuned", str(other)]


def vocab_resized(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")

    def grow(t: dict[str, torch.Tensor]) -> None:
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            t[key] = torch.cat([t[key], torch.zeros(4, t[key].shape[1])])

    _edit_weights(other, grow)
    return ["--base", str(base), "--finetuned", str(other)]


def same_as_base(base: Path, ft: Path, tmp: Path) -> list[str]:
    return ["--base", str(base), "--finetuned", str(_copy(base, tmp / "same"))]


def int_weight(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(ft, tmp / "other")
    key = "model.layers.1.mlp.down_proj.weight"
    _edit_weights(other, lambda t: t.update({key: t[key].to(torch.int32)}))
    return ["--base", str(base), "--finetuned", str(other)]


def config_without_field(base: Path, ft: Path, tmp: Path) -> list[str]:
    other = _copy(base, tmp / "other")
    cfg = json.loads((other / "config.json").read_text())
    del cfg["intermediate_size"]
    (other / "config.json").write_text(json.dumps(cfg))
    return ["--base", str(other), "--finetuned", str(ft)]


def plain(base: Path, ft: Path, tmp: Path) -> list[str]:
    return ["--base", str(base), "--finetuned", str(ft)]


CASES: list[tuple[str, Case, list[str], str]] = [
    ("missing folder", missing_folder, [], "checkpoint not found"),
    ("different architectures", other_architecture, [], "different architectures"),
    ("different shapes", other_shapes, [], "weight shapes differ"),
    ("tensor missing on one side", missing_tensor, [], "missing in the fine-tuned checkpoint"),
    ("truncated safetensors", truncated_file, [], "corrupt or truncated"),
    ("corrupt safetensors", garbage_file, [], "corrupt or truncated"),
    ("NaN in a delta", nan_delta, [], "not finite"),
    ("vocabulary resized", vocab_resized, [], "vocabulary or size change"),
    ("fine-tune identical to the base", same_as_base, [], "no module differs from the base"),
    ("integer weight", int_weight, [], "down_proj.weight: weight tensor is not floating point"),
    ("config.json without a needed field", config_without_field, [], "config field 'intermediate_size'"),
    ("rank zero", plain, ["--rank", "0"], "rank must be positive"),
    ("negative rank", plain, ["--rank", "-2"], "rank must be positive"),
    ("rank above module dims", plain, ["--rank", "1000"], "above every module's smaller side"),
    ("energy above one", plain, ["--energy", "1.5"], "energy must be a share"),
    ("energy zero", plain, ["--energy", "0"], "energy must be a share"),
    ("two policies", plain, ["--rank", "4", "--energy", "0.5"], "exactly one rank policy"),
    ("unknown dtype", plain, ["--dtype", "float8"], "unknown dtype"),
    ("unknown extra mode", plain, ["--extra", "keep"], "unknown --extra mode"),
    ("extra=error with changed embeddings", plain, ["--extra", "error"], "not linear modules"),
    ("bad target regex", plain, ["--target-modules", "(unclosed"], "invalid regular expression"),
    ("regex matching nothing", plain, ["--target-modules", "nothing_here"], "no LoRA target modules"),
]


@pytest.mark.parametrize(("label", "make", "extra", "match"), CASES, ids=[c[0] for c in CASES])
def test_extract_rejects(label, make, extra, match, model_pairs, run_cli, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    out = tmp_path / "adapter"
    code, _, err = run_cli("extract", *make(base, ft, tmp_path), "--out", out, *extra)
    assert code == 2, err
    assert match in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")], "temporary output left behind"


def test_output_exists_without_force(model_pairs, run_cli, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, "--rank", "2")
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_output_not_writable(model_pairs, run_cli, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", blocker / "adapter", "--rank", "2")
    assert code == 2 and "not writable" in err


def test_prune_rejects_non_lora_adapter(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "ia3"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    save_file({"base_model.model.x.ia3_l.weight": torch.ones(4)}, str(src / "adapter_model.safetensors"))
    code, _, err = run_cli("prune", src, "--out", tmp_path / "out", "--rank", "2")
    assert code == 2 and "not a LoRA adapter" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({}, "adapter_config.json is missing"),
        ({"adapter_config.json": "{not json"}, "unreadable adapter config"),
        ({"adapter_config.json": json.dumps({"peft_type": "LORA"})}, "adapter weights are missing"),
        (
            {"adapter_config.json": json.dumps({"peft_type": "LORA", "use_dora": True})},
            "DoRA adapters are not supported",
        ),
        (
            {"adapter_config.json": json.dumps({"peft_type": "LORA", "fan_in_fan_out": True})},
            "fan_in_fan_out (Conv1D) adapters cannot be expressed",
        ),
    ],
)
def test_prune_rejects_broken_adapters(files: dict[str, str], match: str, run_cli, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    code, _, err = run_cli("prune", src, "--out", tmp_path / "out", "--rank", "2")
    assert code == 2 and match in err


def test_usage_errors_exit_2(run_cli) -> None:
    code, _, err = run_cli("extract", "--rank", "3")
    assert code == 2 and "Missing option" in err
