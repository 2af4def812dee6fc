"""The generated repository on the real tritonserver (nvidia-pytriton wheel), through tritonclient.grpc."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from phlora_nim.repository.layout import adapter_store_dir, prefetch_dir
from phlora_nim.repository.registry import Registry

pytestmark = pytest.mark.slow
PROMPT = [3, 9, 14, 20, 7]
# Triton warns that it skips the adapter and tokenizer folders inside the model folders: that is the point.
_EXPECTED_WARNINGS = (
    "ignore version directory 'adapters'",
    "ignore version directory 'lora_prefetch'",
    "ignore version directory 'tokenizer'",
)


def _problems(server) -> list[str]:
    return [p for p in server.problems() if not any(w in p for w in _EXPECTED_WARNINGS)]


def _token_inputs(
    prompt: list[int],
    n: int,
    *,
    task_id: int | None = None,
    lora: tuple[np.ndarray, np.ndarray] | None = None,
    streaming: bool | None = None,
) -> list[grpcclient.InferInput]:
    def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
        x = grpcclient.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        return x

    inputs = [
        tensor("input_ids", np.array([prompt], dtype=np.int32), "INT32"),
        tensor("input_lengths", np.array([[len(prompt)]], dtype=np.int32), "INT32"),
        tensor("request_output_len", np.array([[n]], dtype=np.int32), "INT32"),
        tensor("end_id", np.array([[2]], dtype=np.int32), "INT32"),
    ]
    if task_id is not None:
        inputs.append(tensor("lora_task_id", np.array([[task_id]], dtype=np.uint64), "UINT64"))
    if lora is not None:
        w, c = lora
        inputs.append(tensor("lora_weights", w, {np.dtype(np.float16): "FP16"}.get(w.dtype, "FP32")))
        inputs.append(tensor("lora_config", c, "INT32"))
    if streaming is not None:
        inputs.append(tensor("streaming", np.array([[streaming]], dtype=bool), "BOOL"))
    return inputs


def _tokens(result) -> list[int]:
    ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    return ids[0, 0, : int(lengths[0, 0])].tolist()


def _pair(repo: Path, task_id: int) -> tuple[np.ndarray, np.ndarray]:
    folder = prefetch_dir(repo, task_id)
    return np.load(folder / "model.lora_weights.npy"), np.load(folder / "model.lora_config.npy")


def _greedy(base: Path, adapter: Path | None, prompt: list[int], n: int, *, model_dir: Path | None = None) -> list[int]:
    """Greedy decoding run directly in PyTorch: PEFT(base + adapter), or a plain checkpoint."""
    from phlora_nim.demo.toy_models import greedy_continuation

    return greedy_continuation(model_dir or base, prompt, n, adapter=adapter)


@pytest.fixture(scope="module")
def full_rank(llama_finetunes, converted_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tune that changed only linear weights, registered as the full-rank adapter ``full``."""
    from transformers import AutoModelForCausalLM

    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.demo.toy_models import finetune
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings

    base, _ = llama_finetunes
    folder = tmp_path_factory.mktemp("linear-ft") / "ft"
    model = AutoModelForCausalLM.from_pretrained(base)
    finetune(model, steps=15, seed=11, linear_only=True).save_pretrained(folder)
    job = ConvertJob(
        base=base,
        finetuned=(folder,),
        names=("full",),
        repository=converted_repository,
        options=ExtractOptions(policy=RankPolicy(energy=1.0, max_rank=64), exact=True),
        settings=RepositorySettings(backend="trtllm-legacy-cpu", base=str(base), dtype="float32"),
    )
    convert(job)
    return folder


@pytest.fixture(scope="module")
def triton(converted_repository: Path, full_rank: Path):
    from phlora_nim.triton.launcher import LocalTriton

    with LocalTriton(converted_repository) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield server, client
        client.close()


def test_repository_loads_with_adapters_present_and_no_error(triton) -> None:
    server, client = triton
    assert _problems(server) == []
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {m: "READY" for m in ("ensemble", "preprocessing", "postprocessing", "tensorrt_llm")}


def test_every_adapter_matches_peft_token_for_token(triton, converted_repository: Path, llama_finetunes) -> None:
    _, client = triton
    base, _ = llama_finetunes
    outputs = {}
    for name, entry in Registry(converted_repository).read().adapters.items():
        if name == "full":
            continue
        # Prefetched at start: the id alone is enough.
        got = _tokens(client.infer("tensorrt_llm", _token_inputs(PROMPT, 10, task_id=entry.task_id)))
        assert got == _greedy(base, adapter_store_dir(converted_repository, name), PROMPT, 10), name
        outputs[name] = got
    base_out = _tokens(client.infer("tensorrt_llm", _token_inputs(PROMPT, 10)))
    assert base_out == _greedy(base, None, PROMPT, 10)
    assert len({tuple(v) for v in [*outputs.values(), base_out]}) == 4


def test_full_rank_adapter_reproduces_the_finetuned_model(triton, converted_repository: Path, full_rank) -> None:
    _, client = triton
    entry = Registry(converted_repository).read().adapters["full"]
    prompt = [4, 17, 33, 8]
    got = _tokens(client.infer("tensorrt_llm", _token_inputs(prompt, 12, task_id=entry.task_id)))
    assert got == _greedy(full_rank, None, prompt, 12, model_dir=full_rank)


def test_mixed_batch_equals_each_request_alone(triton, converted_repository: Path) -> None:
    _, client = triton
    entries = Registry(converted_repository).read().adapters
    cases = [(entries[n].task_id, p) for n, p in (("support", [5, 6, 7]), ("legal", PROMPT), ("code", [30, 31]))]
    cases.append((None, [12, 13, 14, 15]))
    alone = [_tokens(client.infer("tensorrt_llm", _token_inputs(p, 8, task_id=t))) for t, p in cases]
    stats_before = client.get_inference_statistics("tensorrt_llm").model_stats[0]
    with ThreadPoolExecutor(len(cases) * 2) as pool:
        futures = [pool.submit(client.infer, "tensorrt_llm", _token_inputs(p, 8, task_id=t)) for t, p in cases * 2]
        together = [_tokens(f.result()) for f in futures]
    stats = client.get_inference_statistics("tensorrt_llm").model_stats[0]
    assert together == alone * 2
    # Dynamic batching put several of these requests into one execute.
    assert stats.execution_count - stats_before.execution_count < stats.inference_count - stats_before.inference_count


def test_ensemble_text_interface_with_lora(triton, converted_repository: Path, llama_finetunes) -> None:
    from transformers import AutoTokenizer

    _, client = triton
    base, _ = llama_finetunes
    tok = AutoTokenizer.from_pretrained(base)
    entry = Registry(converted_repository).read().adapters["legal"]
    text = "the red cat"
    inputs = []
    for name, array, dtype in (
        ("text_input", np.array([[text.encode()]], dtype=object), "BYTES"),
        ("max_tokens", np.array([[6]], dtype=np.int32), "INT32"),
        ("lora_task_id", np.array([[entry.task_id]], dtype=np.uint64), "UINT64"),
    ):
        x = grpcclient.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        inputs.append(x)
    out = client.infer("ensemble", inputs).as_numpy("text_output").reshape(-1)[0].decode()
    prompt = tok.encode(text, add_special_tokens=False)
    expected = _greedy(base, adapter_store_dir(converted_repository, "legal"), prompt, 6)
    assert out == tok.decode(expected, skip_special_tokens=True)


def test_lora_protocol_through_triton(triton, converted_repository: Path) -> None:
    _, client = triton
    entry = Registry(converted_repository).read().adapters["code"]
    w, c = _pair(converted_repository, entry.task_id)
    expected = _tokens(client.infer("tensorrt_llm", _token_inputs(PROMPT, 6, task_id=entry.task_id)))
    new_id = 7_777
    with pytest.raises(InferenceServerException, match=f"LoRA task {new_id} not found in cache"):
        client.infer("tensorrt_llm", _token_inputs(PROMPT, 6, task_id=new_id))
    first = _tokens(client.infer("tensorrt_llm", _token_inputs(PROMPT, 6, task_id=new_id, lora=(w, c))))
    again = _tokens(client.infer("tensorrt_llm", _token_inputs(PROMPT, 6, task_id=new_id)))
    assert first == again == expected
    # A bad adapter is a per-request error with TensorRT-LLM's text, and the server keeps serving.
    bad = c.copy()
    bad[0, 0, 1] = 99
    with pytest.raises(InferenceServerException, match=r"Expected layerId to be in the range \[0, numModelLayers\)"):
        client.infer("tensorrt_llm", _token_inputs(PROMPT, 6, task_id=8_888, lora=(w, bad)))
    with pytest.raises(InferenceServerException, match=r"FP16|data ?type"):
        client.infer("tensorrt_llm", _token_inputs(PROMPT, 6, task_id=8_889, lora=(w.astype(np.float16), c)))
    assert _tokens(client.infer("tensorrt_llm", _token_inputs(PROMPT, 6, task_id=new_id))) == expected


@pytest.fixture(scope="module")
def small_cache_triton(tmp_path_factory: pytest.TempPathFactory, llama_finetunes):
    """Five adapters, a decoupled model, and a LoRA cache that holds exactly two of them."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.demo.toy_models import make_finetunes
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings
    from phlora_nim.triton.launcher import LocalTriton

    base, _ = llama_finetunes
    _, fts = make_finetunes("llama", tmp_path_factory.mktemp("five"), 5, steps=6, seed=0)
    repo = tmp_path_factory.mktemp("cache") / "repo"
    # rank 6 everywhere: A + B of one adapter = 6·Σ(in + out)·4 bytes
    one = 6 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 4
    settings = RepositorySettings(
        backend="trtllm-legacy-cpu", base=str(base), dtype="float32", decoupled=True, lora_cache_bytes=2 * one
    )
    job = ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=tuple(f"a{i}" for i in range(5)),
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=6)),
        settings=settings,
    )
    convert(job)
    with LocalTriton(repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield repo, server, client
        client.close()


def _stream(client, inputs) -> tuple[list[list[int]], str | None]:
    """Send one request on a gRPC stream; returns the token chunks received and the error, if any."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("tensorrt_llm", inputs, enable_empty_final_response=True)
        chunks: list[list[int]] = []
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                return chunks, str(error)
            response = result.get_response()
            if result.as_numpy("output_ids") is not None:
                chunks.append(_tokens(result))
            if response.parameters["triton_final_response"].bool_param:
                return chunks, None
    finally:
        client.stop_stream()


def test_cache_budget_of_two_with_five_adapters_never_serves_a_wrong_output(small_cache_triton) -> None:
    repo, server, client = small_cache_triton
    entries = sorted(Registry(repo).read().adapters.values(), key=lambda e: e.name)
    expected: dict[int, list[int]] = {}
    misses = 0
    for _ in range(2):
        for e in entries:
            chunks, error = _stream(client, _token_inputs(PROMPT, 6, task_id=e.task_id, streaming=False))
            if error is not None:
                assert "not found in cache" in error
                misses += 1
                chunks, error = _stream(
                    client, _token_inputs(PROMPT, 6, task_id=e.task_id, lora=_pair(repo, e.task_id), streaming=False)
                )
            assert error is None and len(chunks) == 1
            expected.setdefault(e.task_id, chunks[0])
            assert chunks[0] == expected[e.task_id]
    assert misses >= 5  # two fit: round-robin over five keeps missing
    assert len({tuple(v) for v in expected.values()}) == 5
    assert _problems(server) == []


def test_streaming_sends_tokens_as_they_come(small_cache_triton) -> None:
    repo, _, client = small_cache_triton
    entry = sorted(Registry(repo).read().adapters.values(), key=lambda e: e.name)[0]
    lora = _pair(repo, entry.task_id)
    whole, error = _stream(client, _token_inputs(PROMPT, 8, task_id=entry.task_id, lora=lora, streaming=False))
    assert error is None
    chunks, error = _stream(client, _token_inputs(PROMPT, 8, task_id=entry.task_id, lora=lora, streaming=True))
    assert error is None
    assert len(chunks) == len(whole[0]) and all(len(c) == 1 for c in chunks)
    assert [t for c in chunks for t in c] == whole[0]
