"""Soak: the whole serving stack under churn, faults and abuse, bounded in time and on loopback only.

Two real tritonserver replicas (CPU reference model) behind the router (its own process, as
deployed), a LoRA cache that holds 2 of the 5 adapters, and for ``--seconds``:

- ``--clients`` − 4 innocent client threads of tenant ``good``: random adapters (and the base model)
  and prompts through the router, every answer checked against PEFT's greedy output of the same
  adapter; a client retries UNAVAILABLE for up to 120 s, as a production client's retry policy would
  (the router restart is an outage, not a failure: its length is reported);
- 4 attacker threads of tenant ``evil``: oversized prompts, negative and huge ``max_tokens``, empty
  prompts, a 100 KB model name, another tenant's adapter, an unknown one, internal models, injected
  ``lora_*`` inputs, no key;
- faults on a timeline: churn (an adapter converted, another removed), one replica SIGKILLed and
  restarted, the other hung (SIGSTOP) then resumed, the router restarted.

It prints requests, wrong answers (must be 0), innocent requests failed (must be 0), errors by code
for both tenants, latency of innocent requests and recovery times; exit code 1 if any answer was
wrong or any innocent request failed.

    .venv/bin/python bench/soak.py                       # ~4 min on 2 cores (first run: +1 min of fine-tunes)
    .venv/bin/python bench/soak.py --seconds 60 --clients 8
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.jobs.convert import ConvertJob, convert
from phlora_nim.jobs.maintenance import remove_adapter
from phlora_nim.repository.layout import adapter_store_dir
from phlora_nim.repository.settings import RepositorySettings
from phlora_nim.triton.launcher import LocalTriton, free_port

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.soak")
PROMPTS = ("the red cat", "a small dog runs", "the cat sat")
NEW_TOKENS = 4
STABLE = ("a0", "a1", "a2", "a3")  # what innocent clients use; a4 is removed and a5 added during the run
GOOD_KEY, EVIL_KEY = "good-key-0123456789", "evil-key-0123456789"
MAX_INPUT = 32
RETRY_S = 120  # how long an innocent client retries UNAVAILABLE (a router restart on a loaded machine)


# --- the stack ------------------------------------------------------------------------------------
def build_repository(work: Path) -> tuple[Path, Path, list[Path]]:
    from phlora_nim.demo.toy_models import make_finetunes

    ckpt = work / "ckpt"
    if not (ckpt / "ft-5" / "config.json").exists():
        log.info("fine-tuning 6 small Llama models on CPU (once; cached in %s)", ckpt)
        make_finetunes("llama", ckpt, 6, steps=10, linear_only=True)
    base, fts = ckpt / "base", [ckpt / f"ft-{i}" for i in range(6)]
    repo = work / "repo"
    if repo.exists():
        import shutil

        shutil.rmtree(repo)
    one = 4 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 4  # rank 4, A + B of every module, fp32
    settings = RepositorySettings(
        backend="trtllm-legacy-cpu",
        base=str(base),
        dtype="float32",
        lora_cache_bytes=2 * one,
        llm_parameters={"max_input_len": str(MAX_INPUT), "max_seq_len": "48"},
    )
    convert(_job(base, fts[:5], [f"a{i}" for i in range(5)], repo, settings))
    return repo, base, fts


def _job(base: Path, fts: list[Path], names: list[str], repo: Path, settings: RepositorySettings) -> ConvertJob:
    return ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=tuple(names),
        repository=repo,
        options=ExtractOptions(policy=RankPolicy(rank=4)),
        settings=settings,
    )


def expected_answers(base: Path, repo: Path, names: list[str]) -> dict[tuple[str, str], str]:
    """PEFT's greedy continuation of every prompt for every adapter (and the base model as ``ensemble``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    out = {}
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
        if name != "ensemble":
            model = PeftModel.from_pretrained(model, adapter_store_dir(repo, name))
        for prompt in PROMPTS:
            ids = tok.encode(prompt, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2)
            out[(name, prompt)] = tok.decode(gen[0, len(ids) :].tolist(), skip_special_tokens=True)
    return out


def write_tenants(path: Path) -> Path:
    path.write_text(
        "tenants:\n"
        f"  - name: good\n    keys: ['{GOOD_KEY}']\n    adapters: ['a*']\n    base_models: ['ensemble']\n"
        f"  - name: evil\n    keys: ['{EVIL_KEY}']\n    adapters: ['x*']\n    base_models: ['ensemble']\n"
        "    max_in_flight: 4\n"
    )
    return path


class RouterProcess:
    """``phlora-nim serve`` in its own process, restartable on the same port."""

    def __init__(self, repo: Path, upstreams: list[str], tenants: Path, port: int, log_path: Path) -> None:
        exe = Path(sys.executable).with_name("phlora-nim")
        self.command = [str(exe), "serve", "-m", str(repo), "--port", str(port), "--metrics-port", "0"]
        for u in upstreams:
            self.command += ["--upstream", u]
        self.command += ["--tenants", str(tenants), "--attempt-timeout", "3", "--health-interval", "0.5"]
        self.url = f"127.0.0.1:{port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ready(self.url):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited: see {self.log_path}")
            time.sleep(0.2)
        raise RuntimeError(f"router not ready in 60 s: see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def ready(url: str) -> bool:
    try:
        with contextlib.closing(grpcclient.InferenceServerClient(url)) as client:
            return bool(client.is_server_ready(client_timeout=1))
    except Exception:
        return False


# --- clients --------------------------------------------------------------------------------------
@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    good_ok: int = 0
    wrong: list[str] = field(default_factory=list)
    innocent_failed: collections.Counter[str] = field(default_factory=collections.Counter)
    innocent_failures: list[tuple[float, str]] = field(default_factory=list)
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    evil: collections.Counter[str] = field(default_factory=collections.Counter)
    evil_kinds: dict[str, collections.Counter[str]] = field(default_factory=dict)


def _inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [text, tokens]


def _code(exc: InferenceServerException) -> str:
    return str(exc.status() or "UNKNOWN").replace("StatusCode.", "")


def innocent(url: str, expected: dict[tuple[str, str], str], tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    client = grpcclient.InferenceServerClient(url)
    headers = {"authorization": f"Bearer {GOOD_KEY}"}
    while not stop.is_set():
        model, prompt = rng.choice((*STABLE, "ensemble")), rng.choice(PROMPTS)
        started = time.monotonic()
        give_up = started + RETRY_S
        while True:
            try:
                result = client.infer(model, _inputs(prompt, NEW_TOKENS), headers=headers, client_timeout=30)
                answer = result.as_numpy("text_output").reshape(-1)[0].decode()
                with tally.lock:
                    tally.latencies.append(time.monotonic() - started)
                    if answer == expected[(model, prompt)]:
                        tally.good_ok += 1
                    else:
                        tally.wrong.append(f"{model} {prompt!r}: {answer!r} ≠ {expected[(model, prompt)]!r}")
                break
            except InferenceServerException as exc:
                code = _code(exc)
                if code == "UNAVAILABLE" and time.monotonic() < give_up:
                    with tally.lock:
                        tally.retries += 1
                    time.sleep(0.2)
                    with contextlib.suppress(Exception):
                        client.close()
                    client = grpcclient.InferenceServerClient(url)
                    continue
                with tally.lock:
                    tally.innocent_failed[code] += 1
                    tally.innocent_failures.append((time.monotonic(), f"{model}: {code} {exc.message()[:200]}"))
                break
    client.close()


def _poisons(url: str) -> list[tuple[str, Callable[[], object]]]:
    client = grpcclient.InferenceServerClient(url)
    evil = {"authorization": f"Bearer {EVIL_KEY}"}

    def ask(model: str, inputs: list[grpcclient.InferInput], headers: dict[str, str] | None = evil) -> object:
        return client.infer(model, inputs, headers=headers, client_timeout=30)

    injected = _inputs("the red cat", 4)
    task = grpcclient.InferInput("lora_task_id", [1, 1], "UINT64")
    task.set_data_from_numpy(np.array([[123]], dtype=np.uint64))
    injected.append(task)
    return [
        ("oversized prompt", lambda: ask("ensemble", _inputs("the red cat " * 2000, 4))),
        ("negative max_tokens", lambda: ask("ensemble", _inputs("the red cat", -5))),
        ("huge max_tokens", lambda: ask("ensemble", _inputs("the red cat", 1_000_000))),
        ("empty prompt", lambda: ask("ensemble", _inputs("", 4))),
        ("100 KB model name", lambda: ask("m" * 100_000, _inputs("the red cat", 4))),
        ("other tenant's adapter", lambda: ask("a0", _inputs("the red cat", 4))),
        ("unknown adapter", lambda: ask("x-missing", _inputs("the red cat", 4))),
        ("internal model", lambda: ask("tensorrt_llm", _inputs("the red cat", 4))),
        ("injected lora_task_id", lambda: ask("ensemble", injected)),
        ("no key", lambda: ask("ensemble", _inputs("the red cat", 4), headers=None)),
    ]


def attacker(url: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    poisons = _poisons(url)
    while not stop.is_set():
        kind, call = rng.choice(poisons)
        try:
            call()
            code = "OK"
        except InferenceServerException as exc:
            code = _code(exc)
            if code == "UNAVAILABLE":  # the router is down (restart): even an attacker's client backs off
                time.sleep(0.2)
        with tally.lock:
            tally.evil[code] += 1
            tally.evil_kinds.setdefault(kind, collections.Counter())[code] += 1


# --- faults ---------------------------------------------------------------------------------------
@dataclass
class Replica:
    repo: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    server: LocalTriton | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        self.server = LocalTriton(
            self.repo, grpc_port=self.grpc_port, http_port=self.http_port, metrics_port=self.metrics_port
        ).start()

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server._process is not None
        return self.server._process.pid

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _first_success(url: str, model: str, key: str, since: float, limit: float = 60) -> float | None:
    """Seconds from ``since`` until a request for ``model`` succeeds (None if not within ``limit``)."""
    headers = {"authorization": f"Bearer {key}"}
    while time.monotonic() - since < limit:
        try:
            with contextlib.closing(grpcclient.InferenceServerClient(url)) as client:
                client.infer(model, _inputs(PROMPTS[0], NEW_TOKENS), headers=headers, client_timeout=10)
            return time.monotonic() - since
        except Exception:
            time.sleep(0.1)
    return None


@contextlib.contextmanager
def stack(work: Path) -> Iterator[tuple[Path, Path, list[Path], list[Replica], RouterProcess]]:
    repo, base, fts = build_repository(work)
    replicas = [Replica(repo, free_port(), free_port(), free_port()) for _ in range(2)]
    router = RouterProcess(
        repo, [r.url for r in replicas], write_tenants(work / "tenants.yaml"), free_port(), work / "router.log"
    )
    try:
        for r in replicas:
            r.start()
        router.start()
        yield repo, base, fts, replicas, router
    finally:
        router.stop()
        for r in replicas:
            r.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the load (default 120)")
    parser.add_argument("--clients", type=int, default=16, help="client threads, 4 of them attackers (default 16)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "soak")
    args = parser.parse_args()
    if args.clients < 5:
        parser.error("--clients must be ≥ 5 (4 attackers and at least one innocent client)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    recovery: dict[str, float | None] = {}
    with stack(args.work) as (repo, base, fts, replicas, router):
        expected = expected_answers(base, repo, [*STABLE, "ensemble"])
        start = time.monotonic()
        stop = threading.Event()  # set once every fault is over and the load ran on for a while
        threads = [
            threading.Thread(target=innocent, args=(router.url, expected, tally, stop, i), daemon=True)
            for i in range(args.clients - 4)
        ] + [threading.Thread(target=attacker, args=(router.url, tally, stop, 100 + i), daemon=True) for i in range(4)]
        for t in threads:
            t.start()

        def at(fraction: float) -> None:
            time.sleep(max(0.0, start + fraction * args.seconds - time.monotonic()))

        at(0.10)
        log.info("fault: churn (convert a5, remove a4)")
        t0 = time.monotonic()
        settings = RepositorySettings.load(repo)
        assert settings is not None
        convert(_job(base, [fts[5]], ["a5"], repo, settings))
        remove_adapter(repo, "a4")
        recovery["churn: convert + remove took"] = time.monotonic() - t0
        recovery["churn: a5 served, after its registration"] = _first_success(
            router.url, "a5", GOOD_KEY, time.monotonic()
        )

        at(0.25)
        log.info("fault: SIGKILL replica 2, restart it after 5 s")
        os.kill(replicas[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        replicas[1].stop()  # cleans up its stubs and shared memory
        time.sleep(5)
        replicas[1].start()
        recovery["killed replica: restarted and ready"] = time.monotonic() - t0

        at(0.45)
        log.info("fault: replica 1 hung (SIGSTOP) for 8 s")
        os.killpg(replicas[0].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        recovery["hung replica: first answer after the hang"] = _first_success(router.url, "ensemble", GOOD_KEY, t0)
        time.sleep(max(0.0, t0 + 8 - time.monotonic()))
        os.killpg(replicas[0].pid, signal.SIGCONT)

        at(0.70)
        log.info("fault: router restart")
        t0 = time.monotonic()
        router.stop()
        router.start()
        recovery["router restart: serving again"] = _first_success(router.url, "a0", GOOD_KEY, t0)

        at(0.85)
        time.sleep(max(0.0, 0.15 * args.seconds - (time.monotonic() - t0)))  # load goes on after the last fault
        stop.set()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.monotonic() - start

    failed = sum(tally.innocent_failed.values())
    evil_total = sum(tally.evil.values())
    total = tally.good_ok + len(tally.wrong) + failed + evil_total
    lat = sorted(tally.latencies)
    print(f"\nsoak: {elapsed:.0f} s, {args.clients} clients ({args.clients - 4} innocent, 4 attackers), 2 replicas")
    print(f"requests                    {total}  ({total / elapsed:.1f}/s)")
    print(f"innocent answered right     {tally.good_ok}")
    print(f"wrong answers               {len(tally.wrong)}   (must be 0)")
    print(f"innocent requests failed    {failed}   (must be 0) {dict(tally.innocent_failed)}")
    print(f"innocent retries (UNAVAILABLE during the router restart) {tally.retries}")
    if lat:
        p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"innocent latency            p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {lat[-1]:.1f} s")
    print(f"attacker requests by code   {dict(sorted(tally.evil.items()))}")
    for kind, codes in sorted(tally.evil_kinds.items()):
        print(f"  {kind:<24}{dict(codes)}")
    print("recovery")
    for what, seconds in recovery.items():
        print(f"  {what:<42}{'never' if seconds is None else f'{seconds:.1f} s'}")
    for line in tally.wrong[:5]:
        print("WRONG", line)
    for when, line in tally.innocent_failures[:10]:
        print(f"FAILED at {when - start:.1f} s: {line}")
    return 1 if tally.wrong or failed else 0


if __name__ == "__main__":
    sys.exit(main())
