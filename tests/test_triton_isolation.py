"""One client's request never fails another's, and the engine's limits hold (real tritonserver, CPU reference).

Poison requests (out-of-vocabulary ids, oversized prompts, bad lengths) sent in the same dynamic
batches as innocent ones must fail alone with INVALID_ARGUMENT and TensorRT-LLM's wording
(``LlmRequest::validate``, ``Request::validate``); the innocent ones must answer exactly as alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from phlora_nim.repository.registry import Registry

pytestmark = pytest.mark.slow
MAX_INPUT, MAX_SEQ = 12, 24


def _tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, list(array.shape), dtype)
    x.set_data_from_numpy(array)
    return x


def _tokens_request(prompt: list[int], n: int, task_id: int | None = None, length: int | None = None) -> list:
    inputs = [
        _tensor("input_ids", np.array([prompt or [0]], dtype=np.int32), "INT32"),
        _tensor("input_lengths", np.array([[len(prompt) if length is None else length]], dtype=np.int32), "INT32"),
        _tensor("request_output_len", np.array([[n]], dtype=np.int32), "INT32"),
        _tensor("end_id", np.array([[2]], dtype=np.int32), "INT32"),
    ]
    if task_id is not None:
        inputs.append(_tensor("lora_task_id", np.array([[task_id]], dtype=np.uint64), "UINT64"))
    return inputs


def _text_request(text: str, max_tokens: int) -> list:
    return [
        _tensor("text_input", np.array([[text.encode()]], dtype=object), "BYTES"),
        _tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
    ]


def _out(result) -> list[int]:
    ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    return ids[0, 0, : int(lengths[0, 0])].tolist()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, llama_finetunes):
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings
    from phlora_nim.triton.launcher import LocalTriton

    base, fts = llama_finetunes
    repo = tmp_path_factory.mktemp("limits") / "repo"
    settings = RepositorySettings(
        backend="trtllm-legacy-cpu",
        base=str(base),
        dtype="float32",
        max_queue_delay_us=20_000,  # wide batching window: poison and innocents share rounds
        llm_parameters={"max_input_len": str(MAX_INPUT), "max_seq_len": str(MAX_SEQ)},
    )
    job = ConvertJob(
        base=base,
        finetuned=tuple(fts[:2]),
        names=("support", "legal"),
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=4)),
        settings=settings,
    )
    convert(job)
    with LocalTriton(repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield repo, client
        client.close()


def _code(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_poison_requests_fail_alone_and_innocent_ones_answer_as_alone(limited) -> None:
    repo, client = limited
    ids = {n: e.task_id for n, e in Registry(repo).read().adapters.items()}
    innocents = [([5, 6, 7], ids["support"]), ([3, 9, 14, 20], ids["legal"]), ([12, 13], None)]
    expected = [_out(client.infer("tensorrt_llm", _tokens_request(p, 6, t))) for p, t in innocents]
    poisons = [
        _tokens_request([5, 10_000, 7], 6, ids["support"]),  # out of vocabulary
        _tokens_request([-3, 4], 6),  # negative id
        _tokens_request(list(range(3, 3 + MAX_INPUT + 1)), 6, ids["legal"]),  # prompt too long
        _tokens_request([5, 6], -4),  # negative output length
    ]
    calls = [("ok", i) for i in range(len(innocents))] * 4 + [("bad", j) for j in range(len(poisons))] * 4
    with ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(
                client.infer,
                "tensorrt_llm",
                _tokens_request(innocents[i][0], 6, innocents[i][1]) if kind == "ok" else poisons[i],
            )
            for kind, i in calls
        ]
    failed_innocents, poison_codes = 0, set()
    for (kind, i), future in zip(calls, futures, strict=True):
        if kind == "ok":
            try:
                assert _out(future.result()) == expected[i]
            except InferenceServerException:
                failed_innocents += 1
        else:
            with pytest.raises(InferenceServerException) as info:
                future.result()
            poison_codes.add(_code(info.value))
    assert failed_innocents == 0
    assert poison_codes == {"StatusCode.INVALID_ARGUMENT"}


@pytest.mark.parametrize(
    ("prompt", "n", "length", "match"),
    [
        ([5, 10_000], 4, None, r"Input token id \(10000\) is not within acceptable range \[0, 96\)"),
        (
            list(range(3, 3 + MAX_INPUT + 1)),
            4,
            None,
            rf"Prompt length \(13\) exceeds maximum input length \({MAX_INPUT}\)",
        ),
        ([5, 6], 0, None, r"mMaxNewTokens > 0"),
        ([5, 6], -1, None, r"mMaxNewTokens > 0"),
        ([5, 6], 4, 0, r"!mInputTokenIds.empty\(\)"),
    ],
)
def test_engine_limits_are_invalid_argument_with_the_runtime_wording(limited, prompt, n, length, match) -> None:
    _, client = limited
    with pytest.raises(InferenceServerException, match=match) as info:
        client.infer("tensorrt_llm", _tokens_request(prompt, n, length=length))
    assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"


def test_output_length_is_capped_by_max_seq_len(limited) -> None:
    _, client = limited
    prompt = [5, 6, 7, 8, 9]
    # end_id 2 may stop it earlier; never later than max_seq_len − prompt.
    got = _out(client.infer("tensorrt_llm", _tokens_request(prompt, 600)))
    assert len(got) <= MAX_SEQ - len(prompt)
    assert got == _out(client.infer("tensorrt_llm", _tokens_request(prompt, MAX_SEQ - len(prompt))))


@pytest.mark.parametrize(("text", "max_tokens"), [("", 4), ("the red cat", -2)])
def test_text_interface_refuses_empty_prompts_and_negative_max_tokens(limited, text: str, max_tokens: int) -> None:
    _, client = limited
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", _text_request(text, max_tokens))
    assert _code(info.value) == "StatusCode.INVALID_ARGUMENT"
