"""Adapter registry: content-derived task ids, collisions, names, concurrent writers."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from phlora_nim.converters.adapter import LoraAdapter, LoraWeights, adapter_digest
from phlora_nim.core.errors import InputError, OptionError
from phlora_nim.jobs.maintenance import remove_adapter
from phlora_nim.repository.layout import adapter_store_dir, prefetch_dir
from phlora_nim.repository.registry import (
    TASK_ID_LIMIT,
    AdapterEntry,
    PendingDeletion,
    Registry,
    RegistryState,
    task_id_for,
)


def _adapter(seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        modules={
            "model.layers.0.self_attn.q_proj": LoraWeights(
                a=torch.randn(2, 8, generator=gen), b=torch.randn(8, 2, generator=gen), alpha=2.0
            ),
        }
    )


def _add(state: RegistryState, name: str, adapter: LoraAdapter, **kwargs) -> AdapterEntry:
    """Register ``adapter`` the way conversion does: by its digest and ranks."""
    return state.add(name, adapter_digest(adapter), adapter.ranks(), **kwargs)


def test_task_ids_come_from_content_and_are_stable(tmp_path: Path) -> None:
    ids = []
    for root in (tmp_path / "r1", tmp_path / "r2"):
        reg = Registry(root)
        with reg.locked() as state:
            ids.append(_add(state, "a", _adapter(1), dtype="float16", sources={}).task_id)
    assert ids[0] == ids[1] and 0 < ids[0] < TASK_ID_LIMIT
    # A fixed adapter has a fixed id on every machine: the digest covers exact bytes.
    assert adapter_digest(_adapter(1)) == adapter_digest(_adapter(1)) != adapter_digest(_adapter(2))
    scaled = _adapter(1)
    scaled.modules["model.layers.0.self_attn.q_proj"].alpha = 4.0
    assert adapter_digest(scaled) != adapter_digest(_adapter(1))


def test_collision_is_detected_and_probed_away() -> None:
    digest, other = "d" * 64, "e" * 64
    first = task_id_for(digest, {})
    second = task_id_for(digest, {first: other})
    assert second != first and 0 < second < TASK_ID_LIMIT
    assert task_id_for(digest, {first: digest}) == first  # its own id is not a collision
    expected = int.from_bytes(hashlib.sha256(f"{digest}:1".encode()).digest()[:4], "big") % (TASK_ID_LIMIT - 1) + 1
    assert second == expected


def test_same_name_other_weights_needs_replace_and_retires_the_old_id(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with reg.locked() as state:
        old = _add(state, "bot", _adapter(1), dtype="float16", sources={})
        assert _add(state, "bot", _adapter(1), dtype="float16", sources={}) == old  # idempotent
    with pytest.raises(InputError, match="already registered with different weights"), reg.locked() as state:
        _add(state, "bot", _adapter(2), dtype="float16", sources={})
    assert reg.read().adapters["bot"].digest == old.digest  # failed run left the file as it was
    with reg.locked() as state:
        new = _add(state, "bot", _adapter(2), dtype="float16", sources={}, replace=True)
    state = reg.read()
    assert new.task_id != old.task_id and state.retired[old.task_id] == old.digest


def test_removed_ids_are_never_given_to_other_weights(tmp_path: Path, monkeypatch) -> None:
    reg = Registry(tmp_path)
    with reg.locked() as state:
        gone = _add(state, "gone", _adapter(1), dtype="float16", sources={})
    with reg.locked() as state:
        state.remove("gone")
    # Force the next adapter's first probe onto the retired id: it must move on.
    import phlora_nim.repository.registry as registry

    real = registry.task_id_for

    def first_probe_collides(digest: str, taken: dict[int, str]) -> int:
        assert taken.get(gone.task_id) == gone.digest
        return real(digest, taken)

    monkeypatch.setattr(registry, "task_id_for", first_probe_collides)
    with reg.locked() as state:
        fresh = _add(state, "fresh", _adapter(2), dtype="float16", sources={})
    assert fresh.task_id != gone.task_id


def test_remove_unknown_and_corrupt_registry(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    with pytest.raises(InputError, match="no adapter named 'x'"), reg.locked() as state:
        state.remove("x")
    (tmp_path / "phlora_registry.json").write_text("{broken")
    with pytest.raises(InputError, match="unreadable adapter registry"):
        reg.read()


def _writer(root: str, worker: int) -> None:
    reg = Registry(Path(root))
    for i in range(5):
        with reg.locked() as state:
            _add(state, f"w{worker}-{i}", _adapter(100 * worker + i), dtype="float16", sources={})


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads((tmp_path / "phlora_registry.json").read_text())
    assert len(data["adapters"]) == 20
    assert len({e["task_id"] for e in data["adapters"].values()}) == 20


def test_after_commit_runs_once_the_new_registry_is_readable(tmp_path: Path) -> None:
    """Files of a removed adapter go only after no reader can find it listed."""
    reg = Registry(tmp_path)
    with reg.locked() as state:
        _add(state, "a", _adapter(1), dtype="float16", sources={})
    seen: list[list[str]] = []
    with reg.locked() as state:
        state.remove("a")
        state.after_commit.append(lambda: seen.append(sorted(Registry(tmp_path).read().adapters)))
        assert seen == []
    assert seen == [[]]


def test_files_of_older_versions_are_read(tmp_path: Path) -> None:
    """Registries and settings written before the renames (both keys were once called "extra")."""
    from phlora_nim.engines.trtllm_legacy.deploy import llm_config
    from phlora_nim.repository.settings import RepositorySettings

    reg = Registry(tmp_path)
    with reg.locked() as state:
        _add(state, "a", _adapter(1), dtype="float16", sources={}, trtllm_layout={"bytes": 123})
    data = json.loads(reg.path.read_text())
    assert data["adapters"]["a"]["trtllm_layout"] == {"bytes": 123}
    data["adapters"]["a"]["extra"] = data["adapters"]["a"].pop("trtllm_layout")
    reg.path.write_text(json.dumps(data))
    assert reg.read().adapters["a"].trtllm_layout == {"bytes": 123}
    with reg.locked():
        pass  # written back under the new key
    assert "trtllm_layout" in json.loads(reg.path.read_text())["adapters"]["a"]

    (tmp_path / "phlora_repository.json").write_text(json.dumps({"base": "/ckpt/base", "extra": {"max_tokens": "7"}}))
    settings = RepositorySettings.load(tmp_path)
    assert settings is not None and settings.llm_parameters == {"max_tokens": "7"}
    assert llm_config(settings, reg.read(), tmp_path).parameters["max_tokens"].string_value == "7"


def _with_files(root: Path, names: dict[str, int]) -> dict[str, AdapterEntry]:
    """Register adapters ``name → seed`` with their two folders, as convert leaves them."""
    with Registry(root).locked() as state:
        entries = {n: _add(state, n, _adapter(seed), dtype="float16", sources={}) for n, seed in names.items()}
    for entry in entries.values():
        for folder in (prefetch_dir(root, entry.task_id), adapter_store_dir(root, entry.name)):
            folder.mkdir(parents=True)
            (folder / "weights").write_text(entry.name)
    return entries


def _folders(root: Path, entry: AdapterEntry) -> list[bool]:
    return [prefetch_dir(root, entry.task_id).is_dir(), adapter_store_dir(root, entry.name).is_dir()]


class _Clock:
    """A registry clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


def test_removed_adapters_files_outlive_the_entry_by_the_grace(tmp_path: Path) -> None:
    """A router with the previous registry still finds the files; the first write after the grace deletes them."""
    e = _with_files(tmp_path, {"a": 1, "b": 2})
    clock = _Clock()
    remove_adapter(tmp_path, "a", grace=0.4, now=clock)
    state = Registry(tmp_path).read()
    assert "a" not in state.adapters and state.retired[e["a"].task_id] == e["a"].digest
    assert _folders(tmp_path, e["a"]) == [True, True]
    assert sorted(p.path for p in state.pending_deletions) == [
        "tensorrt_llm/adapters/a",
        f"tensorrt_llm/lora_prefetch/{e['a'].task_id}",
    ]
    clock.advance(0.399)
    with Registry(tmp_path, now=clock).locked():
        pass  # a write before the deadline keeps them
    assert _folders(tmp_path, e["a"]) == [True, True]
    clock.advance(0.001)
    remove_adapter(tmp_path, "b", grace=60, now=clock)  # the next write at the deadline
    assert _folders(tmp_path, e["a"]) == [False, False] and _folders(tmp_path, e["b"]) == [True, True]
    state = Registry(tmp_path).read()
    assert {p.adapter for p in state.pending_deletions} == {"b"} and len(state.retired) == 2


def test_grace_zero_deletes_at_once_and_registering_again_keeps_the_files(tmp_path: Path) -> None:
    e = _with_files(tmp_path, {"a": 1, "b": 2})
    clock = _Clock()
    remove_adapter(tmp_path, "b", grace=0, now=clock)
    assert _folders(tmp_path, e["b"]) == [False, False]
    remove_adapter(tmp_path, "a", grace=0.2, now=clock)
    with Registry(tmp_path, now=clock).locked() as state:  # the same weights come back under the same name
        assert _add(state, "a", _adapter(1), dtype="float16", sources={}).task_id == e["a"].task_id
    clock.advance(3600)
    with Registry(tmp_path, now=clock).locked():
        pass
    assert _folders(tmp_path, e["a"]) == [True, True]  # in use again: never deleted
    assert Registry(tmp_path).read().pending_deletions == []


@pytest.mark.parametrize("path", ["../outside", "/etc", ".", "tensorrt_llm/../.."])
def test_pending_deletions_never_leave_the_repository(path: str, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (tmp_path / "outside").mkdir()
    with Registry(root).locked():
        pass
    data = json.loads((root / "phlora_registry.json").read_text())
    data["pending_deletions"] = [{"path": path, "delete_after": "2000-01-01T00:00:00+00:00", "adapter": "x"}]
    (root / "phlora_registry.json").write_text(json.dumps(data))
    assert Registry(root).read().pending_deletions == [
        PendingDeletion(path=path, delete_after="2000-01-01T00:00:00+00:00", adapter="x")
    ]
    with pytest.raises(InputError, match="not a folder inside the repository"), Registry(root).locked():
        pass
    assert (tmp_path / "outside").is_dir() and root.is_dir()


def test_grace_must_not_be_negative(tmp_path: Path) -> None:
    _with_files(tmp_path, {"a": 1})
    with pytest.raises(OptionError, match="--grace"):
        remove_adapter(tmp_path, "a", grace=-1)
    assert "a" in Registry(tmp_path).read().adapters
