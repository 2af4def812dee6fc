"""Checks run by `helm test` against a phlora-nim release.

    python release_check.py health     grpc.health.v1 Check of the router: SERVING
    python release_check.py infer      one ModelInfer through the router (Triton's ensemble text interface)
    python release_check.py nim        NIM: ready, and /v1/models lists the base model and the adapters

Settings come from the environment: TARGET (host:port or a URL for nim), MODEL (the model or adapter
name to call), PROMPT, MAX_TOKENS, TIMEOUT_SECONDS, CA_FILE (TLS: the CA to trust), API_KEY (sent as
`authorization: Bearer <key>` when the router has tenants).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _root_certificates() -> bytes | None:
    path = _env("CA_FILE")
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _with_retries(check, timeout: float) -> None:
    """Run ``check`` until it passes or ``timeout`` seconds have gone (the last error is raised)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except Exception as exc:  # retried until the deadline, then reported
            if time.monotonic() >= deadline:
                raise SystemExit(f"FAILED: {exc}") from exc
            print(f"not yet: {exc}", flush=True)
            time.sleep(3)


def check_health(target: str, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    roots = _root_certificates()
    if roots is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))

    def check() -> None:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{target}: health status {status}, expected SERVING")
        print(f"{target}: {status}")

    _with_retries(check, timeout)


def check_inference(target: str, timeout: float) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    roots = _root_certificates()
    client = grpcclient.InferenceServerClient(target, ssl=roots is not None, root_certificates=_env("CA_FILE") or None)
    model, prompt, max_tokens = _env("MODEL"), _env("PROMPT", "Say hello."), int(_env("MAX_TOKENS", "8"))
    headers = {"authorization": f"Bearer {_env('API_KEY')}"} if _env("API_KEY") else None
    if _env("ENGINE_INPUTS") == "llmapi":  # TensorRT-LLM's llmapi model: no batch dimension
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
        tokens = grpcclient.InferInput("sampling_param_max_tokens", [1], "INT32")
        tokens.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    else:  # the ensemble of the legacy inflight_batcher_llm repository
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))

    def check() -> None:
        result = client.infer(model, [text, tokens], headers=headers, client_timeout=60)
        output = result.as_numpy("text_output")
        if output is None or output.size == 0:
            raise RuntimeError(f"{model}: the response has no text_output")
        print(f"{model}: {prompt!r} -> {output.reshape(-1)[0]!r}")

    _with_retries(check, timeout)


def check_nim(target: str, timeout: float) -> None:
    def check() -> None:
        with urllib.request.urlopen(f"{target}/v1/health/ready", timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"{target}/v1/health/ready: HTTP {response.status}")
        with urllib.request.urlopen(f"{target}/v1/models", timeout=10) as response:
            models = [m["id"] for m in json.load(response).get("data", [])]
        if not models:
            raise RuntimeError(f"{target}/v1/models lists no model")
        wanted = _env("MODEL")
        if wanted and wanted not in models:
            raise RuntimeError(f"{target}/v1/models lists {models}, not {wanted!r}")
        print(f"{target}: models {models}")

    _with_retries(check, timeout)


def main(argv: list[str]) -> None:
    checks = {"health": check_health, "infer": check_inference, "nim": check_nim}
    if len(argv) != 2 or argv[1] not in checks:
        raise SystemExit(f"usage: {argv[0]} {'|'.join(checks)}")
    checks[argv[1]](_env("TARGET"), float(_env("TIMEOUT_SECONDS", "60")))


if __name__ == "__main__":
    main(sys.argv)
