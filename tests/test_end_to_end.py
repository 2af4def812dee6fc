"""Never the wrong adapter: real fine-tunes → convert → real tritonserver → router → tritonclient."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from phlora_nim.repository.layout import adapter_store_dir
from phlora_nim.repository.registry import Registry

pytestmark = pytest.mark.slow
PROMPT = "the red cat"
NEW_TOKENS = 4
ADAPTERS = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """Eight adapters of real fine-tunes, a LoRA cache that holds three, Triton and the router."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.demo.toy_models import make_finetunes
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings
    from phlora_nim.router.config import RouterConfig
    from phlora_nim.router.server import RouterThread
    from phlora_nim.triton.launcher import LocalTriton

    root = tmp_path_factory.mktemp("e2e")
    base, fts = make_finetunes("llama", root / "ckpt", ADAPTERS, steps=10, linear_only=True)
    repo = root / "repo"
    one = 4 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 4  # rank 4: A + B of every module, fp32
    settings = RepositorySettings(
        backend="trtllm-legacy-cpu", base=str(base), dtype="float32", lora_cache_bytes=3 * one
    )
    names = tuple(f"ft{i}" for i in range(ADAPTERS))
    job = ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=names,
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=4)),
        settings=settings,
    )
    convert(job)
    with LocalTriton(repo) as triton:
        config = RouterConfig(model_repository=repo, upstreams=(triton.grpc_url,), port=0, metrics_port=0)
        with RouterThread(config) as router:
            yield base, repo, router


def _expected(base: Path, repo: Path, names: list[str]) -> dict[str, str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok.encode(PROMPT, add_special_tokens=False)
    out = {}
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
        if name != "ensemble":
            model = PeftModel.from_pretrained(model, adapter_store_dir(repo, name))
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2)
        out[name] = tok.decode(gen[0, len(ids) :].tolist(), skip_special_tokens=True)
    return out


def _ask(client: grpcclient.InferenceServerClient, model: str) -> str:
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
    max_tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    max_tokens.set_data_from_numpy(np.array([[NEW_TOKENS]], dtype=np.int32))
    result = client.infer(model, [text, max_tokens], client_timeout=60)
    return result.as_numpy("text_output").reshape(-1)[0].decode()


def test_500_mixed_requests_from_16_clients_under_constant_eviction(stack) -> None:
    base, repo, router = stack
    names = sorted(Registry(repo).read().adapters)
    expected = _expected(base, repo, [*names, "ensemble"])
    assert len(set(expected.values())) == ADAPTERS + 1  # every adapter answers differently
    rng = random.Random(0)
    plan = [rng.choice([*names, "ensemble"]) for _ in range(500)]
    shards = [plan[i::16] for i in range(16)]

    def client_run(models: list[str]) -> list[tuple[str, str]]:
        with grpcclient.InferenceServerClient(router.address) as client:
            return [(m, _ask(client, m)) for m in models]

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = [a for shard in pool.map(client_run, shards) for a in shard]
    elapsed = time.monotonic() - start
    assert len(answers) == 500
    wrong = [(m, got) for m, got in answers if got != expected[m]]
    assert wrong == []
    assert elapsed < 240


def test_text_streams_through_the_router_token_by_token(llama_finetunes, tmp_path: Path) -> None:
    """Decoupled repository: ModelStreamInfer on an adapter name streams one text chunk per token."""
    import queue

    from transformers import AutoTokenizer

    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.demo.toy_models import greedy_continuation
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings
    from phlora_nim.router.config import RouterConfig
    from phlora_nim.router.server import RouterThread
    from phlora_nim.triton.launcher import LocalTriton

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    settings = RepositorySettings(backend="trtllm-legacy-cpu", base=str(base), dtype="float32", decoupled=True)
    job = ConvertJob(
        base=base,
        finetuned=(fts[0],),
        names=("streamer",),
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=8)),
        settings=settings,
    )
    convert(job)
    tok = AutoTokenizer.from_pretrained(base)
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    expected = greedy_continuation(base, prompt, 6, adapter=adapter_store_dir(repo, "streamer"))
    with (
        LocalTriton(repo) as triton,
        RouterThread(RouterConfig(model_repository=repo, upstreams=(triton.grpc_url,), port=0, metrics_port=0)) as r,
        grpcclient.InferenceServerClient(r.address) as client,
    ):
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        inputs = []
        for name, array, dtype in (
            ("text_input", np.array([[PROMPT.encode()]], dtype=object), "BYTES"),
            ("max_tokens", np.array([[6]], dtype=np.int32), "INT32"),
            ("stream", np.array([[True]]), "BOOL"),
        ):
            x = grpcclient.InferInput(name, list(array.shape), dtype)
            x.set_data_from_numpy(array)
            inputs.append(x)
        client.async_stream_infer("streamer", inputs, enable_empty_final_response=True)
        chunks = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            text = result.as_numpy("text_output")
            if text is not None:
                chunks.append(text.reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    assert len(chunks) == len(expected) > 1
    assert chunks == [tok.decode([t]) for t in expected]
