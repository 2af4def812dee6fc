"""``serve --config router.yaml``: every option in a file, flags win, bad files get one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phlora_nim.core.errors import InputError, OptionError
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


ADDRESS = "HOST:PORT, e.g. triton-0:8001"
EVERY_FIELD = "adapter_store, attempt_timeout, dns_interval, engine, "  # the start of the list of fields

# (file text, field path as the error names it (None: the file itself), problem, expected (its start), found)
BAD_FILES: list[tuple[str, str | None, str, str | None, str | None]] = [
    # the document
    ("- a\n- b\n", None, "router config must be a mapping", None, "list"),
    ("port: [1\n", None, "unreadable router config", "a YAML mapping", None),
    ("a: 1\n---\nb: 2\n", None, "unreadable router config", "a YAML mapping", None),
    ("!!python/object/apply:os.system [ls]\n", None, "unreadable router config", "a YAML mapping", None),
    # unknown and repeated keys
    ("prot: 8001\n", "prot", "unknown router setting", EVERY_FIELD, None),
    ("attempt-timout: 3\n", "attempt-timout", "unknown router setting", EVERY_FIELD, None),
    ("port: 1\nport: 2\n", "port", "setting given twice", "each setting once", "'port' on line 1 and 'port' on line 2"),
    (
        "upstream: a:1\nupstreams: [b:1]\n",
        "upstreams",
        "setting given twice",
        "each setting once",
        "'upstream' on line 1 and 'upstreams' on line 2",
    ),
    (
        "attempt-timeout: 3\nattempt_timeout: 4\n",
        "attempt_timeout",
        "setting given twice",
        "each setting once",
        "'attempt-timeout' on line 1 and 'attempt_timeout' on line 2",
    ),
    # wrong types
    ("port: '8001'\n", "port", "wrong type", "a port number 0–65535", "str '8001'"),
    ("port: true\n", "port", "wrong type", "a port number", "bool True"),
    ("workers: 2.0\n", "workers", "wrong type", "1–64 processes", "float 2.0"),
    ("dns-interval: fast\n", "dns-interval", "wrong type", "a positive number of seconds", "str 'fast'"),
    ("reuse_port: 1\n", "reuse_port", "wrong type", "true or false", "int 1"),
    ("upstream: {a: 1}\n", "upstream", "wrong type", "an address or a list of them", "dict {'a': 1}"),
    ("expose_models: [1]\n", "expose_models[0]", "wrong type", "a model name or a list of them", "int 1"),
    ("tenants: 3\n", "tenants", "wrong type", "a path", "int 3"),
    ("host: [a, b]\n", "host", "wrong type", "a host name or address", "list ['a', 'b']"),
    # out of range
    ("port: 70000\n", "port", "not a port number", "a port number 0–65535", "70000"),
    ("port: -1\n", "port", "not a port number", "a port number 0–65535", "-1"),  # any free port: not for gRPC
    ("metrics-port: -2\n", "metrics-port", "not a port number", "a port number 0–65535 (0: off; -1", "-2"),
    ("health-interval: 0\n", "health-interval", "must be positive", "a positive number of seconds", "0"),
    ("max_message_mb: -5\n", "max_message_mb", "must be positive", "a positive whole number of MiB", "-5"),
    ("spill_factor: -0.5\n", "spill_factor", "must be ≥ 0", "a number ≥ 0", "-0.5"),
    ("workers: 65\n", "workers", "must be ≤ 64", "1–64 processes", "65"),
    ("max_choices: 0\n", "max_choices", "must be ≥ 1", "a whole number ≥ 1", "0"),
    ("residency_capacity: 0\n", "residency_capacity", "must be ≥ 1", "a whole number ≥ 1", "0"),
    ("grace: -1\n", "grace", "must be ≥ 0", "a number of seconds ≥ 0", "-1"),
    ("max_loras: -1\n", "max_loras", "must be ≥ 0", "a whole number ≥ 0", "-1"),
    ("served_model_name: ''\n", "served_model_name", "must not be empty", "a non-empty name", "''"),
    ("llm-model: ''\n", "llm-model", "must not be empty", "a non-empty name", "''"),
    ("expose-model: ['']\n", "expose-model[0]", "must not be empty", "a model name or a list of them", "''"),
    # addresses, names of things
    ("upstream: [a:1, triton]\n", "upstream[1]", "not a host:port address", ADDRESS, "'triton'"),
    ("upstream: triton:99999\n", "upstream[0]", "not a host:port address", ADDRESS, "'triton:99999'"),
    ("upstream: ['ftp://a:1']\n", "upstream[0]", "not an http:// or https:// URL", ADDRESS, "'ftp://a:1'"),
    ("upstream: [a:1, b:2, a:1]\n", "upstream", "'a:1' is listed twice", "each replica once", "['a:1', 'b:2', 'a:1']"),
    ("upstream_dns: triton\n", "upstream_dns", "not a host:port address", ADDRESS, "'triton'"),
    ("engine: tensorrt\n", "engine", "unknown engine", "trtllm or ", "'tensorrt'"),
    (
        "routing-policy: random\n",
        "routing-policy",
        "unknown routing policy",
        "adapter-aware or round-robin",
        "'random'",
    ),
]


@pytest.mark.parametrize(("text", "path", "problem", "expected", "found"), BAD_FILES)
def test_each_bad_router_file_names_the_field(
    text: str, path: str | None, problem: str, expected: str | None, found: str | None, tmp_path: Path
) -> None:
    file = tmp_path / "router.yaml"
    file.write_text(text)
    with pytest.raises(InputError) as info:
        load_router_file(file)
    error = info.value
    assert error.where == (str(file) if path is None else f"{file}: {path}")
    assert error.problem.startswith(problem)
    assert (error.expected is None) if expected is None else (error.expected or "").startswith(expected)
    assert error.found == found or (found is None and path is None)  # unreadable YAML: the parser says where
    assert error.fix or path is None


def test_every_problem_of_a_file_is_listed_at_once(tmp_path: Path) -> None:
    file = tmp_path / "router.yaml"
    file.write_text("prot: 1\nport: x\nport: 2\nupstream: [a:1, b]\nworkers: 0\n")
    with pytest.raises(InputError, match=r"\(5 problems\)") as info:
        load_router_file(file)
    text = str(info.value)
    for where in ("prot: unknown", "port: setting given twice", "port: wrong type", "upstream[1]: not a host:port"):
        assert f"{file}: {where}" in text
    assert f"{file}: workers: must be ≥ 1" in text


# (options, what the error names, problem)
BAD_OPTIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"upstreams": ("a:1", "a:1")}, "--upstream", "'a:1' is listed twice"),
    ({"upstreams": ("http://a:1",)}, "--upstream", "a Triton replica is reached over gRPC, not at a URL"),
    ({"upstreams": ("a:1",), "workers": 0}, "--workers", "must be ≥ 1"),
    ({"upstreams": ("a:1",), "max_loras": -1}, "max_loras", "must be ≥ 0"),  # a file-only setting: its name
    ({"upstreams": ("a:1",), "residency_capacity": 0}, "residency_capacity", "must be ≥ 1"),
    ({"upstreams": ("a:1",), "http_port": 8001}, "--http-port", "must differ from --port and --metrics-port"),
    ({"upstreams": ("a:1",), "engine": "tensorrt"}, "--engine", "unknown engine"),
    ({"upstreams": ("a:1",), "served_model_name": ""}, "--served-model-name", "must not be empty"),
    ({"upstreams": ("a:1",), "expose_models": ("x", "")}, "--expose-model", "must not be empty"),
    ({"upstreams": ("a:1",), "routing_policy": "random"}, "--routing-policy", "unknown routing policy"),
    ({"upstreams": ("a:1",), "dns_interval": "soon"}, "--dns-interval", "wrong type"),
]


@pytest.mark.parametrize(("options", "where", "problem"), BAD_OPTIONS)
def test_each_bad_option_names_its_flag(options: dict[str, Any], where: str, problem: str, tmp_path: Path) -> None:
    with pytest.raises(OptionError) as info:
        RouterConfig(tmp_path, **options)
    assert (info.value.where, info.value.problem) == (where, problem)


def test_options_are_kept_as_checked(tmp_path: Path) -> None:
    """A ``str`` path becomes a Path, a list a tuple, an int a float: the config holds its declared types."""
    config = RouterConfig(str(tmp_path), upstreams=["http://a:1/"], engine="vllm", grace=3)  # type: ignore[arg-type]
    assert config.model_repository == tmp_path and config.upstreams == ("http://a:1/",)
    assert isinstance(config.grace, float)
    assert RouterConfig(tmp_path, upstreams="a:1").upstreams == ("a:1",)  # type: ignore[arg-type]


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
