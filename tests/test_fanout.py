"""Many fine-tunes over a cluster: ``convert --index`` runs one entry of a list (one Indexed Job pod each),
and concurrent converts into one repository register every adapter exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from phlora_nim.core.errors import InputError
from phlora_nim.repository import registry as registry_module
from phlora_nim.repository.layout import LLM_MODEL, REGISTRY_FILE, adapter_store_dir, prefetch_dir
from phlora_nim.repository.registry import Registry

NAMES = ("support", "legal", "code")


def _convert_index(base: Path, fts: list[Path], repo: Path, index: int) -> subprocess.Popen[bytes]:
    """One pod of the Indexed Job: the whole list, its own index (as the chart passes them)."""
    args = [sys.executable, "-m", "phlora_nim.cli", "convert", "--base", str(base), "-m", str(repo), "-r", "4"]
    for ft, name in zip(fts, NAMES, strict=True):
        args += ["--finetuned", str(ft), "--name", name]
    args += ["--index", str(index)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", JOB_COMPLETION_INDEX=str(index))
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_three_indexed_converts_at_once_register_every_adapter_once(llama_finetunes, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    procs = [_convert_index(base, fts, repo, i) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    data = json.loads((repo / REGISTRY_FILE).read_text())
    assert sorted(data["adapters"]) == sorted(NAMES)  # each once: a dict keyed by name, three entries
    assert data["generation"] == 3  # three commits, none lost
    entries = Registry(repo).read().adapters
    assert len({e.task_id for e in entries.values()}) == 3
    for i, name in enumerate(NAMES):
        e = entries[name]
        assert e.sources["finetuned"] == str(fts[i].resolve())  # the index picked its own fine-tune
        assert (prefetch_dir(repo, e.task_id) / "model.lora_weights.npy").is_file()
        assert (adapter_store_dir(repo, name) / "adapter_model.safetensors").is_file()
    assert not [p for p in (repo / LLM_MODEL).iterdir() if p.name.startswith(".staging")]

    # A retried pod (its index again) changes nothing: same weights, same task id, others untouched.
    before = {n: (e.task_id, e.digest) for n, e in entries.items()}
    retry = _convert_index(base, fts, repo, 1)
    _, err = retry.communicate(timeout=300)
    assert retry.returncode == 0, err.decode()
    after = Registry(repo).read().adapters
    assert {n: (e.task_id, e.digest) for n, e in after.items()} == before
    assert json.loads((repo / REGISTRY_FILE).read_text())["generation"] == 3  # a no-op commit writes nothing


def test_index_outside_the_list_is_one_clear_error(llama_finetunes, run_cli, tmp_path: Path) -> None:
    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    args = ["convert", "--base", base, "-m", repo, "-r", "4"]
    for ft in fts:
        args += ["--finetuned", ft]
    code, _, err = run_cli(*args, "--index", "3")
    assert code == 2 and "index outside the list of fine-tunes" in err and "0 ≤ index < 3" in err
    assert "Traceback" not in err and not repo.exists()


def test_threads_of_one_process_lose_nothing(tmp_path: Path) -> None:
    """POSIX record locks belong to a process: threads are kept apart by the registry's own lock."""
    reg = Registry(tmp_path)

    def write(worker: int) -> None:
        for i in range(5):
            with reg.locked() as state:
                state.add(f"t{worker}-{i}", f"{worker:04d}{i:04d}" * 8, {"m": 1}, dtype="float16", sources={})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reg.read().adapters) == 20


def test_a_stale_registry_view_is_never_merged_into(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock file counts commits: a writer that still sees an older registry (a shared filesystem's cached
    name) waits for the current one, and refuses rather than overwrite another writer's adapters."""
    reg = Registry(tmp_path)
    with reg.locked() as state:
        state.add("a", "aa" * 32, {"m": 1}, dtype="float16", sources={})
    assert reg.lock_path.read_text().strip() == "1"
    monkeypatch.setattr(registry_module, "_STALE_WAIT_S", 0.5)
    reg.lock_path.write_text("2\n")  # another machine committed generation 2; this one still shows 1
    with pytest.raises(InputError, match="older than its lock file"), reg.locked() as state:
        state.add("b", "bb" * 32, {"m": 1}, dtype="float16", sources={})
    assert sorted(reg.read().adapters) == ["a"]  # nothing written from the stale view

    # The newer registry shows up while the writer waits: it merges into that one.
    newer = json.loads(reg.path.read_text())
    newer["generation"] = 2
    monkeypatch.setattr(registry_module, "_STALE_WAIT_S", 5.0)
    timer = threading.Timer(0.4, lambda: reg.path.write_text(json.dumps(newer)))
    timer.start()
    with reg.locked() as state:
        state.add("b", "bb" * 32, {"m": 1}, dtype="float16", sources={})
    timer.join()
    assert sorted(reg.read().adapters) == ["a", "b"] and reg.lock_path.read_text().strip() == "3"


def test_prefetch_may_name_an_adapter_a_sibling_index_converts(llama_finetunes, run_cli, tmp_path: Path) -> None:
    """``--prefetch`` names adapters of the whole list: an index that commits before the named adapter's
    own index is not refused, and the named adapter is preloaded once it is registered."""
    from tests.test_convert import _config, _trtllm_args

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    args = [*_trtllm_args(base, fts, repo, tmp_path), "--prefetch", "support"]
    alone = [*_trtllm_args(base, fts[:1], tmp_path / "alone", tmp_path), "--prefetch", "legal"]
    code, _, err = run_cli(*alone)
    assert code == 2 and "--prefetch names an adapter that is not registered" in err  # a typo stays an error
    code, _, err = run_cli(*args, "--index", "1")  # legal first: support is not registered yet
    assert code == 0, err
    code, _, err = run_cli(*args, "--index", "0")
    assert code == 0, err
    state = Registry(repo).read()
    params = {k: v.string_value for k, v in _config(repo, LLM_MODEL).parameters.items()}
    preload = repo / params["lora_prefetch_dir"].removeprefix("/models/")
    assert [p.name for p in preload.iterdir()] == [str(state.adapters["support"].task_id)]
