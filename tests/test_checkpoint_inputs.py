"""Checkpoints as users have them: every case is a correct adapter (checked against PEFT) or one clear error.

Inputs are never harmed: each command that writes is run with outputs that are, contain or lie
inside its inputs, and with ``--force`` on folders it did not write; the inputs must be
byte-identical afterwards and the command must exit 2 with one message.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → SHA-256): what "byte-identical" compares."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def previous_outputs(model_pairs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapter ``extract`` wrote and one ``prune`` wrote, to copy into each case's workspace."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs import adapter_jobs

    base, ft = model_pairs("llama")
    root = tmp_path_factory.mktemp("previous")
    adapter_jobs.extract(base, ft, root / "extracted", ExtractOptions(policy=RankPolicy(rank=2)), plot=False)
    adapter_jobs.prune(root / "extracted", root / "pruned", RankPolicy(rank=1))
    return {"extracted": root / "extracted", "pruned": root / "pruned"}


@pytest.fixture
def workspace(model_pairs, previous_outputs, tmp_path: Path) -> Path:
    """``work/``: the base, the fine-tune, an unrelated file, an adapter, and previous outputs."""
    base, ft = model_pairs("llama")
    work = tmp_path / "work"
    shutil.copytree(base, work / "base")
    shutil.copytree(ft, work / "ft")
    (work / "notes.txt").write_text("not phlora-nim's\n", encoding="utf-8")
    shutil.copytree(previous_outputs["extracted"], work / "adapter")
    shutil.copytree(previous_outputs["extracted"], tmp_path / "old-extract")
    shutil.copytree(previous_outputs["pruned"], tmp_path / "old-prune")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "data.csv").write_text("1,2\n", encoding="utf-8")
    return work


@dataclass(frozen=True)
class Case:
    """A writing command, its output, and the one message it must refuse with."""

    name: str
    args: Callable[[Path], list[object]]  # from the workspace
    message: str


def _extract(out: str, *more: str) -> Callable[[Path], list[object]]:
    return lambda w: ["extract", "--base", w / "base", "--finetuned", w / "ft", "--out", _at(w, out), "-r", "2", *more]


def _at(work: Path, rel: str) -> Path:
    return work / rel if not rel.startswith("../") else work.parent / rel[3:]


REFUSED = [
    # The two reported: the fine-tune's folder, and the folder holding base, fine-tune and an unrelated file.
    Case("extract --force onto the fine-tune", _extract("ft", "--force"), "the output is an input"),
    Case("extract --force onto the folder of both", _extract(".", "--force"), "the output contains an input"),
    Case("extract into the fine-tune's folder", _extract("ft/adapter"), "the output lies inside an input"),
    Case("extract onto the base, no --force", _extract("base"), "the output is an input"),
    Case("extract --force onto an unrelated folder", _extract("../unrelated", "--force"), "--force replaces only"),
    Case("extract --force onto prune's output", _extract("../old-prune", "--force"), "--force replaces only"),
    Case(
        "prune --force onto its adapter",
        lambda w: ["prune", w / "adapter", "--out", w / "adapter", "-r", "1", "--force"],
        "the output is an input",
    ),
    Case(
        "prune --force onto the folder holding the adapter",
        lambda w: ["prune", w / "adapter", "--out", w, "-r", "1", "--force"],
        "the output contains an input",
    ),
    Case(
        "prune --force onto extract's output",
        lambda w: ["prune", w / "adapter", "--out", w.parent / "old-extract", "-r", "1", "--force"],
        "--force replaces only",
    ),
    Case(
        "export peft --force onto its adapter",
        lambda w: ["export", w / "adapter", "-f", "peft", "--out", w / "adapter", "--force"],
        "the output is an input",
    ),
    Case(
        "export nim into the store holding the adapter",
        lambda w: ["export", w / "adapter", "-f", "nim", "--out", w, "--force"],
        "the output is an input",
    ),
    Case(
        "export trtllm --force onto an unrelated folder",
        lambda w: ["export", w / "adapter", "-f", "trtllm", "--out", w.parent / "unrelated", "--force"],
        "--force replaces only",
    ),
    Case(
        "convert into the fine-tune's folder",
        lambda w: ["convert", "--base", w / "base", "--finetuned", w / "ft", "-m", w / "ft" / "repo", "-r", "2"],
        "the model repository lies inside an input",
    ),
    Case(
        "convert into the folder of both",
        lambda w: ["convert", "--base", w / "base", "--finetuned", w / "ft", "-m", w, "-r", "2"],
        "the model repository contains an input",
    ),
    Case("demo onto the folder of both", lambda w: ["demo", "--out", w], "--force replaces only a previous output"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.name)
def test_writing_commands_never_harm_inputs(case: Case, workspace: Path, run_cli) -> None:
    around = workspace.parent
    before = tree_digest(around)
    code, _, err = run_cli(*case.args(workspace))
    assert code == 2, err
    assert case.message in err, err
    assert "Traceback" not in err
    assert tree_digest(around) == before  # inputs, unrelated files and other outputs untouched, byte for byte


def test_force_replaces_a_previous_extract(workspace: Path, run_cli) -> None:
    out = workspace.parent / "old-extract"
    code, _, err = run_cli(*_extract("../old-extract", "--force")(workspace))
    assert code == 0, err
    assert (out / "adapter_config.json").is_file() and (out / "phlora_report.json").is_file()


# --- Checkpoints as people ship them: each case a correct adapter (PEFT reproduces the fine-tune) or one error.


def _toy(
    root: Path, *, base_tied: bool = False, ft_tied: bool = False, added: int = 0, seed: int = 0
) -> tuple[Path, Path]:
    """A tiny Llama and its full fine-tune (embeddings trained), with the given head tying and added tokens."""
    import torch

    from phlora_nim.demo.toy_models import build_model, finetune

    model = build_model("llama", seed=seed, tie_word_embeddings=base_tied)
    model.save_pretrained(root / "base")
    if added:
        model.resize_token_embeddings(model.config.vocab_size + added, mean_resizing=False)
    if base_tied != ft_tied:
        model.config.tie_word_embeddings = ft_tied
        if ft_tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    finetune(model, steps=6, seed=seed)
    model.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def peft_max_error(base: Path, ft: Path, adapter: Path) -> float:
    """max |logits(PEFT(base, adapter)) − logits(fine-tune)| on random tokens, the base resized first as
    the extraction's loading note says."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft_model = AutoModelForCausalLM.from_pretrained(ft).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    report = json.loads((adapter / "phlora_report.json").read_text())
    if "resize_token_embeddings" in (report.get("loading") or ""):
        base_model.resize_token_embeddings(ft_model.config.vocab_size)
    model = PeftModel.from_pretrained(base_model, adapter).eval()
    ids = torch.randint(0, ft_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(ids).logits - ft_model(ids).logits).abs().max())


@dataclass(frozen=True)
class Shipped:
    """A pair as found in the wild, how it is extracted, and the outcome: an adapter or one error."""

    name: str
    build: Callable[[Path], tuple[Path, Path]]
    args: tuple[str, ...] = ()
    error: str | None = None  # None: a correct adapter, checked against PEFT


def _config_edit(**changes: object) -> Callable[[Path], tuple[Path, Path]]:
    def build(root: Path) -> tuple[Path, Path]:
        import json

        base, ft = _toy(root)
        cfg = json.loads((ft / "config.json").read_text())
        cfg.update(changes)
        (ft / "config.json").write_text(json.dumps(cfg))
        return base, ft

    return build


def _unrelated(root: Path) -> tuple[Path, Path]:
    base, _ = _toy(root / "a")
    _, other = _toy(root / "b", seed=7)
    return base, other


def _nan_in(side: str) -> Callable[[Path], tuple[Path, Path]]:
    def build(root: Path) -> tuple[Path, Path]:
        from safetensors.torch import load_file, save_file

        base, ft = _toy(root)
        file = (base if side == "base" else ft) / "model.safetensors"
        tensors = load_file(str(file))
        tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
        save_file(tensors, str(file), metadata={"format": "pt"})
        return base, ft

    return build


def _adapter_as_finetune(root: Path) -> tuple[Path, Path]:
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs.adapter_jobs import extract

    base, ft = _toy(root)
    extract(base, ft, root / "adapter", ExtractOptions(policy=RankPolicy(rank=2)), plot=False)
    return base, root / "adapter"


SAVE = ("--extra", "save", "--energy", "1", "--max-rank", "64")
SHIPPED = [
    Shipped("untied heads, --extra save", lambda r: _toy(r), SAVE),
    Shipped("tied base and fine-tune, --extra save", lambda r: _toy(r, base_tied=True, ft_tied=True), SAVE),
    Shipped("tied base, untied fine-tune", lambda r: _toy(r, base_tied=True, ft_tied=False), SAVE),
    Shipped("untied base, tied fine-tune", lambda r: _toy(r, base_tied=False, ft_tied=True), SAVE),
    Shipped("added tokens", lambda r: _toy(r, added=3), SAVE),
    Shipped("added tokens, tied", lambda r: _toy(r, base_tied=True, ft_tied=True, added=3), SAVE),
    Shipped("added tokens, --extra drop", lambda r: _toy(r, added=3), ("-r", "2"), "vocabulary or size change"),
    Shipped(
        "config fields no adapter carries",
        _config_edit(rope_theta=1e6, max_position_embeddings=4096, hidden_act="gelu"),
        ("-r", "2"),
        "config fields no adapter can carry: rope_theta, max_position_embeddings, hidden_act",
    ),
    Shipped(
        "rope scaling changed, --allow-mismatch",
        _config_edit(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        ("-r", "2", "--allow-mismatch"),
    ),
    Shipped("unrelated weights of the same shapes", _unrelated, ("-r", "2"), "not a fine-tune of this base"),
    Shipped("NaN in the base", _nan_in("base"), ("-r", "2"), "not finite, from the base checkpoint"),
    Shipped("NaN in the fine-tune", _nan_in("ft"), ("-r", "2"), "not finite, from the fine-tuned checkpoint"),
    Shipped("an adapter folder as --finetuned", _adapter_as_finetune, ("-r", "2"), "is a LoRA adapter, not a model"),
]


@pytest.mark.parametrize("case", SHIPPED, ids=lambda c: c.name)
def test_shipped_checkpoints(case: Shipped, tmp_path: Path, run_cli) -> None:
    import json

    base, ft = case.build(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, "--no-plot", *case.args)
    if case.error is not None:
        assert code == 2, stdout + err
        assert case.error in err, err
        assert "Traceback" not in err and err.count("Fix:") == 1, err  # one error, not one per tensor
        if "NaN" in case.name:  # the file holding the NaN is named
            side = base if "base" in case.name else ft
            assert str(side / "model.safetensors") in err.replace("\n", ""), err
        assert not out.exists()
        return
    assert code == 0, err
    if "--allow-mismatch" not in case.args:  # an adapter run with the base's rope reproduces nothing exactly
        assert peft_max_error(base, ft, out) < 1e-4
    else:  # verify says the floor runs with the base's config
        code, _, err = run_cli("verify", "--base", base, "--finetuned", ft, "--adapter", out)
        assert code == 0 and "warning" in err and "rope_scaling" in err, err
    report = json.loads((out / "phlora_report.json").read_text())
    assert report["belonging"]["median_cosine"] > 0.2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    if "added" in case.name:
        resized = [x for x in report["extras"] if x["resized"]]
        assert resized and all(
            x["added_rows"] == 3 and x["delta_energy"] >= x["added_rows_energy"] > 0 for x in resized
        )
        assert "resize_token_embeddings(" in report["loading"] and "resize_token_embeddings(" in stdout
    if "tied base and fine-tune" in case.name or case.name == "added tokens, tied":
        assert config.get("ensure_weight_tying") is True and {"embed_tokens", "lm_head"} <= set(
            config["modules_to_save"]
        )


def test_relative_base_is_recorded_absolute(tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    _toy(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run_cli("extract", "--base", "base", "--finetuned", "ft", "--out", "ad", "-r", "2", "--no-plot")[0] == 0
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())


def _hand_built_cache(cache: Path, repo: str, folder: Path) -> None:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(folder, entry / "snapshots" / commit)


def test_hub_ids_from_the_cache_offline(tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    base, ft = _toy(tmp_path / "src")
    cache = tmp_path / "hub"
    _hand_built_cache(cache, "toy-org/toy-base", base)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any network use would fail
    out = tmp_path / "ad"
    code, _, err = run_cli("extract", "--base", "toy-org/toy-base", "--finetuned", ft, "--out", out, "-r", "2")
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "toy-org/toy-base"
    code, _, err = run_cli("verify", "--base", "toy-org/toy-base", "--finetuned", ft, "--adapter", out)
    assert code == 0, err
    from phlora_nim.converters.hub import config_json

    found = config_json("toy-org/toy-base")  # what export reads for the adapter's recorded base
    assert found is not None and json.loads(found.read_text()) == json.loads((base / "config.json").read_text())
    repo = tmp_path / "repo"
    code, _, err = run_cli(
        "convert", "--base", "toy-org/toy-base", "--finetuned", ft, "--name", "toy", "-m", repo, "-r", "2"
    )
    assert code == 0, err
    code, _, err = run_cli(
        "extract", "--base", "toy-org/missing", "--finetuned", ft, "--out", tmp_path / "x", "-r", "2"
    )
    assert code == 2 and "not in the Hugging Face cache (offline: HF_HUB_OFFLINE is set)" in err, err
    assert err.count("Fix:") == 1


# --- verify


def test_verify_added_tokens_and_saved_tensors(tmp_path: Path, run_cli) -> None:
    """Added tokens: the base is resized (no IndexError); the floor counts what modules_to_save carries,
    so a full-rank adapter with saved tensors recovers ~100 % of the reachable gap, not several times it."""
    import json

    base, ft = _toy(tmp_path, added=3)
    out = tmp_path / "ad"
    assert run_cli("extract", "--base", base, "--finetuned", ft, "--out", out, *SAVE)[0] == 0
    code, stdout, err = run_cli(
        "verify", "--base", base, "--finetuned", ft, "--adapter", out, "--json", "--min-recovery", "0.9"
    )
    assert code == 0, err
    logits = json.loads(stdout)["logits"]
    assert logits["base_resized_to"] is not None
    assert 0.95 <= logits["recovery_kl"] <= 1.05 and logits["mean_kl"] < 1e-4


def test_verify_without_reachable_gap_fails_the_gate() -> None:
    from phlora_nim.jobs.verify import gate_failures

    logits = {
        "mean_kl": 0.396, "top1_agreement": 0.0, "base_mean_kl": 0.401, "base_top1_agreement": 0.0,
        "floor_mean_kl": 0.45, "floor_top1_agreement": 0.0, "recovery_kl": None, "recovery_top1": None,
    }  # fmt: skip
    failed, _ = gate_failures(logits, max_kl=None, min_top1=None, min_recovery=0.9)
    assert len(failed) == 1 and "recovery undefined" in failed[0]


def test_verify_unrelated_finetune_fails_min_recovery(tmp_path: Path, run_cli) -> None:
    base, ft = _unrelated(tmp_path)
    out = tmp_path / "ad"
    args = ("--out", out, "--energy", "1", "--max-rank", "64", "--allow-mismatch")
    assert run_cli("extract", "--base", base, "--finetuned", ft, *args)[0] == 0
    code, _, err = run_cli("verify", "--base", base, "--finetuned", ft, "--adapter", out, "--min-recovery", "0.9")
    assert code == 1 and "recovery" in err, err


# --- smaller defects


def test_multi_problem_error_has_no_stray_line() -> None:
    from phlora_nim.core.errors import InputError, raise_all

    with pytest.raises(InputError) as info:
        raise_all([InputError("a", where="x"), InputError("b", where="y")], summary="two")
    text = str(info.value)
    assert text.splitlines()[-1] == "  - y: b." and not text.endswith("\n")


# --- threads


def test_thread_count_from_quota_affinity_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from phlora_nim.core.cpus import thread_count, usable_cpus
    from phlora_nim.core.errors import OptionError

    monkeypatch.delenv("PHLORA_THREADS", raising=False)
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs → 2
    assert usable_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU → 1
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota: the affinity mask
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    monkeypatch.setenv("PHLORA_THREADS", "3")
    assert thread_count(root=tmp_path) == 3 and thread_count(5, root=tmp_path) == 5
    monkeypatch.setenv("PHLORA_THREADS", "zero")
    with pytest.raises(OptionError, match="PHLORA_THREADS"):
        thread_count(root=tmp_path)
