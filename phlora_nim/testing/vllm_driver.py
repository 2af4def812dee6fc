"""Runs the real vLLM engine on adapter folders and writes what it generated as JSON.

This file runs under the interpreter of the vLLM environment (``.venv-vllm``, see
``tests/setup_vllm_env.sh``), not phlora-nim's: vLLM pins its own torch and transformers. It imports
vLLM and the standard library only, and is fed one JSON spec:

    .venv-vllm/bin/python phlora_nim/testing/vllm_driver.py SPEC.json OUT.json

Spec fields: ``model`` (a Hugging Face folder), ``adapters`` (name → PEFT folder), ``prompts``
(token id lists), ``max_tokens``, ``engine`` (keyword arguments of ``vllm.LLM`` or flags of the
OpenAI server), and ``mode``:

- ``tokens``: every prompt on the base model and on every adapter, all in one ``LLM.generate`` call
  (so batches mix adapters), greedy, ``ignore_eos``; writes ``tokens[name][i]``.
- ``throughput``: for each count k in ``adapter_counts`` (0 = base only), one batch of
  ``batch_size`` requests whose rows cycle through k adapters; writes generated tokens per second
  (median of ``repeats`` after a warm-up run).
- ``server``: starts vLLM's OpenAI server once (``--enable-lora --lora-modules name=path …``) on
  127.0.0.1, sends each prompt to ``/v1/completions`` for the base model and each adapter with the
  openai SDK (``return_token_ids``) and writes ``tokens`` as in ``tokens`` mode.

Upstream: ``vllm/entrypoints/llm.py`` (``LLM.generate(lora_request=…)``),
``vllm/lora/request.py`` (``LoRARequest``), ``vllm/entrypoints/launchers/cli_args.py``
(``--lora-modules``), ``vllm/entrypoints/openai/completion/protocol.py`` (``return_token_ids``).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _engine(spec: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(model=spec["model"], tokenizer=spec.get("tokenizer", spec["model"]), **spec.get("engine", {}))


def _requests(spec: dict[str, Any]) -> tuple[list[str], list[Any]]:
    from vllm.lora.request import LoRARequest

    # lora_int_id must be unique per adapter (vllm/lora/request.py); ids follow the spec's order.
    names = ["base", *spec["adapters"]]
    lora = [None] + [LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(spec["adapters"].items())]
    return names, lora


def _greedy(spec: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=int(spec["max_tokens"]), ignore_eos=True)


def run_tokens(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    llm = _engine(spec)
    started = time.perf_counter()
    names, lora = _requests(spec)
    prompts = [{"prompt_token_ids": list(p)} for p in spec["prompts"]]
    batch = [(n, r, p) for n, r in zip(names, lora, strict=True) for p in prompts]
    outs = llm.generate([b[2] for b in batch], _greedy(spec), lora_request=[b[1] for b in batch], use_tqdm=False)
    tokens: dict[str, list[list[int]]] = {n: [] for n in names}
    for (name, _, _), out in zip(batch, outs, strict=True):
        tokens[name].append(list(out.outputs[0].token_ids))
    return {
        "tokens": tokens,
        "seconds": {"engine_start": started - start, "generate": time.perf_counter() - started},
    }


def run_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    llm = _engine(spec)
    adapters = _requests(spec)[1][1:]
    size = int(spec["batch_size"])
    prompts = [{"prompt_token_ids": list(spec["prompts"][i % len(spec["prompts"])])} for i in range(size)]
    params = _greedy(spec)
    results = {}
    for k in spec["adapter_counts"]:
        rows = [adapters[i % k] if k else None for i in range(size)]
        times = []
        for run in range(int(spec["repeats"]) + 1):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=rows, use_tqdm=False)
            if run:  # the first run warms up (adapters loaded into the engine's slots)
                times.append(time.perf_counter() - t0)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        results[str(k)] = generated / statistics.median(times)
    return {"tokens_per_second": results}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's OpenAI server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"vLLM's OpenAI server was not ready after {timeout:.0f} s")


def server_command(spec: dict[str, Any], port: int) -> list[str]:
    """``vllm serve``'s entry point with one ``--lora-modules name=path`` per adapter."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec["model"]]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--enable-lora"]
    for flag, value in spec.get("engine", {}).items():
        if flag == "enable_lora":
            continue
        option = "--" + flag.replace("_", "-")
        if value is True:
            cmd.append(option)
        elif value is not False:
            cmd += [option, str(value)]
    cmd.append("--lora-modules")
    cmd += [f"{name}={path}" for name, path in spec["adapters"].items()]
    return cmd


def run_server(spec: dict[str, Any]) -> dict[str, Any]:
    from openai import OpenAI

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(spec.get("server_log", os.devnull), "wb")  # noqa: SIM115 (lives as long as the server)
    start = time.perf_counter()
    proc = subprocess.Popen(server_command(spec, port), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, url, float(spec.get("start_timeout", 600)))
        started = time.perf_counter()
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=300)
        served = [m.id for m in client.models.list().data]
        tokens: dict[str, list[list[int]]] = {}
        for name in ["base", *spec["adapters"]]:
            model = spec["model"] if name == "base" else name
            tokens[name] = []
            for prompt in spec["prompts"]:
                out = client.completions.create(
                    model=model,
                    prompt=list(prompt),
                    max_tokens=int(spec["max_tokens"]),
                    temperature=0.0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
                tokens[name].append(list(out.choices[0].model_extra["token_ids"]))
        return {
            "tokens": tokens,
            "served_models": served,
            "seconds": {"engine_start": started - start, "generate": time.perf_counter() - started},
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


MODES = {"tokens": run_tokens, "throughput": run_throughput, "server": run_server}


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    result = MODES[spec["mode"]](spec)
    import vllm

    result["vllm_version"] = vllm.__version__
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.rename(out_path)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    sys.exit(main(sys.argv[1:]))
