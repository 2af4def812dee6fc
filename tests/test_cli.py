"""The CLI as users run it: extract → inspect → prune → verify, help texts, exit codes."""

from __future__ import annotations

import json
import re
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


# What each command's help must say it does, and options a user of it needs (written by hand: a
# command that loses one of them, or its summary, fails here).
HELP = {
    "extract": (
        "Extract a LoRA adapter from a base checkpoint and its full fine-tune",
        ("--base", "--finetuned", "--out", "--rank", "--energy", "--target-kl"),
    ),
    "inspect": (
        "Print an adapter's extraction report",
        ("adapter_dir", "--json", "--top"),
    ),
    "prune": (
        "Re-truncate a LoRA adapter to a lower rank",
        ("adapter_dir", "--out", "--rank", "--energy"),
    ),
    "verify": (
        "Check an adapter against its fine-tune",
        ("--base", "--finetuned", "--adapter", "--max-kl", "--min-top1"),
    ),
    "export": (
        "Convert a LoRA adapter into the formats",
        ("adapter_dir", "--format", "--out", "--tp", "--with-trtllm"),
    ),
    "convert": (
        "Extract adapters from fine-tunes and register them in a Triton model repository",
        ("--base", "--finetuned", "--model-repository", "--name", "--backend", "--rank", "--replace"),
    ),
    "adapters": (
        "List the adapters registered in a model repository",
        ("--model-repository", "--json"),
    ),
    "remove": (
        "Unregister an adapter",
        ("name", "--model-repository", "--grace"),
    ),
    "engine-plan": (
        "Print the trtllm-build LoRA flags",
        ("--model-repository", "--checkpoint-dir", "--json"),
    ),
    "triton": (
        "Run the real Triton server",
        ("--model-repository", "--grpc-port", "--http-port"),
    ),
    "serve": (
        "Serve every registered adapter",
        ("--model-repository", "--upstream", "--port", "--tenants", "--tls-cert", "--http-port"),
    ),
    "demo": (
        "Run the whole job on an embedded default",
        ("--out", "--steps"),
    ),
}


def _flat(text: str) -> str:
    """Help text without the panels' box drawing and with wrapped lines joined."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def test_help_table_names_every_command() -> None:
    from typer.main import get_command

    from phlora_nim.cli.main import app

    visible = {name for name, command in get_command(app).commands.items() if not command.hidden}
    assert visible == set(HELP)


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_explains_each_command(command: str, run_cli) -> None:
    """``COMMAND --help`` says what the command does and shows every option it takes, each with its own help."""
    from typer.main import get_command

    from phlora_nim.cli.main import app

    code, stdout, err = run_cli(command, "--help")
    assert code == 0, err
    shown = _flat(stdout)
    summary, needed = HELP[command]
    assert f"Usage: phlora-nim {command}" in shown and summary in shown, shown[:400]
    defined = get_command(app).commands[command]
    for param in defined.params:
        if getattr(param, "hidden", False) or "--help" in param.opts:
            continue
        assert param.opts[0] in shown, f"{command} --help does not show {param.opts[0]}"
        text = _flat(re.sub("[`*]", "", getattr(param, "help", None) or ""))  # markdown marks render away
        assert text, f"{command} {param.opts[0]} has no help text"
        assert text[:40] in shown, f"{command} --help does not show the help of {param.opts[0]}: {text[:40]!r}"
    for name in needed:
        assert name in {o for p in defined.params for o in p.opts} and name in shown, (command, name)


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
