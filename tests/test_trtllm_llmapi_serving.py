"""End to end on the ``trtllm-cpu`` engine: convert two fine-tunes for TensorRT-LLM's llmapi model, serve
the repository on the real tritonserver (phlora-nim's CPU reference of the model), and ask through the
router's gRPC front (tritonclient) and its OpenAI front (the openai SDK): answers equal PEFT's greedy
answers for both adapters and the base; the engine's LoRA refusals reach clients as clear statuses.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.engines.trtllm_llmapi.staging import Options
from phlora_nim.jobs.convert import ConvertJob, convert
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.router import RouterConfig, RouterThread
from phlora_nim.router.config import ANY_FREE_PORT
from phlora_nim.triton.launcher import LocalTriton

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
PROMPTS = ["the red cat", "one two three", "a small bird in the tree"]
NAMES = ("support", "legal")
TOKENS = 8


@pytest.fixture(scope="module")
def stack(llama_finetunes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base, fts = llama_finetunes
    root = tmp_path_factory.mktemp("llmapi-serving")
    repo = root / "repo"
    job = ConvertJob(
        base=base,
        finetuned=tuple(fts[:2]),
        names=NAMES,
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=8)),
        settings=RepositorySettings(backend="trtllm-cpu", base=str(base)),
        # every switch between the two adapters evicts one: reloads from lora_path are exercised
        engine_options=Options(max_loras=1, max_cpu_loras=1),
    )
    converted = {c.entry.name: c.entry for c in convert(job)}
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
            yield {"base": base, "repo": repo, "router": router, "triton": triton, "entries": converted}


def _peft(base: Path, folder: Path | None) -> list[str]:
    """PEFT's greedy answers, tokenized as the engine does (add_special_tokens) and decoded as it does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if folder is not None:
        model = PeftModel.from_pretrained(model, folder).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=TOKENS,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=0,
            )
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


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
