"""Shared fixtures: small models of each family, really fine-tuned on CPU, saved once per session."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

# The file that takes minutes on one worker (vLLM's engine starts and SmolLM2's PEFT reference) goes
# first: with ``--dist loadfile --no-loadscope-reorder`` (pyproject.toml) one worker starts it while the
# other runs the rest. Putting the vLLM router file first too was slower (12½–15 min against 11½: both
# workers then build SmolLM2 fine-tunes and start vLLM at once on 2 cores).
LONG_FIRST = ("test_vllm_engine.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: the order is kept otherwise


@pytest.fixture(scope="session")
def built_once(tmp_path_factory: pytest.TempPathFactory):
    """``built_once(name, build, **params)``: ``build(folder)`` once per test run, shared by the xdist
    workers (their base temporary folders share a parent); see ``phlora_nim.testing.finetunes``."""
    from phlora_nim.testing.finetunes import built_once

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-once"
    root.mkdir(parents=True, exist_ok=True)
    return functools.partial(built_once, root)


@pytest.fixture(scope="session")
def model_pairs(built_once):
    """``model_pairs(family)`` → (base_dir, finetuned_dir), built on first use."""
    import transformers

    from phlora_nim.demo.toy_models import make_pair

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    def get(family: str) -> tuple[Path, Path]:
        return built_once("pair", lambda folder: make_pair(family, folder, steps=12), family=family, steps=12)

    return get


@pytest.fixture(scope="session")
def llama_pair_with_tokenizer(built_once) -> tuple[Path, Path]:
    """A toy Llama with its tokenizer and a full fine-tune of it."""
    from phlora_nim.demo.toy_models import make_pair

    params = {"family": "llama", "steps": 12, "tokenizer": True}
    return built_once("pair", lambda folder: make_pair("llama", folder, steps=12, tokenizer=True), **params)


@pytest.fixture(scope="session")
def hidden_finetune(built_once) -> tuple[Path, Path, list[int]]:
    """A toy Llama and a fine-tune whose change the generic prompts cannot see (see make_hidden_finetune)."""
    from phlora_nim.testing.finetunes import make_hidden_finetune

    return built_once("hidden", lambda folder: make_hidden_finetune(folder, steps=40, seed=0), steps=40, seed=0)


@pytest.fixture(scope="session")
def moe_pairs(tmp_path_factory: pytest.TempPathFactory):
    """``moe_pairs(family)`` → (base_dir, finetuned_dir) of a tiny MoE model whose decoder weights (attention,
    experts, router) were really fine-tuned: a full-rank adapter then reproduces the fine-tune exactly."""
    import transformers

    from phlora_nim.demo.toy_models import make_pair

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            cache[family] = make_pair(family, tmp_path_factory.mktemp(f"moe-{family}"), steps=12, linear_only=True)
        return cache[family]

    return get


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    from phlora_nim.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def llama_finetunes(built_once) -> tuple[Path, list[Path]]:
    """A tiny Llama (with a word-level tokenizer) and three different full fine-tunes of it."""
    from phlora_nim.demo.toy_models import make_finetunes

    return built_once("llama-ft", lambda folder: make_finetunes("llama", folder, 3, steps=15), count=3, steps=15)


@pytest.fixture(scope="session")
def converted_repository(tmp_path_factory: pytest.TempPathFactory, llama_finetunes) -> Path:
    """A reference-backend model repository holding the three fine-tunes as rank-8 adapters."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs.convert import ConvertJob, convert
    from phlora_nim.repository.settings import RepositorySettings

    base, fts = llama_finetunes
    root = tmp_path_factory.mktemp("repo") / "model_repository"
    job = ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=("support", "legal", "code"),
        repository=root,
        options=ExtractOptions(policy=RankPolicy(rank=8)),
        settings=RepositorySettings(backend="trtllm-legacy-cpu", base=str(base), dtype="float32"),
    )
    convert(job)
    return root


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(condition, timeout=10, what=...)``: poll until ``condition()`` is truthy, else fail.

    The one polling loop of the tests: returns the condition's value; fails the test with ``what``
    when ``timeout`` seconds pass first.
    """
    import time

    def wait(condition, timeout: float = 10.0, *, interval: float = 0.05, what: str = "condition not met in time"):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            assert time.monotonic() < deadline, what() if callable(what) else what
            time.sleep(interval)

    return wait
