"""The CLI as users run it: extract → inspect → prune → verify, help texts, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_extract_inspect_verify(model_pairs, run_cli, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    out = tmp_path / "adapter"
    code, stdout, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, "--rank", "8")
    assert code == 0, err
    assert "energy kept" in stdout and "dropped the deltas" in err
    code, stdout, _ = run_cli("inspect", out)
    assert code == 0 and "model.layers.0.self_attn.q_proj" in stdout and "energy_kept_linear" in stdout
    code, stdout, _ = run_cli("inspect", out, "--json")
    report = json.loads(stdout)
    assert report["policy"] == {
        "kind": "rank",
        "rank": 8,
        "energy": None,
        "budget_params": None,
        "max_rank": None,
        "snap": None,
    }
    assert report["command"].startswith("phlora-nim extract")
    code, stdout, err = run_cli("verify", "--base", base, "--finetuned", ft, "--adapter", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    logits = result["logits"]
    assert logits["mean_kl"] < logits["base_mean_kl"]
    assert result["reconstruction"]["modules"] == 14
    # Thresholds turn verify into a gate.
    code, _, err = run_cli("verify", "--base", base, "--finetuned", ft, "--adapter", out, "--max-kl", "1e-9")
    assert code == 1 and "verify failed" in err
    code, _, _ = run_cli("verify", "--base", base, "--finetuned", ft, "--adapter", out, "--min-top1", "0.0")
    assert code == 0


def test_full_rank_verify_is_near_exact(model_pairs, run_cli, tmp_path: Path) -> None:
    base, ft = model_pairs("mistral")
    out = tmp_path / "full"
    args = ("--energy", "1.0", "--max-rank", "512", "--extra", "save")
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, *args)
    assert code == 0, err
    code, stdout, err = run_cli(
        "verify", "--base", base, "--finetuned", ft, "--adapter", out, "--max-kl", "1e-6", "--min-top1", "0.999"
    )
    assert code == 0, err + stdout


def test_force_replaces_atomically(model_pairs, run_cli, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    out = tmp_path / "adapter"
    assert run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, "--rank", "2")[0] == 0
    assert run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, "--rank", "4", "--force")[0] == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize(
    "command",
    [
        "extract",
        "inspect",
        "prune",
        "verify",
        "export",
        "convert",
        "adapters",
        "remove",
        "engine-plan",
        "triton",
        "serve",
        "demo",
    ],
)
def test_help_explains_each_command(command: str, run_cli) -> None:
    code, stdout, _ = run_cli(command, "--help")
    assert code == 0 and "Usage" in stdout and len(stdout) > 300


def test_console_script_runs() -> None:
    exe = Path(sys.executable).with_name("phlora-nim")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "extract" in proc.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end(run_cli, tmp_path: Path) -> None:
    """Real Triton, real router, real adapters: every answer equals its fine-tuned model's own output."""
    code, stdout, err = run_cli("demo", "--out", tmp_path / "demo", "--steps", "20")
    assert code == 0, err + stdout
    assert "24/24 answers equal the output of the fine-tuned model" in stdout
    assert stdout.index("OpenAI API") < stdout.index("Triton gRPC")  # the OpenAI path first
    from phlora_nim.repository.registry import Registry

    assert sorted(Registry(tmp_path / "demo" / "model_repository").read().adapters) == [
        "stride-11",
        "stride-17",
        "stride-23",
    ]
    assert (tmp_path / "demo" / "model_repository" / "tensorrt_llm" / "1" / "model.yaml").is_file()  # the llmapi engine
