"""``phlora-nim convert`` into a model repository: layout, registry, configs, bad input, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from phlora_nim.repository.layout import (
    ENSEMBLE_MODEL,
    LLM_MODEL,
    POSTPROCESSING_MODEL,
    PREPROCESSING_MODEL,
    adapter_store_dir,
    prefetch_dir,
)
from phlora_nim.repository.registry import Registry
from phlora_nim.router.catalog import AdapterCatalog

pytestmark = pytest.mark.slow
MODELS = (PREPROCESSING_MODEL, LLM_MODEL, POSTPROCESSING_MODEL, ENSEMBLE_MODEL)
# The TensorRT-LLM modules of a Llama adapter on every linear layer, in engine-plan's order.
LLAMA_TRTLLM_MODULES = ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (except the lock) with its bytes: 'nothing changed' is equality."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _config(root: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((root / model / "config.pbtxt").read_text(), mc.ModelConfig())


def test_three_finetunes_in_one_call(llama_finetunes, run_cli, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    args = ["convert", "--base", base, "-m", repo, "--rank", "8", "--engine-dtype", "float16"]
    args += ["--backend", "trtllm-legacy"]
    f16 = {"pretrained_config__dtype": "float16", "plugin_config__lora_plugin": "float16"}
    args += ["--engine-config", _engine_config(tmp_path, **f16, plugin_config__use_paged_context_fmha=True)]
    for ft, name in zip(fts, ("support", "legal", "code"), strict=True):
        args += ["--finetuned", ft, "--name", name]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "MB/s" in out
    state = Registry(repo).read()
    assert sorted(state.adapters) == ["code", "legal", "support"]
    ids = {e.task_id for e in state.adapters.values()}
    assert len(ids) == 3 and all(0 < i < 2**31 for i in ids)
    for name, entry in state.adapters.items():
        tensors = prefetch_dir(repo, entry.task_id)
        weights = np.load(tensors / "model.lora_weights.npy")
        lcfg = np.load(tensors / "model.lora_config.npy")
        assert weights.dtype == np.float16 and lcfg.dtype == np.int32 and lcfg.shape[2] == 3
        assert set(lcfg[0, :, 2]) == {8} and entry.dtype == "float16"
        store = adapter_store_dir(repo, name)
        for f in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "phlora_report.json"):
            assert (store / f).is_file(), f
        assert entry.sources["finetuned"].endswith(str(fts[["support", "legal", "code"].index(name)].name))
    # Every config parses into Triton's ModelConfig; LoRA inputs typed to the engine dtype.
    llm = _config(repo, LLM_MODEL)
    assert llm.backend == "tensorrtllm"
    assert llm.parameters["enable_chunked_context"].string_value == "true"  # the engine has paged context FMHA
    inputs = {i.name: i for i in llm.input}
    assert inputs["lora_weights"].data_type == mc.TYPE_FP16 and inputs["lora_weights"].optional
    assert inputs["lora_task_id"].data_type == mc.TYPE_UINT64
    assert list(inputs["lora_config"].dims) == [-1, 3]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    # The toy Llama's pages (PeftCacheManager::getPageManagerConfig): one-d sizes q 128, k/v 96,
    # dense 128, MLP 192 -> width 96; 2+1+1+2+3·2 = 12 slots per layer; optimal 8 · 12 · 2 layers =
    # 192 slots of 96 float16 = 36864 bytes a page. A rank-8 adapter: 11+8+8+11+3·16 = 86 slots a
    # layer, 172 in all: one page. 3 preloaded + 8 spare (the max batch size) = 11 pages.
    assert params["lora_cache_optimal_adapter_size"] == params["lora_cache_max_adapter_size"] == "8"
    assert params["lora_cache_host_memory_bytes"] == str(11 * 36864)
    assert params["lora_prefetch_dir"].endswith("tensorrt_llm/lora_prefetch")
    # Read with no default by the backend; empty, as upstream's template leaves them: no guided decoding.
    assert params["tokenizer_dir"] == params["guided_decoding_backend"] == params["xgrammar_tokenizer_info_path"] == ""
    assert not (repo / LLM_MODEL / "1" / "model.py").exists()  # C++ backend: no Python model
    ensemble = _config(repo, ENSEMBLE_MODEL)
    llm_step = next(s for s in ensemble.ensemble_scheduling.step if s.model_name == LLM_MODEL)
    for name in ("lora_task_id", "lora_weights", "lora_config"):
        assert llm_step.input_map[name] == name
    assert {i.name: i.data_type for i in ensemble.input}["lora_weights"] == mc.TYPE_FP16
    for model in (PREPROCESSING_MODEL, POSTPROCESSING_MODEL):
        assert _config(repo, model).backend == "python"
        assert (repo / model / "1" / "model.py").is_file()

    code, out, _ = run_cli("engine-plan", "-m", repo, "--json")
    plan = json.loads(out)
    assert plan["max_lora_rank"] == 8 and plan["lora_plugin"] == "float16"
    assert plan["lora_target_modules"] == LLAMA_TRTLLM_MODULES
    # The engine these flags build has the converted-for engine's shape: the same cache parameters.
    assert plan["lora_cache"]["parameters"] == {k: v for k, v in params.items() if k.startswith("lora_cache_")}
    assert plan["lora_cache"]["page_bytes"] == 36864 and plan["lora_cache"]["host_pages_needed"] == 11
    code, out, _ = run_cli("engine-plan", "-m", repo)
    assert "--lora_plugin float16" in out and "--max_lora_rank 8" in out
    assert f"lora_cache_host_memory_bytes={11 * 36864}" in out

    code, out, _ = run_cli("adapters", "-m", repo, "--json")
    listed = json.loads(out)
    assert {n: e["task_id"] for n, e in listed.items()} == {n: e.task_id for n, e in state.adapters.items()}

    # Re-running the same conversion changes no id (content-derived) and no tensor.
    before = _snapshot(repo / LLM_MODEL / "lora_prefetch")
    assert run_cli(*args)[0] == 0
    assert {n: e.task_id for n, e in Registry(repo).read().adapters.items()} == {
        n: e.task_id for n, e in state.adapters.items()
    }
    assert _snapshot(repo / LLM_MODEL / "lora_prefetch") == before

    # remove: id retired (never handed to other weights), gone from the listing and from what a
    # router serves; the files stay for routers that still route to it, until the first registry
    # write after the grace period.
    catalog = AdapterCatalog(repo)
    catalog.refresh()

    def files(name: str) -> tuple[bool, bool]:
        return prefetch_dir(repo, state.adapters[name].task_id).exists(), adapter_store_dir(repo, name).exists()

    def listed() -> set[str]:
        code, out, err = run_cli("adapters", "-m", repo, "--json")
        assert code == 0, err
        return set(json.loads(out))

    removed = state.adapters["legal"]
    code, out, _ = run_cli("remove", "legal", "-m", repo)
    assert code == 0 and "removed legal" in out and "after 60 s" in out
    after = Registry(repo).read()
    assert set(after.adapters) == {"support", "code"} and after.retired[removed.task_id] == removed.digest
    assert files("legal") == (True, True)
    assert {p.adapter for p in after.pending_deletions} == {"legal"}
    assert listed() == {"support", "code"}
    assert catalog.refresh() == {removed.task_id} and set(catalog.adapters) == {"support", "code"}
    started = time.monotonic()
    assert run_cli("remove", "support", "-m", repo, "--grace", "1")[0] == 0
    assert files("support") == (True, True)  # within its grace
    time.sleep(max(0.0, 1.2 - (time.monotonic() - started)))
    gone = state.adapters["code"]
    code, out, err = run_cli("remove", "code", "-m", repo, "--grace", "0")
    assert code == 0 and "removed code" in out, err
    after = Registry(repo).read()
    assert not after.adapters and {t: after.retired[t] for t in (gone.task_id, removed.task_id)} == {
        gone.task_id: gone.digest,
        removed.task_id: removed.digest,
    }
    assert files("code") == (False, False)  # no grace
    assert files("support") == (False, False)  # its grace ended before this write
    assert files("legal") == (True, True)  # legal's grace is not over
    assert {p.adapter for p in after.pending_deletions} == {"legal"}
    assert listed() == set() and catalog.refresh() == {gone.task_id, state.adapters["support"].task_id}


def test_replace_needs_the_flag_and_changes_nothing_without_it(llama_finetunes, run_cli, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    assert run_cli("convert", "--base", base, "--finetuned", fts[0], "--name", "bot", "-m", repo, "-r", "4")[0] == 0
    old = Registry(repo).read().adapters["bot"]
    before = _snapshot(repo)
    code, _, err = run_cli("convert", "--base", base, "--finetuned", fts[1], "--name", "bot", "-m", repo, "-r", "4")
    assert code == 2 and "already registered with different weights" in err and "--replace" in err
    assert _snapshot(repo) == before
    args = ("convert", "--base", base, "--finetuned", fts[1], "--name", "bot", "-m", repo, "-r", "4", "--replace")
    assert run_cli(*args)[0] == 0
    state = Registry(repo).read()
    assert state.adapters["bot"].task_id != old.task_id and old.task_id in state.retired
    assert prefetch_dir(repo, state.adapters["bot"].task_id).exists()
    # The old weights' tensors stay for the grace period (a router may still send them).
    assert prefetch_dir(repo, old.task_id).exists()
    assert [p.path for p in state.pending_deletions] == [f"tensorrt_llm/lora_prefetch/{old.task_id}"]


def _engine_config(tmp_path: Path, **over: object) -> Path:
    cfg = {  # the toy Llama's shape, as trtllm-build records it
        "pretrained_config": {
            "dtype": "float32",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_size": 16,
            "intermediate_size": 128,
        },
        "build_config": {
            "plugin_config": {"lora_plugin": "float32"},
            "lora_config": {
                "max_lora_rank": 8,
                "lora_target_modules": LLAMA_TRTLLM_MODULES,
            },
        },
    }
    for key, value in over.items():
        section, field = key.split("__")
        target = cfg["build_config"][section] if section in ("lora_config", "plugin_config") else cfg[section]
        target[field] = value  # type: ignore[index]
    path = tmp_path / "engine" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--name", "../x"], "path separator"),
        (["--name", "a/b"], "path separator"),
        (["--name", ""], "1–64 characters"),
        (["--name", "x" * 65], "1–64 characters"),
        (["--name", "a", "--name", "b"], "one --name per --finetuned"),
        (["--name", "ok", "--rank", "0"], "rank"),
        (["--name", "ok", "--engine-dtype", "float64"], "--engine-dtype: unknown dtype; expected one of float16"),
        (["--name", "ok", "--dtype", "float64"], "--engine-dtype: unknown dtype"),  # the old spelling
        (["--name", "ok", "--engine-dtype", "float16", "--dtype", "float32"], "two engine dtypes"),
        (["--name", "ok", "--backend", "nonesuch"], "unknown engine"),
        (["--name", "ok", "--backend", "trtllm-legacy"], "needs the engine's config.json"),
        (["--name", "ok", "--engine-config", "ENGINE:lora_config__max_lora_rank=4"], "Invalid low_rank"),
        (
            ["--name", "ok", "--engine-config", "ENGINE:lora_config__lora_target_modules=attn_q"],
            "not enabled for this model",
        ),
        (
            ["--name", "ok", "--engine-config", "ENGINE:plugin_config__lora_plugin=float16"],
            "same data type as base model",
        ),
        (["--name", "ok", "--engine-config", "ENGINE:plugin_config__lora_plugin="], "built without LoRA"),
    ],
)
def test_bad_convert_input_writes_nothing(
    extra: list[str], match: str, llama_finetunes, run_cli, tmp_path: Path
) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    args = []
    for a in extra:
        if a.startswith("ENGINE:"):
            key, _, value = a[len("ENGINE:") :].partition("=")
            parsed: object = value.split(",") if "modules" in key else (int(value) if value.isdigit() else value)
            a = str(_engine_config(tmp_path, **{key: parsed}))
        args.append(a)
    code, _, err = run_cli("convert", "--base", base, "--finetuned", fts[0], "-m", repo, "-r", "8", *args)
    assert code == 2, err
    assert match in err
    assert "Traceback" not in err
    assert _snapshot(repo) == {}


def test_repository_keeps_its_base_and_dtype(llama_finetunes, model_pairs, run_cli, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    assert run_cli("convert", "--base", base, "--finetuned", fts[0], "--name", "a", "-m", repo, "-r", "4")[0] == 0
    before = _snapshot(repo)
    code, _, err = run_cli(
        "convert", "--base", base, "--finetuned", fts[1], "--name", "b", "-m", repo, "-r", "4", "--dtype", "float16"
    )
    # The old spelling of --engine-dtype still means the engine's dtype, with a note saying so.
    assert code == 2 and "another dtype" in err and "deprecated: it is spelled --engine-dtype" in err
    other_base, other_ft = model_pairs("llama")
    code, _, err = run_cli("convert", "--base", other_base, "--finetuned", other_ft, "--name", "c", "-m", repo)
    assert code == 2 and "another base" in err
    assert _snapshot(repo) == before


def test_engine_plan_and_adapters_need_a_registry(run_cli, tmp_path: Path) -> None:
    for cmd in ("adapters", "engine-plan"):
        code, _, err = run_cli(cmd, "-m", tmp_path)
        assert code == 2 and "no adapter registry" in err
    code, _, err = run_cli("remove", "nope", "-m", tmp_path)
    assert code == 2


def test_concurrent_converts_into_one_repository(llama_finetunes, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "phlora_nim.cli",
                "convert",
                "--base",
                str(base),
                "--finetuned",
                str(ft),
                "--name",
                f"a{i}",
                "-m",
                str(repo),
                "-r",
                "4",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, ft in enumerate(fts)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()
    state = Registry(repo).read()
    assert sorted(state.adapters) == ["a0", "a1", "a2"]
    for e in state.adapters.values():
        assert (prefetch_dir(repo, e.task_id) / "model.lora_weights.npy").is_file()
    assert not [p for p in (repo / LLM_MODEL).iterdir() if p.name.startswith(".staging")]


def test_store_adapter_loads_in_peft(converted_repository: Path, llama_finetunes) -> None:
    """The NIM / PEFT store folder is a real PEFT adapter of the base model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = llama_finetunes
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapter_store_dir(converted_repository, "support")
    )
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_switching_backend_changes_only_the_llm_model(llama_finetunes, run_cli, tmp_path: Path) -> None:
    """Reference (CPU) → TensorRT-LLM: the tensorrt_llm model's files change, nothing else does."""
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    args = [
        "convert",
        "--base",
        base,
        "--finetuned",
        fts[0],
        "--name",
        "a",
        "-m",
        repo,
        "-r",
        "4",
        "--engine-dtype",
        "float16",
    ]
    assert run_cli(*args, "--backend", "reference")[0] == 0
    before = _snapshot(repo)
    f16 = {"pretrained_config__dtype": "float16", "plugin_config__lora_plugin": "float16"}
    served = ("--served-path", "/srv/models", "--engine-config", _engine_config(tmp_path, **f16))
    assert run_cli(*args, "--backend", "trtllm-legacy", "--engine-dir", "/engines/llama", *served)[0] == 0
    after = _snapshot(repo)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"tensorrt_llm/config.pbtxt", "tensorrt_llm/1/model.py", "phlora_repository.json"}
    llm = _config(repo, LLM_MODEL)
    assert llm.backend == "tensorrtllm" and llm.parameters["gpt_model_path"].string_value == "/engines/llama"
    assert llm.parameters["lora_prefetch_dir"].string_value == "/srv/models/tensorrt_llm/lora_prefetch"
    assert run_cli(*args, "--backend", "trtllm-legacy", *served, "--tokenizer-dir", "/ckpt/base")[0] == 0
    for model in (PREPROCESSING_MODEL, POSTPROCESSING_MODEL):
        assert _config(repo, model).parameters["tokenizer_dir"].string_value == "/ckpt/base"


def _tree(root: Path) -> set[str]:
    """Every path (files and folders) under ``root``: 'nothing left behind' is equality."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _identical_finetune(base: Path, ft: Path, tmp: Path) -> tuple[list[str], Path]:
    return ["--base", str(base), "--finetuned", str(_copy_checkpoint(base, tmp / "same-as-base"))], tmp / "repo"


def _int32_weight(base: Path, ft: Path, tmp: Path) -> tuple[list[str], Path]:
    import torch
    from safetensors.torch import load_file, save_file

    other = _copy_checkpoint(ft, tmp / "int-ft")
    tensors = load_file(str(other / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = (tensors[key] * 100).to(torch.int32)
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    return ["--base", str(base), "--finetuned", str(other)], tmp / "repo"


def _unrelated_folder(base: Path, ft: Path, tmp: Path) -> tuple[list[str], Path]:
    repo = tmp / "repo"
    (repo / "my_model" / "1").mkdir(parents=True)
    (repo / "notes.txt").write_text("not a phlora repository")
    return ["--base", str(base), "--finetuned", str(ft)], repo


def _base_config_without_hidden_size(base: Path, ft: Path, tmp: Path) -> tuple[list[str], Path]:
    other = _copy_checkpoint(base, tmp / "base-no-hidden")
    cfg = json.loads((other / "config.json").read_text())
    del cfg["hidden_size"]
    (other / "config.json").write_text(json.dumps(cfg))
    return ["--base", str(other), "--finetuned", str(ft)], tmp / "repo"


def _missing_base_into_existing_repository(base: Path, ft: Path, tmp: Path) -> tuple[list[str], Path]:
    from phlora_nim.repository.settings import RepositorySettings

    repo = tmp / "repo"
    repo.mkdir()
    RepositorySettings(base=str(base)).save(repo)
    return ["--base", str(tmp / "no-such-base"), "--finetuned", str(ft)], repo


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_identical_finetune, r"same-as-base: no module differs from the base"),
        (_int32_weight, r"q_proj.weight: weight tensor is not floating point.*int32 in the fine-tune"),
        (_unrelated_folder, r"repo: the folder is neither empty nor a phlora-nim model repository.*notes.txt"),
        (_base_config_without_hidden_size, r"base-no-hidden/config.json: config field 'hidden_size'"),
        (_missing_base_into_existing_repository, r"no-such-base: base checkpoint not found"),
    ],
    ids=["identical fine-tune", "int32 weight", "unrelated folder", "config without hidden_size", "missing base"],
)
def test_convert_refuses_and_leaves_nothing(make, match: str, llama_finetunes, run_cli, tmp_path: Path) -> None:
    import re

    base, fts = llama_finetunes
    args, repo = make(base, fts[0], tmp_path)
    before, files = _tree(tmp_path), _snapshot(repo)
    code, _, err = run_cli("convert", *args, "-m", repo, "-r", "4")
    assert code == 2, err
    assert re.search(match, err), err
    assert "Traceback" not in err and err.count("error:") == 1
    assert _tree(tmp_path) == before and _snapshot(repo) == files


def test_later_converts_keep_the_repository_settings(llama_finetunes, run_cli, tmp_path: Path) -> None:
    from phlora_nim.repository.settings import RepositorySettings

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    first = ("--decoupled", "--lora-cache-mb", "64", "--max-batch-size", "4", "--engine-dtype", "float16")
    assert run_cli("convert", "--base", base, "--finetuned", fts[0], "-m", repo, "-r", "4", *first)[0] == 0
    # Neither flag again: both stay (and the dtype too).
    assert run_cli("convert", "--base", base, "--finetuned", fts[1], "-m", repo, "-r", "4")[0] == 0
    settings = RepositorySettings.load(repo)
    assert settings is not None
    assert (settings.decoupled, settings.lora_cache_bytes, settings.max_batch_size, settings.dtype) == (
        True,
        64 << 20,
        4,
        "float16",
    )
    assert _config(repo, LLM_MODEL).model_transaction_policy.decoupled
    # Given explicitly: changed.
    again = ("--no-decoupled", "--lora-cache-mb", "0")
    assert run_cli("convert", "--base", base, "--finetuned", fts[1], "-m", repo, "-r", "4", *again)[0] == 0
    settings = RepositorySettings.load(repo)
    assert settings is not None and (settings.decoupled, settings.lora_cache_bytes) == (False, 0)
    assert settings.max_batch_size == 4 and not _config(repo, LLM_MODEL).model_transaction_policy.decoupled


def test_llm_parameters_and_trtllm_version_reach_the_configs_and_are_kept(
    llama_finetunes, run_cli, tmp_path: Path
) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    first = ("convert", "--base", base, "--finetuned", fts[0], "--name", "a", "-m", repo, "-r", "2")
    code, _, err = run_cli(*first, "--llm-parameter", "max_input_len=8", "--trtllm-version", "0.19")
    assert code == 0, err
    llm = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'key: "max_input_len"' in llm and 'string_value: "8"' in llm
    assert "random_seed" in llm and '"seed"' not in llm
    # A later convert without the flags keeps them.
    assert run_cli("convert", "--base", base, "--finetuned", fts[1], "--name", "b", "-m", repo, "-r", "2")[0] == 0
    llm = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'key: "max_input_len"' in llm and "random_seed" in llm


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--llm-parameter", "max_input_len"], "--llm-parameter: not a KEY=VALUE pair"),
        (["--trtllm-version", "0.7"], "unknown TensorRT-LLM release"),
    ],
)
def test_bad_repository_options_are_refused(llama_finetunes, run_cli, tmp_path: Path, args, match) -> None:
    base, fts = llama_finetunes
    code, _, err = run_cli("convert", "--base", base, "--finetuned", fts[0], "-m", tmp_path / "r", "-r", "2", *args)
    assert code == 2 and match in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _trtllm_args(base: Path, fts: list[Path], repo: Path, tmp_path: Path) -> list[object]:
    f16 = {"pretrained_config__dtype": "float16", "plugin_config__lora_plugin": "float16"}
    args: list[object] = ["convert", "--base", base, "-m", repo, "-r", "8", "--dtype", "float16"]
    args += ["--backend", "trtllm-legacy", "--engine-config", _engine_config(tmp_path, **f16)]
    for ft, name in zip(fts, ("support", "legal", "code")[: len(fts)], strict=True):
        args += ["--finetuned", ft, "--name", name]
    return args


def test_preloading_can_be_capped(llama_finetunes, run_cli, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"support": 3, "legal": 40, "code": 7}))
    args = [*_trtllm_args(base, fts, repo, tmp_path), "--prefetch-limit", "1", "--prefetch-usage", usage]
    code, _, err = run_cli(*args)
    assert code == 0, err
    state = Registry(repo).read()
    params = {k: v.string_value for k, v in _config(repo, LLM_MODEL).parameters.items()}
    # TensorRT-LLM preloads every folder of lora_prefetch_dir: it names a folder with the most used only.
    assert params["lora_prefetch_dir"] == "/models/tensorrt_llm/lora_preload"
    preload = repo / "tensorrt_llm" / "lora_preload"
    assert [p.name for p in preload.iterdir()] == [str(state.adapters["legal"].task_id)]
    for f in ("model.lora_weights.npy", "model.lora_config.npy"):
        linked, source = (
            preload / str(state.adapters["legal"].task_id) / f,
            prefetch_dir(repo, state.adapters["legal"].task_id) / f,
        )
        assert linked.read_bytes() == source.read_bytes()
    assert params["lora_cache_host_memory_bytes"] == str((1 + 8) * 36864)  # 1 preloaded + 8 spare pages
    # Kept by later runs; lifting the cap preloads all again and the preload folder goes.
    assert run_cli(*_trtllm_args(base, fts[:1], repo, tmp_path))[0] == 0
    assert preload.is_dir()
    assert run_cli(*_trtllm_args(base, fts[:1], repo, tmp_path), "--prefetch-limit", "3")[0] == 0
    params = {k: v.string_value for k, v in _config(repo, LLM_MODEL).parameters.items()}
    assert params["lora_prefetch_dir"].endswith("tensorrt_llm/lora_prefetch") and not preload.exists()
    # Removing a named adapter drops it from --prefetch (the repository stays writable).
    assert run_cli(*_trtllm_args(base, fts[:1], repo, tmp_path), "--prefetch", "legal")[0] == 0
    legal = Registry(repo).read().adapters["legal"]
    code, _, err = run_cli("remove", "legal", "-m", repo, "--grace", "0")
    assert code == 0, err
    assert "legal" not in Registry(repo).read().adapters and not prefetch_dir(repo, legal.task_id).exists()
    assert not (preload / str(legal.task_id)).exists()
    assert json.loads((repo / "phlora_repository.json").read_text())["prefetch_names"] == []


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        # 1 MiB holds floor(2^20 / 192) = 5461 slots: 29 pages of 192 slots; 3 + 40 spare do not fit
        (
            ["--lora-cache-mb", "1", "--lora-cache-spare", "40"],
            "has 29 pages of 36.0 KiB; the 3 preloaded adapters take 3",
        ),
        (["--prefetch", "nobody"], "not registered"),
        (["--served-path", "/nowhere", "--check-served-path"], "the served path is not this model repository"),
        (["--llm-parameter", "enable_chunked_context=true"], "Chunked context requires context FMHA"),
    ],
)
def test_a_cache_that_cannot_fit_writes_nothing(extra, match, llama_finetunes, run_cli, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    code, _, err = run_cli(*_trtllm_args(base, fts, repo, tmp_path), *extra)
    assert code == 2, err
    assert match in err, err
    assert "Traceback" not in err
    assert _snapshot(repo) == {}


def test_served_path_checked_where_the_repository_is_mounted(llama_finetunes, run_cli, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    repo.mkdir()
    args = [*_trtllm_args(base, fts[:1], repo, tmp_path), "--served-path", str(repo), "--check-served-path"]
    assert run_cli(*args)[0] == 0
    params = _config(repo, LLM_MODEL).parameters
    assert params["lora_prefetch_dir"].string_value == f"{repo}/tensorrt_llm/lora_prefetch"
