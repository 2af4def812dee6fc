"""``serve --config router.yaml``: every option in a file, flags win, bad files get one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from phlora_nim.core.errors import InputError
from phlora_nim.router.config import RouterConfig, load_router_file


def test_file_holds_every_option_and_finer_settings(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "tenants.yaml").write_text("tenants: []\n")
    path = tmp_path / "router.yaml"
    path.write_text(
        "model-repository: repo\n"
        "upstream: [triton-0:8001, triton-1:8001]\n"
        "upstream_model: ensemble\n"
        "port: 9001\n"
        "metrics-port: 0\n"
        "tenants: tenants.yaml\n"
        "spill_factor: 1\n"
        "residency_capacity: 32\n"
        "grace: 3\n"
        "attempt-timeout: 45\n"
        "expose_models: ensemble_text\n"
    )
    values = load_router_file(path)
    assert values["model_repository"] == tmp_path / "repo"  # relative to the file
    assert values["upstreams"] == ("triton-0:8001", "triton-1:8001")
    assert values["spill_factor"] == 1.0 and isinstance(values["spill_factor"], float)
    config = RouterConfig(**values)
    assert config.attempt_timeout == 45.0 and config.expose_models == ("ensemble_text",)
    assert config.port == 9001 and config.residency_capacity == 32 and config.tenants == tmp_path / "tenants.yaml"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- a\n- b\n", "must be a mapping"),
        ("port: [1\n", "unreadable router config"),
        ("prot: 8001\n", "unknown router setting"),
        ("port: '8001'\n", "wrong type"),
        ("port: true\n", "wrong type"),
        ("upstream: {a: 1}\n", "address or a list"),
        ("expose_models: [1]\n", "model name or a list"),
        ("tenants: 3\n", "must be a path"),
    ],
)
def test_bad_router_files(text: str, match: str, tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        load_router_file(path)


def test_flags_win_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from phlora_nim.router import cli

    (tmp_path / "repo").mkdir()
    path = tmp_path / "router.yaml"
    path.write_text("model_repository: repo\nupstream_dns: triton:8001\nport: 9001\nhost: 0.0.0.0\n")
    seen: list[RouterConfig] = []

    async def fake_run(config: RouterConfig) -> None:  # capture instead of serving
        seen.append(config)

    monkeypatch.setattr(cli, "run_router", fake_run)
    cli.serve(config_file=path, upstream=["127.0.0.1:8101"], port=9002)
    [config] = seen
    assert config.upstreams == ("127.0.0.1:8101",) and config.upstream_dns is None
    assert config.port == 9002 and config.host == "0.0.0.0"
    with pytest.raises(InputError, match="router config not found"):
        cli.serve(config_file=tmp_path / "missing.yaml")


def test_a_taken_port_is_an_error_not_a_shared_port(tmp_path: Path) -> None:
    from phlora_nim.core.errors import OptionError
    from phlora_nim.router.server import RouterThread

    config = RouterConfig(model_repository=tmp_path, upstreams=("127.0.0.1:9",), port=0, metrics_port=0)
    with RouterThread(config) as first:
        taken = RouterConfig(
            model_repository=tmp_path, upstreams=("127.0.0.1:9",), port=first.router.port, metrics_port=0
        )
        with pytest.raises(OptionError, match="cannot listen"), RouterThread(taken):
            pass


def test_any_free_port_is_for_the_http_and_metrics_fronts_only(tmp_path: Path) -> None:
    from phlora_nim.core.errors import OptionError
    from phlora_nim.router.config import ANY_FREE_PORT

    config = RouterConfig(tmp_path, upstreams=("a:1",), http_port=ANY_FREE_PORT, metrics_port=ANY_FREE_PORT)
    assert config.http_port == config.metrics_port == ANY_FREE_PORT  # both on, neither "the same port"
    with pytest.raises(OptionError, match="--port: not a port number"):
        RouterConfig(tmp_path, upstreams=("a:1",), port=ANY_FREE_PORT)


@pytest.mark.parametrize(
    ("backend", "given", "expected"),
    [
        ("trtllm-cpu", None, "tensorrt_llm"),
        ("trtllm", None, "tensorrt_llm"),
        ("trtllm-legacy-cpu", None, "ensemble"),
        ("reference", None, "ensemble"),
        ("trtllm-cpu", "my_model", "my_model"),
        (None, None, None),  # no settings stored: RouterConfig's own default
    ],
)
def test_serve_forwards_to_the_repository_engines_model(
    tmp_path: Path, backend: str | None, given: str | None, expected: str | None
) -> None:
    from phlora_nim.repository.settings import RepositorySettings
    from phlora_nim.router.cli import _with_engine_model

    if backend is not None:
        RepositorySettings(backend=backend, base=str(tmp_path)).save(tmp_path)
    settings = {"model_repository": str(tmp_path)} | ({"upstream_model": given} if given else {})
    assert _with_engine_model(settings, tmp_path).get("upstream_model") == expected
