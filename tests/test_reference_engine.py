"""The CPU reference engine in-process: LoRA validation and cache, batched multi-LoRA generation vs PEFT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phlora_nim.engines.trtllm_legacy.lora_cache import LoraCache, LoraRequestError, LoraTask, not_found_message
from phlora_nim.repository.layout import adapter_store_dir, prefetch_dir
from phlora_nim.repository.registry import Registry

pytestmark = pytest.mark.slow


def _task(task_id: int, nbytes: int) -> LoraTask:
    return LoraTask(task_id=task_id, factors={}, nbytes=nbytes)


def test_cache_is_lru_in_bytes_and_never_evicts_adapters_in_use() -> None:
    cache = LoraCache(capacity_bytes=300)
    for i in (1, 2, 3):
        cache.insert(_task(i, 100))
    cache.lookup(1)  # 1 is now the most recent: 2 goes first
    cache.insert(_task(4, 100))
    assert cache.task_ids() == [3, 1, 4] and cache.evictions == 1
    with pytest.raises(LoraRequestError, match="not found in cache"):
        cache.lookup(2)
    for tid in (3, 1, 4):
        cache.pin(tid)
    with pytest.raises(LoraRequestError, match="Cache is full"):
        cache.insert(_task(5, 100))
    cache.unpin(1)
    cache.insert(_task(5, 100))  # 1 was the only evictable one
    assert 1 not in cache and 3 in cache
    # Weights sent again for a cached id are ignored: the first weights stay.
    first = cache.lookup(5)
    assert cache.insert(_task(5, 7)) is first
    # Evicting every adapter not in use (5) still leaves too little room: the runtime's claim then
    # fails its pageIds.has_value() assertion (LoraCache::claimPagesWithEvict), with 5 gone.
    with pytest.raises(LoraRequestError, match=r"Assertion failed: pageIds\.has_value\(\)"):
        cache.insert(_task(6, 201))
    assert 5 not in cache and cache.task_ids() == [3, 4]
    assert not_found_message(9) == "LoRA task 9 not found in cache. Please send LoRA weights with request"


@pytest.fixture(scope="module")
def engine(llama_finetunes):
    from phlora_nim.engines.trtllm_legacy.reference_engine import ReferenceEngine

    base, _ = llama_finetunes
    return ReferenceEngine.load(base, dtype="float32", max_lora_rank=16, cache_bytes=64 << 20)


def _pair(repo: Path, name: str) -> tuple[int, np.ndarray, np.ndarray]:
    entry = Registry(repo).read().adapters[name]
    folder = prefetch_dir(repo, entry.task_id)
    return entry.task_id, np.load(folder / "model.lora_weights.npy"), np.load(folder / "model.lora_config.npy")


def _mutations() -> list[tuple[str, object, str]]:
    def layer(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = c.copy()
        c[0, 0, 1] = 7
        return w, c

    def rank(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Rows padded wide enough for rank 17: the runtime checks the length before the rank.
        c = c.copy()
        c[0, 0, 2] = 17
        return np.concatenate([w, np.zeros((*w.shape[:2], 17 * 64 * 2), dtype=w.dtype)], axis=2), c

    def rows(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w[:, :-1], c

    def module(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = c.copy()
        c[0, 0, 0] = 9  # cross_attn_q: not in a decoder-only model
        return w, c

    def short(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w[:, :, :100], c

    def dtype(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w.astype(np.float16), c

    def dora(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w, np.concatenate([c, np.ones_like(c[..., :1])], axis=-1)

    return [
        ("layer", layer, "Expected layerId to be in the range [0, numModelLayers)"),
        ("rank", rank, "Invalid low_rank (17). low_rank must be smaller than mMaxLowRank (16)"),
        ("rows", rows, "Expected dim1 lora_weights and lora_keys to have the same size"),
        ("module", module, "lora module cross_attn_q not enabled for this model"),
        ("short", short, "lora_weights has to few values for attn_q"),
        ("dtype", dtype, "Expected lora weights to be the same data type as base model"),
        ("dora", dora, "DoRA"),
    ]


@pytest.mark.parametrize(("case", "mutate", "match"), _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_lora_tensors_get_tensorrt_llm_errors(case, mutate, match, engine, converted_repository) -> None:
    _, w, c = _pair(converted_repository, "support")
    w, c = mutate(w, c)
    task_id = 1000 + len(case)
    with pytest.raises(LoraRequestError) as err:
        engine.resolve(task_id, w, c)
    assert match in str(err.value)
    assert task_id not in engine.cache  # a rejected adapter is not cached


def _peft_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    from phlora_nim.demo.toy_models import greedy_continuation

    return greedy_continuation(base, prompt, n, adapter=adapter)


def test_mixed_batch_matches_peft_for_every_row(engine, converted_repository, llama_finetunes) -> None:
    from phlora_nim.engines.trtllm_legacy.reference_engine import GenerationRequest

    base, _ = llama_finetunes
    names = ["support", "legal", "code", None]
    prompts = [[3, 9, 14, 20, 7], [5, 6], [40, 41, 42, 43, 44, 45, 46], [12, 13, 14]]
    tasks = []
    for name in names:
        if name is None:
            tasks.append(None)
            continue
        tid, w, c = _pair(converted_repository, name)
        tasks.append(engine.resolve(tid, w, c))
    try:
        reqs = [
            GenerationRequest(input_ids=p, max_new_tokens=8, end_id=2, lora=t)
            for p, t in zip(prompts, tasks, strict=True)
        ]
        batched = engine.generate(reqs)
        solo = [engine.generate([r])[0] for r in reqs]
    finally:
        for t in tasks:
            engine.release(t)
    assert batched == solo
    for name, prompt, got in zip(names, prompts, batched, strict=True):
        store = adapter_store_dir(converted_repository, name) if name else None
        assert got == _peft_greedy(base, store, prompt, 8), name
    assert len({tuple(x) for x in batched}) == 4  # the adapters really differ


def test_sampling_is_seeded(engine) -> None:
    from phlora_nim.engines.trtllm_legacy.reference_engine import GenerationRequest

    def sample(seed: int) -> list[int]:
        req = GenerationRequest(input_ids=[3, 4, 5], max_new_tokens=12, top_k=20, temperature=1.5, seed=seed)
        return engine.generate([req])[0]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
