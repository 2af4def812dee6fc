"""Activation-aware extraction: whitened SVD minimises the output error on calibration inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phlora_nim.converters.decompose import decompose
from phlora_nim.converters.whitening import cholesky_factor, weight_energy, whitened_decompose

PROMPTS = Path(__file__).resolve().parents[1] / "phlora_nim" / "jobs" / "prompts" / "generic_prompts.txt"


def _anisotropic_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) * torch.logspace(0, -2, dim)  # strongly correlated inputs
    return torch.randn(n, dim, generator=gen) @ mix.T


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_whitened_output_error_is_at_most_plain_svds_and_weight_energy_is_honest(rank: int) -> None:
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(40, 48, generator=gen)
    x = _anisotropic_inputs(2000, 48)
    chol = cholesky_factor(x.T @ x / x.shape[0], ridge=1e-6)
    white = whitened_decompose(delta, chol, rank, exact=True)
    plain = decompose(delta, rank, exact=True)

    def out_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((delta - b @ a) @ x.T).pow(2).sum())

    def w_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((delta - b @ a).pow(2).sum())

    aw, bw = white.lora(rank)
    ap, bp = plain.lora(rank)
    assert out_err(aw, bw) <= out_err(ap, bp) * (1 + 1e-4)
    assert w_err(ap, bp) <= w_err(aw, bw) * (1 + 1e-4)  # Eckart–Young: plain SVD wins in weight space
    # Weight-space energy reported for whitened factors is the real 1 − ‖ΔW − BA‖²/‖ΔW‖².
    real = 1 - w_err(aw, bw) / float(delta.pow(2).sum())
    assert weight_energy(white, rank) == pytest.approx(real, abs=1e-4)
    assert weight_energy(white.spectrum_only(), rank) == pytest.approx(real, abs=1e-4)
    # Output-space energy kept is the share of E‖ΔW x‖² reproduced (ridge ~0: L Lᵀ = C).
    total_out = float((delta @ x.T).pow(2).sum())
    assert white.energy(rank) == pytest.approx(1 - out_err(aw, bw) / total_out, abs=1e-3)


def test_ridge_large_tends_to_plain_svd() -> None:
    delta = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    x = _anisotropic_inputs(500, 32)
    white = whitened_decompose(delta, cholesky_factor(x.T @ x / 500, ridge=1e6), 4, exact=True)
    plain = decompose(delta, 4, exact=True)
    (aw, bw), (ap, bp) = white.lora(4), plain.lora(4)
    assert torch.allclose(bw @ aw, bp @ ap, atol=1e-3)


def test_statistics_are_shared_by_modules_with_the_same_input(model_pairs) -> None:
    from transformers import AutoModelForCausalLM

    from phlora_nim.converters.calibration import collect_input_statistics

    base, _ = model_pairs("llama")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    stats = collect_input_statistics(model, [[3, 4, 5, 6, 7], [8, 9, 10]], names, batch_size=2)
    layer0 = {n.rsplit(".", 1)[-1]: stats.groups[n] for n in names if ".layers.0." in n}
    assert layer0["q_proj"] == layer0["k_proj"] == layer0["v_proj"]
    assert layer0["gate_proj"] == layer0["up_proj"]
    assert len({layer0["q_proj"], layer0["o_proj"], layer0["gate_proj"], layer0["down_proj"]}) == 4
    assert len(stats.moments) == 4 * model.config.num_hidden_layers  # one matrix per distinct input
    assert set(stats.tokens.values()) == {8}  # padding never counts


def test_extraction_with_calibration_lowers_output_error_at_equal_rank(
    tmp_path: Path, run_cli, llama_pair_with_tokenizer
) -> None:
    """On a toy model: per module, E‖(ΔW − BA) x‖² over the calibration inputs is ≤ plain SVD's, and
    the report keeps weight-space energies (checked against verify's reconstruction) beside output ones."""
    from transformers import AutoModelForCausalLM

    from phlora_nim.converters.calibration import base_input_statistics
    from phlora_nim.converters.formats.peft import load_peft
    from phlora_nim.jobs.verify import reconstruction_errors

    base, ft = llama_pair_with_tokenizer
    common = ["extract", "--base", base, "--finetuned", ft, "--rank", "2", "--exact", "--no-plot"]
    assert run_cli(*common, "--out", tmp_path / "plain")[0] == 0
    code, out, err = run_cli(*common, "--out", tmp_path / "white", "--calibration", PROMPTS)
    assert code == 0, err
    assert "activation-aware" in out
    report = json.loads((tmp_path / "white" / "phlora_report.json").read_text())
    assert report["calibration"]["tokens"] > 0 and "activation-aware" in report["method"]
    # The fine-tune acts on these prompts (KL(fine-tuned ‖ base) on them above the floor): no warning.
    assert report["calibration"]["finetune_gap_kl"] > 0.02 and "barely changes" not in err
    assert 0 < report["totals"]["energy_kept_linear"] < report["totals"]["output_energy_kept_linear"] <= 1
    recon = reconstruction_errors(base, ft, tmp_path / "white")["per_module"]
    for m in report["modules"]:
        assert m["activation_aware"] and m["relative_error"] == pytest.approx(recon[m["name"]], abs=1e-3)

    names = [m["name"] for m in report["modules"]]
    stats = base_input_statistics(base, PROMPTS, names, ridge=report["calibration"]["ridge"])
    ft_model = AutoModelForCausalLM.from_pretrained(ft)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    white, plain = load_peft(tmp_path / "white"), load_peft(tmp_path / "plain")
    for name in names:
        delta = ft_model.get_submodule(name).weight.detach() - base_model.get_submodule(name).weight.detach()
        moment = stats.moments[stats.groups[name]].double()

        def output_error(update: torch.Tensor, d: torch.Tensor = delta, c: torch.Tensor = moment) -> float:
            e = (d - update).double()
            return float(torch.trace(e @ c @ e.T))  # Σ over calibration tokens of ‖(ΔW − BA) x‖²

        assert output_error(white.modules[name].delta()) <= output_error(plain.modules[name].delta()) * 1.01 + 1e-9


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "prompts file not found"),
        ("", "prompts file is empty"),
        ("   \n\n", "prompts file is empty"),
        (b"\xff\xfe\x00bad", "unreadable prompts file"),
    ],
)
def test_bad_calibration_files_are_refused_before_any_work(
    tmp_path: Path, model_pairs, run_cli, content: str | bytes | None, match: str
) -> None:
    base, ft = model_pairs("llama")
    path = tmp_path / "calib.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, _, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", tmp_path / "a", "--calibration", path)
    assert code == 2
    assert match in err and "--calibration" in err
    assert not (tmp_path / "a").exists()


def test_calibration_on_prompts_the_finetune_does_not_act_on_warns(
    tmp_path_factory: pytest.TempPathFactory, run_cli, hidden_finetune
) -> None:
    """The shipped generic prompts cannot see a fine-tune that changed only behaviour after trigger
    tokens: whitening on them is warned about, with the measured KL, and the extraction still runs."""
    from phlora_nim.jobs.probe_checks import MIN_GAP_KL

    base, ft, _ = hidden_finetune
    out = tmp_path_factory.mktemp("calib-out") / "a"
    code, _, err = run_cli(
        "extract", "--base", base, "--finetuned", ft, "--out", out, "--rank", "2", "--no-plot", "--calibration", PROMPTS
    )
    assert code == 0, err
    err = " ".join(err.split())  # rich wraps lines
    assert "barely changes the model's outputs on these prompts" in err and "Calibrate on prompts of its task" in err
    gap = json.loads((out / "phlora_report.json").read_text())["calibration"]["finetune_gap_kl"]
    assert 0 < gap < MIN_GAP_KL and f"{gap:.3g}" in err
