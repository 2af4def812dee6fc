"""The Helm chart helm/phlora-nim, linted and rendered by real Helm (the helm-python-sdk wheel: Helm v4 as a
library, offline), every rendered object checked against Kubernetes' own schemas (kubernetes-validate), and
the invariants of the deployment asserted on the rendered objects.

Capabilities: ``helm_python.Chart.render`` builds its options from name, namespace, revision and the
install/upgrade flags only, while the library's ``helm_render`` also takes ``api_versions`` and
``kube_version`` (its strict options decoder rejects unknown keys, so their acceptance is real). The
ServiceMonitor tests, which need ``.Capabilities.APIVersions``, call ``helm_render`` through the SDK's own
``_native.call_string``; everything else uses the public API.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

CHART = Path(__file__).resolve().parents[1] / "helm" / "phlora-nim"
PROFILES = sorted(CHART.glob("profiles/*.yaml"))
RELEASE, NAMESPACE = "demo", "ml"
SERVICE_MONITOR = "monitoring.coreos.com/v1/ServiceMonitor"
PROMETHEUS_RULE = "monitoring.coreos.com/v1/PrometheusRule"
# Kinds whose schema is a CRD's, not Kubernetes'; they are checked by the assertions below instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "Job", "Pod"}

# Values sets beyond the profiles, each rendered, validated and checked like a profile.
EXTRA_CASES: dict[str, dict[str, Any]] = {
    "source-image": {"modelRepository": {"source": "image", "image": {"repository": "registry.example.com/store"}}},
    "source-url": {
        "modelRepository": {
            "source": "url",
            "url": {"location": "https://models.example.com/repository.tar.gz", "sha256": "ab" * 32},
        }
    },
    "router-grpc-only": {"router": {"http": {"enabled": False}}},
    "legacy-defaults": {"backend": "trtllm-legacy"},
    "trtllm-image-files": {
        "trtllm": {"upstreamFiles": {"source": "image", "image": {"repository": "registry.example.com/llmapi-files"}}}
    },
    "tls-and-tenants-secret": {
        "router": {
            "tls": {"existingSecret": "router-tls"},
            "tenants": {"existingSecret": "router-tenants"},
        },
        "tests": {"apiKeySecret": {"name": "tenant-key"}},
    },
    "tenants-inline-digests": {
        "router": {"tenants": {"config": {"tenants": [{"name": "support", "keys": ["sha256:" + "0" * 64]}]}}}
    },
    "mig-slices": {"server": {"gpu": {"resourceName": "nvidia.com/mig-1g.10gb", "count": 2}}},
    "server-hpa-custom-metric": {
        "server": {
            "autoscaling": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 3,
                "podsMetric": {"name": "nv_inference_pending_request_count", "averageValue": "16"},
            }
        }
    },
    "nim-with-network-policy": {
        "backend": "nim",
        "router": {"enabled": False},
        "nim": {"ngcApiKeySecret": {"name": "ngc-api"}},
        "networkPolicy": {"enabled": True, "clientsFrom": [{"podSelector": {"matchLabels": {"role": "client"}}}]},
    },
}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _profile(name: str) -> dict[str, Any]:
    return helm.values_from_yaml((CHART / "profiles" / f"{name}.yaml").read_text())


def _min_kube_version() -> str:
    """The lowest Kubernetes minor Chart.yaml's kubeVersion admits, e.g. ">=1.29.0-0" -> "1.29"."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    found = re.fullmatch(r">=\s*v?(\d+)\.(\d+)(\.\d+)?(-0)?", constraint)
    assert found, f"Chart.yaml kubeVersion {constraint!r}: expected a lower bound such as '>=1.29.0-0'"
    return f"{found[1]}.{found[2]}"


KUBE_VERSION = _min_kube_version()


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render(chart: helm.Chart, values: dict[str, Any] | None = None, *, api_versions: list[str] | None = None):
    """Rendered objects of the chart (offline, as `helm template`), with optional extra API versions."""
    if api_versions is None:
        return _objects(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE))
    options = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "kube_version": f"v{KUBE_VERSION}.0",
        "api_versions": api_versions,
    }
    rendered = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options))
    return _objects(json.loads(rendered))


CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    **{f"profile:{p.stem}": helm.values_from_yaml(p.read_text()) for p in PROFILES},
    **EXTRA_CASES,
}


@pytest.fixture(scope="module")
def rendered(chart: helm.Chart) -> dict[str, list[dict[str, Any]]]:
    """Every case rendered once, on a cluster that serves ServiceMonitor."""
    return {name: render(chart, values, api_versions=[SERVICE_MONITOR]) for name, values in CASES.items()}


def _one(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (component is None or _component(o) == component)]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def _component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


def _main_container(obj: dict[str, Any]) -> dict[str, Any]:
    return _pod_spec(obj)["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# Lint, schema, Kubernetes validity ------------------------------------------------------------------


def test_profiles_exist() -> None:
    assert {p.stem for p in PROFILES} >= {"tensorrtllm", "nim", "vllm", "conversion-job", "network-policy", "scale-out"}


@pytest.mark.parametrize("profile", [None, *PROFILES], ids=lambda p: p.stem if p else "defaults")
def test_lint_strict_is_clean(profile: Path | None) -> None:
    values = helm.values_from_yaml(profile.read_text()) if profile else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], problems


def test_packaged_chart_renders_the_same(chart: helm.Chart, tmp_path: Path) -> None:
    """`helm package` keeps the templates, schema, test script and profiles, and leaves the generator out."""
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        files = {f["name"] for f in packaged.files}
        assert {"files/release_check.py", "README.md", "profiles/tensorrtllm.yaml"} <= files
        assert "gen_values_table.py" not in files
        assert packaged.schema == json.loads((CHART / "values.schema.json").read_text())
        assert render(packaged) == render(chart)


def test_kube_version_is_one_kubernetes_validate_ships() -> None:
    shipped = {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()}
    assert KUBE_VERSION in shipped, f"kubernetes-validate has no schemas for {KUBE_VERSION} (has {sorted(shipped)})"


NEWEST_KUBE_VERSION = ".".join(kubernetes_validate.latest_version().split(".")[:2])


@pytest.mark.parametrize("kube_version", sorted({KUBE_VERSION, NEWEST_KUBE_VERSION}))
@pytest.mark.parametrize("case", list(CASES))
def test_every_object_is_valid_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], case: str, kube_version: str
) -> None:
    """Strict schemas (no unknown fields) of the oldest Kubernetes the chart admits and the newest shipped."""
    objects = rendered[case]
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{case} on {kube_version}: {obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}")


def test_schema_is_draft07_and_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = []

    def walk(node: Any, where: str) -> None:
        """The chart's own objects (properties + required keys) are closed; list items of Kubernetes
        or router file shapes (EnvVar, tenants) stay open for the component that reads them."""
        if where.endswith("/items"):
            return
        if isinstance(node, dict):
            if node.get("properties") and node.get("required") and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(schema, "#")
    assert open_objects == []
    for component in ("server", "router"):
        assert schema["properties"][component]["properties"]["replicas"]["minimum"] == 0


def test_values_table_in_readme_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_values_table", CHART / "gen_values_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.update_readme(CHART, check=True), "run: python helm/phlora-nim/gen_values_table.py"
    table = module.render_table(CHART)
    for key in ("server.gpu.resourceName", "router.autoscaling.enabled", "nim.peftRefreshInterval"):
        assert f"| `{key}` |" in table


# Bad values: the schema and the template guards -------------------------------------------------------


def _conversion(**fields: Any) -> dict[str, Any]:
    """Values of a complete conversion Job, with ``fields`` replaced."""
    conversion = {
        "enabled": True,
        "base": "/checkpoints/base",
        "rank": 8,
        "finetuned": [{"name": "a", "path": "/checkpoints/a"}],
        **fields,
    }
    return {"checkpoints": {"existingClaim": "ckpt"}, "conversion": conversion}


SCHEMA = helm.HelmValuesError
GUARD = helm.HelmRenderError
BAD_VALUES = [
    ({"routr": {"replicas": 2}}, SCHEMA, r"additional properties 'routr' not allowed"),
    ({"router": {"replicas": -1}}, SCHEMA, r"/router/replicas': minimum: got -1, want 0"),
    ({"server": {"replicas": -3}}, SCHEMA, r"/server/replicas': minimum: got -3, want 0"),
    ({"server": {"gpus": 1}}, SCHEMA, r"additional properties 'gpus' not allowed"),
    (
        {"backend": "sglang"},
        SCHEMA,
        r"/backend': value must be one of 'trtllm', 'trtllm-legacy', 'tensorrtllm', 'nim', 'vllm'",
    ),
    ({"vllm": {"maxLoraRank": 24}}, SCHEMA, r"/vllm/maxLoraRank': value must be one of"),
    ({"router": {"routingPolicy": "random"}}, SCHEMA, r"/router/routingPolicy': value must be one of"),
    ({"server": {"gpu": {"resourceName": "amd.com/gpu"}}}, SCHEMA, r"/server/gpu/resourceName': 'amd.com/gpu'"),
    ({"server": {"gpu": {"count": 0}}}, SCHEMA, r"/server/gpu/count': minimum: got 0, want 1"),
    ({"conversion": {"dtype": "fp8"}}, SCHEMA, r"/conversion/dtype': value must be one of"),
    ({"conversion": {"checkpoints": []}}, SCHEMA, r"additional properties 'checkpoints' not allowed"),
    ({"conversion": {"finetuned": [{"name": "a"}]}}, SCHEMA, r"/conversion/finetuned/0': missing property 'path'"),
    ({"conversion": {"energy": 1.5}}, SCHEMA, r"/conversion/energy': maximum"),
    ({"conversion": {"prefetchLimit": -1}}, SCHEMA, r"/conversion/prefetchLimit': minimum: got -1, want 0"),
    ({"conversion": {"parallelism": 0}}, SCHEMA, r"/conversion/parallelism': minimum: got 0, want 1"),
    ({"conversion": {"backoffLimit": 1}}, SCHEMA, r"additional properties 'backoffLimit' not allowed"),
    ({"conversion": {"prefetch": ["a", "a"]}}, SCHEMA, r"/conversion/prefetch'"),
    ({"modelRepository": {"source": "s3"}}, SCHEMA, r"/modelRepository/source': value must be one of"),
    ({"router": {"autoscaling": {"minReplicas": 0}}}, SCHEMA, r"/router/autoscaling/minReplicas': minimum"),
    ({"metrics": {"prometheusRule": {"errorRatio": 0}}}, SCHEMA, r"/metrics/prometheusRule/errorRatio'"),
    ({"metrics": {"prometheusRule": {"codes": ["OOPS"]}}}, SCHEMA, r"/metrics/prometheusRule/codes/0'"),
    ({"metrics": {"prometheusRule": {"window": "five"}}}, SCHEMA, r"/metrics/prometheusRule/window'"),
    ({"backend": "nim"}, GUARD, r"nim\.ngcApiKeySecret\.name"),
    ({"backend": "vllm"}, GUARD, r"set vllm\.model"),
    ({"backend": "vllm", "router": {"enabled": False}}, GUARD, r"backend=vllm needs the router"),
    (
        {"backend": "vllm", "vllm": {"model": "/checkpoints/base"}, "modelRepository": {"source": "url"}},
        GUARD,
        r"store must be one shared volume: set modelRepository\.source=pvc",
    ),
    (
        {"backend": "vllm", "vllm": {"model": "m"}, "modelRepository": {"pvc": {"accessModes": ["ReadWriteOnce"]}}},
        GUARD,
        r"accessModes must include ReadWriteMany",
    ),
    ({"backend": "nim", "router": {"enabled": False}}, GUARD, r"nim\.ngcApiKeySecret\.name"),
    ({"router": {"enabled": False}}, GUARD, r"backend=trtllm needs the router"),
    ({"backend": "tensorrtllm", "router": {"enabled": False}}, GUARD, r"backend=tensorrtllm needs the router"),
    ({"trtllm": {"upstreamFiles": {"source": "image"}}}, GUARD, r"trtllm\.upstreamFiles\.image\.repository"),
    ({"trtllm": {"maxLoras": 0}}, SCHEMA, r"/trtllm/maxLoras': minimum"),
    ({"modelRepository": {"source": "image"}}, GUARD, r"modelRepository\.image\.repository"),
    ({"modelRepository": {"source": "url"}}, GUARD, r"modelRepository\.url\.location"),
    (
        {"modelRepository": {"source": "url", "url": {"location": "http://example.com/r.tar.gz"}}},
        GUARD,
        r"only https:// URLs",
    ),
    ({"conversion": {"enabled": True}}, GUARD, r"set checkpoints\.existingClaim"),
    (_conversion(base=""), GUARD, r"set conversion\.base"),
    (_conversion(finetuned=[]), GUARD, r"list the fine-tunes to convert in conversion\.finetuned"),
    (_conversion(rank=None), GUARD, r"exactly one of conversion\.rank .* and conversion\.energy"),
    (_conversion(energy=0.9), GUARD, r"exactly one of conversion\.rank"),
    (_conversion(finetuned=[{"name": "a", "path": "/checkpoints/a"}] * 2), GUARD, r'adapter name "a" is listed twice'),
    (_conversion(base="/data/base"), GUARD, r"/data/base is not under checkpoints\.mountPath \(/checkpoints\)"),
    (
        {**_conversion(), "modelRepository": {"source": "image", "image": {"repository": "store"}}},
        GUARD,
        r"set modelRepository\.source=pvc",
    ),
    ({"router": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}, GUARD, r"above maxReplicas"),
    (
        {"server": {"autoscaling": {"enabled": True}}},
        GUARD,
        r"server\.autoscaling\.enabled: set targetCPUUtilizationPercentage or podsMetric\.name",
    ),
    (
        {"router": {"autoscaling": {"enabled": True, "podsMetric": {"name": "phlora_router_all_in_flight"}}}},
        GUARD,
        r"set podsMetric\.averageValue",
    ),
    (
        {"router": {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}}},
        GUARD,
        r"set router\.resources\.requests\.cpu",
    ),
    (
        {"router": {"tenants": {"config": {"tenants": [{"name": "team", "keys": ["hunter2"]}]}}}},
        GUARD,
        r'tenant "team" has a plain-text key',
    ),
    (
        {"router": {"tenants": {"existingSecret": "t", "config": {"tenants": [{"name": "x", "keys": []}]}}}},
        GUARD,
        r"set only one of existingSecret, existingConfigMap and config",
    ),
]


@pytest.mark.parametrize(("values", "error", "message"), BAD_VALUES, ids=lambda v: None)
def test_bad_values_fail_with_a_message(chart: helm.Chart, values: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        render(chart, values)


def test_schema_errors_come_from_validate_schema_too(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match=r"additional properties 'replica' not allowed"):
        chart.validate_schema({"router": {"replica": 2}})
    chart.validate_schema({"router": {"replicas": 0}})


# Invariants of the rendered objects ---------------------------------------------------------------------


def test_triton_requests_gpus_on_gpu_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    triton = _one(rendered["defaults"], "Deployment", "triton")
    spec, container = _pod_spec(triton), _main_container(triton)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container["command"] == ["tritonserver"]
    assert "--model-repository=/opt/llmapi" in container["args"]  # assembled by the llmapi-model init container
    legacy = _main_container(_one(rendered["legacy-defaults"], "Deployment", "triton"))
    assert "--model-repository=/models" in legacy["args"]
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory" and dshm["emptyDir"]["sizeLimit"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]

    mig = _main_container(_one(rendered["mig-slices"], "Deployment", "triton"))
    assert mig["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/mig-1g.10gb": 2}


def test_probes_on_health_endpoints(rendered: dict[str, list[dict[str, Any]]]) -> None:
    triton = _main_container(_one(rendered["defaults"], "Deployment", "triton"))
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 600
    # Readiness: the OpenAI API's /v1/health/ready (200 while a Triton replica is ready); without the
    # HTTP API grpc.health.v1 (SERVING then). Startup and liveness only check the port, so routers are
    # not restarted while Triton loads its engine.
    router = _main_container(_one(rendered["defaults"], "Deployment", "router"))
    assert router["readinessProbe"]["httpGet"] == {"path": "/v1/health/ready", "port": "http"}
    grpc_only = _main_container(_one(rendered["router-grpc-only"], "Deployment", "router"))
    assert grpc_only["readinessProbe"]["grpc"] == {"port": 8001, "service": ""}
    assert "http" not in {p["name"] for p in grpc_only["ports"]}
    for probe in ("startupProbe", "livenessProbe"):
        assert router[probe]["tcpSocket"] == {"port": "grpc"}
    nim = _main_container(_one(rendered["profile:nim"], "Deployment", "nim"))
    assert nim["readinessProbe"]["httpGet"] == {"path": "/v1/health/ready", "port": "http"}
    # TLS is the gRPC port's: the OpenAI API (plain HTTP, TLS terminated in front) still answers readiness.
    tls = _main_container(_one(rendered["tls-and-tenants-secret"], "Deployment", "router"))
    assert tls["readinessProbe"]["httpGet"] == {"path": "/v1/health/ready", "port": "http"}
    for case, objects in rendered.items():
        for obj in objects:
            if obj["kind"] == "Deployment":
                for container in _pod_spec(obj)["containers"]:
                    missing = {"startupProbe", "livenessProbe", "readinessProbe"} - set(container)
                    assert not missing, f"{case}: {obj['metadata']['name']}/{container['name']} lacks {missing}"


def test_router_resolves_the_headless_triton_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for case in ("defaults", "profile:tensorrtllm", "profile:scale-out"):
        objects = rendered[case]
        headless = _one(objects, "Service", "triton")
        assert headless["spec"]["clusterIP"] == "None"
        grpc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
        name = headless["metadata"]["name"]
        args = _main_container(_one(objects, "Deployment", "router"))["args"]
        upstream = [a.split("=", 1)[1] for a in args if a.startswith("--upstream-dns=")]
        assert upstream == [f"{name}.{NAMESPACE}.svc.cluster.local:{grpc_port['port']}"]
        assert headless["spec"]["selector"] == _one(objects, "Deployment", "triton")["spec"]["selector"]["matchLabels"]


def test_router_command_line_and_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    router = _main_container(_one(rendered["defaults"], "Deployment", "router"))
    assert router["command"] == ["phlora-nim"]
    assert router["args"][0] == "serve"
    flags = dict(a.removeprefix("--").split("=", 1) for a in router["args"][1:])
    assert flags == {
        "model-repository": "/models",
        "upstream-dns": flags["upstream-dns"],
        "dns-interval": "10",
        "upstream-model": "tensorrt_llm",
        "host": "0.0.0.0",
        "port": "8001",
        "metrics-port": "9090",
        "max-message-mb": "256",
        "workers": "1",
        "http-port": "8000",
    }
    service = _one(rendered["defaults"], "Service", "router")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c" and ports["grpc"]["port"] == 8001
    assert ports["metrics"]["port"] == 9090
    http = {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    assert ports["http"] == http
    grpc_only = _one(rendered["router-grpc-only"], "Service", "router")
    assert "http" not in {p["name"] for p in grpc_only["spec"]["ports"]}

    secured = _one(rendered["tls-and-tenants-secret"], "Deployment", "router")
    args = _main_container(secured)["args"]
    assert "--tls-cert=/etc/phlora-nim/tls/tls.crt" in args and "--tls-key=/etc/phlora-nim/tls/tls.key" in args
    assert "--tenants=/etc/phlora-nim/tenants/tenants.yaml" in args
    volumes = {v["name"]: v for v in _pod_spec(secured)["volumes"]}
    assert volumes["tenants"]["secret"] == {
        "secretName": "router-tenants",
        "items": [{"key": "tenants.yaml", "path": "tenants.yaml"}],
    }
    assert volumes["tls"]["secret"] == {"secretName": "router-tls"}

    inline = rendered["tenants-inline-digests"]
    config_map = next(o for o in inline if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-tenants"))
    assert yaml.safe_load(config_map["data"]["tenants.yaml"])["tenants"][0]["name"] == "support"
    annotations = _one(inline, "Deployment", "router")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/tenants" in annotations


def test_model_repository_is_mounted_read_only(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    claim = _one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for component in ("triton", "router"):
        deployment = _one(objects, "Deployment", component)
        volume = next(v for v in _pod_spec(deployment)["volumes"] if v["name"] == "model-repository")
        assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
        for container in _containers(deployment):
            if container["name"] == "phlora-nim-python":  # copies Python packages; no repository needed
                continue
            mount = next(m for m in container["volumeMounts"] if m["name"] == "model-repository")
            assert mount == {"name": "model-repository", "mountPath": "/models", "readOnly": True}
        wait = _pod_spec(deployment)["initContainers"][0]
        assert wait["name"] == "wait-for-registry" and "/models/phlora_registry.json" in wait["command"]

    existing = rendered["profile:tensorrtllm"]
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    volume = next(
        v for v in _pod_spec(_one(existing, "Deployment", "triton"))["volumes"] if v["name"] == "model-repository"
    )
    assert volume["persistentVolumeClaim"]["claimName"] == "phlora-model-repository"


def test_triton_mounts_the_engine_and_the_base_checkpoint(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """config.pbtxt points at the engine (--engine-dir) and the base's tokenizer (--base) by path."""
    triton = _one(rendered["profile:tensorrtllm"], "Deployment", "triton")
    volumes = {v["name"]: v for v in _pod_spec(triton)["volumes"]}
    mounts = {m["name"]: m for m in _main_container(triton)["volumeMounts"]}
    assert volumes["engine"]["persistentVolumeClaim"] == {"claimName": "trtllm-engines", "readOnly": True}
    assert mounts["engine"]["mountPath"] == "/engines/base" and mounts["engine"]["readOnly"] is True
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "model-checkpoints", "readOnly": True}
    assert mounts["checkpoints"] == {"name": "checkpoints", "mountPath": "/checkpoints", "readOnly": True}
    defaults = _one(rendered["legacy-defaults"], "Deployment", "triton")
    assert {v["name"] for v in _pod_spec(defaults)["volumes"]} == {
        "model-repository",
        "dshm",
        "scratch",
        "phlora-nim-python",
    }
    llmapi = _one(rendered["defaults"], "Deployment", "triton")
    assert {v["name"] for v in _pod_spec(llmapi)["volumes"]} == {"model-repository", "dshm", "scratch", "llmapi-model"}


def test_triton_gets_phlora_nim_python_packages(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Stock Triton images lack phlora_nim, which the legacy pre/postprocessing model.py files import."""
    triton = _one(rendered["legacy-defaults"], "Deployment", "triton")
    init = next(c for c in _pod_spec(triton)["initContainers"] if c["name"] == "phlora-nim-python")
    router = _main_container(_one(rendered["legacy-defaults"], "Deployment", "router"))
    assert init["image"] == router["image"]
    assert "phlora_nim" in init["command"][2] and init["command"][3] == "/opt/phlora-nim/python"
    main = _main_container(triton)
    assert {"name": "PYTHONPATH", "value": "/opt/phlora-nim/python"} in main["env"]
    mount = next(m for m in main["volumeMounts"] if m["name"] == "phlora-nim-python")
    assert mount["readOnly"] is True
    nim = _one(rendered["profile:nim"], "Deployment", "nim")
    assert not [c for c in _pod_spec(nim).get("initContainers", []) if c["name"] == "phlora-nim-python"]


@pytest.mark.parametrize("case", ["source-image", "source-url"])
def test_init_container_fills_the_repository(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    objects = rendered[case]
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    for component in ("triton", "router"):
        spec = _pod_spec(_one(objects, "Deployment", component))
        volume = next(v for v in spec["volumes"] if v["name"] == "model-repository")
        assert volume["emptyDir"]["sizeLimit"]
        fill = spec["initContainers"][0]
        assert fill["name"] == "fill-model-repository"
        assert {"name": "model-repository", "mountPath": "/models"} in fill["volumeMounts"]
        if case == "source-url":
            assert _env(fill)["REPOSITORY_SHA256"] == "ab" * 32
            compile(fill["command"][2], "fill-model-repository", "exec")
        else:
            assert fill["image"] == "registry.example.com/store:latest"
            assert fill["command"] == ["cp", "-R", "/model_repository/.", "/models/"]


def test_nim_backend_serves_the_same_store(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["nim-with-network-policy"]  # NIM alone, as before the router could front it
    assert not [o for o in objects if _component(o) in {"router", "triton"}]
    service = _one(objects, "Service", "nim")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["name"] == "http"
    objects = rendered["profile:nim"]
    nim = _one(objects, "Deployment", "nim")
    env = _env(_main_container(nim))
    assert env["NIM_PEFT_SOURCE"] == "/models/tensorrt_llm/adapters"
    assert env["NIM_PEFT_REFRESH_INTERVAL"] == "30"
    assert (env["NIM_MAX_GPU_LORAS"], env["NIM_MAX_CPU_LORAS"], env["NIM_MAX_LORA_RANK"]) == ("8", "32", "64")
    assert env["NGC_API_KEY"] == {"secretKeyRef": {"name": "ngc-api", "key": "NGC_API_KEY"}}
    assert _main_container(nim)["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("backend", ["nim", "vllm"])
def test_openai_backends_get_the_router_in_front(rendered: dict[str, list[dict[str, Any]]], backend: str) -> None:
    """NIM / vLLM pods behind a headless Service the router resolves; the store shared at one path."""
    objects = rendered[f"profile:{backend}"]
    headless = _one(objects, "Service", backend)
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["http"]
    pods = _one(objects, "Deployment", backend)
    assert headless["spec"]["selector"] == pods["spec"]["selector"]["matchLabels"]
    router = _main_container(_one(objects, "Deployment", "router"))
    flags = dict(a.removeprefix("--").split("=", 1) for a in router["args"][1:] if "=" in a)
    port = headless["spec"]["ports"][0]["port"]
    assert flags["engine"] == backend
    assert flags["upstream-dns"] == f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    assert flags["adapter-store"] == "/models/tensorrt_llm/adapters"
    assert flags["routing-policy"] == "adapter-aware"
    assert router["readinessProbe"]["httpGet"] == {"path": "/v1/health/ready", "port": "http"}
    server = _main_container(pods)
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert mounts["model-repository"] == "/models"  # the same path as the router's --adapter-store root
    assert {m["name"]: m["mountPath"] for m in router["volumeMounts"]}["model-repository"] == "/models"
    ready = "/health" if backend == "vllm" else "/v1/health/ready"
    assert server["readinessProbe"]["httpGet"] == {"path": ready, "port": "http"}


def test_vllm_pods_load_adapters_at_run_time(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["profile:vllm"]
    vllm = _main_container(_one(objects, "Deployment", "vllm"))
    assert vllm["command"] == ["vllm", "serve"] and vllm["args"][0] == "/checkpoints/base"
    assert {"--enable-lora", "--max-loras=8", "--max-cpu-loras=16", "--max-lora-rank=64"} <= set(vllm["args"])
    assert _env(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {m["name"] for m in vllm["volumeMounts"]} >= {"model-repository", "checkpoints"}


def test_no_secret_is_ever_rendered(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for case, objects in rendered.items():
        assert not [o for o in objects if o["kind"] == "Secret"], case


def test_every_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for case, objects in rendered.items():
        for obj in objects:
            if obj["kind"] not in WORKLOAD_KINDS:
                continue
            where = f"{case}: {obj['kind']} {obj['metadata']['name']}"
            spec = _pod_spec(obj)
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert spec["automountServiceAccountToken"] is False, where
            for container in _containers(obj):
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, f"{where}/{container['name']}"
                assert context["capabilities"] == {"drop": ["ALL"]}, f"{where}/{container['name']}"
                assert context["runAsNonRoot"] is True, f"{where}/{container['name']}"
                assert context["seccompProfile"] == {"type": "RuntimeDefault"}, f"{where}/{container['name']}"
                assert context["readOnlyRootFilesystem"] is True, f"{where}/{container['name']}"
            seen.add(_component(obj))
    assert seen >= {"triton", "nim", "router", "conversion", "test"}


def test_store_readers_share_the_writer_identity(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The converter writes owner-only files (mkstemp/mkdtemp): the Job, Triton and router share one uid."""
    objects = rendered["profile:conversion-job"]
    identities = {
        component: {k: v for k, v in _pod_spec(obj)["securityContext"].items() if k in {"runAsUser", "runAsGroup"}}
        for component in ("conversion", "triton", "router")
        for obj in objects
        if obj["kind"] in WORKLOAD_KINDS and _component(obj) == component
    }
    assert len(identities) == 3 and len({json.dumps(i, sort_keys=True) for i in identities.values()}) == 1


def test_writable_paths_of_triton_and_nim_are_empty_dirs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for case, component, paths in (
        ("defaults", "triton", {"/tmp", "/dev/shm"}),
        ("profile:nim", "nim", {"/tmp", "/dev/shm", "/opt/nim/.cache", "/opt/nim/workspace"}),
    ):
        deployment = _one(rendered[case], "Deployment", component)
        volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in _main_container(deployment)["volumeMounts"]}
        assert paths <= set(mounts)
        for path in paths - {"/opt/nim/.cache"}:
            assert "emptyDir" in volumes[mounts[path]], (case, path)
    nim_cache = next(
        v for v in _pod_spec(_one(rendered["profile:nim"], "Deployment", "nim"))["volumes"] if v["name"] == "nim-cache"
    )
    assert nim_cache["persistentVolumeClaim"] == {"claimName": "nim-cache"}


def test_service_monitor_only_when_the_cluster_serves_it(
    chart: helm.Chart, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    assert not [o for o in render(chart) if o["kind"] == "ServiceMonitor"]
    assert not [o for o in render(chart, api_versions=[]) if o["kind"] == "ServiceMonitor"]
    monitors = {_component(o): o for o in rendered["defaults"] if o["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"triton", "router"}
    assert monitors["triton"]["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitors["triton"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors["router"]["spec"]["endpoints"][0] == {"port": "metrics", "path": "/metrics", "interval": "30s"}
    nim = {_component(o): o for o in rendered["profile:nim"] if o["kind"] == "ServiceMonitor"}
    assert nim["nim"]["spec"]["endpoints"][0]["path"] == "/v1/metrics"
    assert nim["router"]["spec"]["endpoints"][0]["path"] == "/metrics"
    vllm = {_component(o): o for o in rendered["profile:vllm"] if o["kind"] == "ServiceMonitor"}
    assert vllm["vllm"]["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "30s"}
    off = render(chart, {"metrics": {"serviceMonitor": {"enabled": False}}}, api_versions=[SERVICE_MONITOR])
    assert not [o for o in off if o["kind"] == "ServiceMonitor"]


def test_prometheus_rule_alerts_on_what_clients_see(chart: helm.Chart) -> None:
    """Off by default; on, only where the cluster serves PrometheusRule, alerting on the router's
    client-visible error ratio and never on Triton's failure counter (which counts cache misses)."""
    on = {"metrics": {"prometheusRule": {"enabled": True}}}
    both = [SERVICE_MONITOR, PROMETHEUS_RULE]
    assert not [o for o in render(chart, api_versions=both) if o["kind"] == "PrometheusRule"]
    assert not [o for o in render(chart, on, api_versions=[SERVICE_MONITOR]) if o["kind"] == "PrometheusRule"]
    rule = _one(render(chart, on, api_versions=both), "PrometheusRule", "router")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["namespace"] == NAMESPACE
    (alert,) = rule["spec"]["groups"][0]["rules"]
    expr = alert["expr"]
    assert "nv_inference" not in expr
    selector = f'namespace="{NAMESPACE}", job="{RELEASE}-phlora-nim-router"'
    assert (
        f'sum(rate(phlora_router_all_errors_total{{{selector}, code=~"UNAVAILABLE|INTERNAL|UNKNOWN|DEADLINE_EXCEEDED|'
        f'FAILED_PRECONDITION|DATA_LOSS"}}[5m]))' in expr
    )
    assert f"/ sum(rate(phlora_router_all_requests_total{{{selector}}}[5m]))" in expr and expr.endswith("> 0.05")
    assert alert["for"] == "10m" and alert["labels"] == {"severity": "warning"}
    # the job label is the router Service's name (what the router's ServiceMonitor scrapes)
    service = _one(render(chart), "Service", "router")
    assert service["metadata"]["name"] == f"{RELEASE}-phlora-nim-router"
    tuned = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "errorRatio": 0.01,
                "window": "15m",
                "for": "1h",
                "codes": ["UNAVAILABLE"],
                "severity": "page",
                "labels": {"release": "kube-prometheus"},
            }
        }
    }
    rule = _one(render(chart, tuned, api_versions=both), "PrometheusRule", "router")
    (alert,) = rule["spec"]["groups"][0]["rules"]
    assert 'code=~"UNAVAILABLE"}[15m]' in alert["expr"] and alert["expr"].endswith("> 0.01")
    assert alert["for"] == "1h" and alert["labels"] == {"severity": "page"}
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    nim = helm.values_from_yaml((CHART / "profiles" / "nim.yaml").read_text())
    nim["metrics"] = on["metrics"]
    nim["router"] = {"enabled": False}
    assert not [o for o in render(chart, nim, api_versions=both) if o["kind"] == "PrometheusRule"]  # no router


def test_network_policies_only_when_enabled(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for case in ("defaults", "profile:tensorrtllm", "profile:scale-out"):
        assert not [o for o in rendered[case] if o["kind"] == "NetworkPolicy"], case
    objects = rendered["profile:network-policy"]
    policies = {
        p["metadata"]["name"].removeprefix(f"{RELEASE}-phlora-nim-"): p for p in objects if p["kind"] == "NetworkPolicy"
    }
    assert set(policies) == {"triton", "router", "no-ingress"}
    router_labels = _one(objects, "Deployment", "router")["spec"]["selector"]["matchLabels"]
    (grpc_rule, metrics_rule) = policies["triton"]["spec"]["ingress"]
    assert grpc_rule == {
        "ports": [{"port": "grpc", "protocol": "TCP"}],
        "from": [{"podSelector": {"matchLabels": router_labels}}],
    }
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    router_rule = policies["router"]["spec"]["ingress"][0]
    assert router_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}} in router_rule["from"]
    test_peer = {"podSelector": {"matchLabels": {**router_labels, "app.kubernetes.io/component": "test"}}}
    assert test_peer in router_rule["from"], "helm test pods must still reach the router"
    assert "ingress" not in policies["no-ingress"]["spec"]
    nim_policy = _one(rendered["nim-with-network-policy"], "NetworkPolicy", "nim")
    assert nim_policy["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_disruption_budgets_and_autoscaling(rendered: dict[str, list[dict[str, Any]]]) -> None:
    budgets = {_component(o): o for o in rendered["defaults"] if o["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"triton", "router"}
    assert budgets["router"]["spec"]["maxUnavailable"] == 1
    assert not [o for o in rendered["defaults"] if o["kind"] == "HorizontalPodAutoscaler"]

    objects = rendered["profile:scale-out"]
    assert _one(objects, "Deployment", "triton")["spec"]["replicas"] == 3
    router = _one(objects, "Deployment", "router")
    assert "replicas" not in router["spec"], "the HPA owns the router's replica count"
    hpa = _one(objects, "HorizontalPodAutoscaler", "router")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": router["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "phlora_router_all_in_flight"

    server_hpa = _one(rendered["server-hpa-custom-metric"], "HorizontalPodAutoscaler", "triton")
    assert [m["type"] for m in server_hpa["spec"]["metrics"]] == ["Pods"]


def test_conversion_job(chart: helm.Chart, rendered: dict[str, list[dict[str, Any]]]) -> None:
    for case in ("defaults", "profile:tensorrtllm"):
        assert not [o for o in rendered[case] if o["kind"] == "Job"]
    job = _one(rendered["profile:conversion-job"], "Job", "conversion")
    container = _main_container(job)
    assert container["command"] == ["phlora-nim"]
    assert container["args"] == [
        "convert",
        "--base=/checkpoints/llama-3.1-8b",
        "--finetuned=/checkpoints/support-bot",
        "--name=support-bot",
        "--finetuned=/checkpoints/legal-summaries",
        "--name=legal-summaries",
        "--model-repository=/models",
        "--served-path=/models",  # Triton mounts the volume there too; the Job checks it is real
        "--check-served-path",
        "--backend=trtllm-legacy",
        "--rank=64",
        "--index=$(JOB_COMPLETION_INDEX)",
        "--engine-dtype=bfloat16",
        "--device=cuda",
        "--engine-dir=/engines/base",
        "--engine-config=/engines/base/config.json",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # One pod per fine-tune (an Indexed Job), each retried alone; the index comes from Kubernetes.
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 2 and job["spec"]["parallelism"] == 2  # capped at the fine-tunes
    assert job["spec"]["backoffLimitPerIndex"] == 1 and "backoffLimit" not in job["spec"]
    assert "maxFailedIndexes" not in job["spec"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    spec = _pod_spec(job)
    assert spec["restartPolicy"] == "Never" and spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "finetuned-checkpoints", "readOnly": True}
    claim = _one(rendered["profile:conversion-job"], "PersistentVolumeClaim")
    assert volumes["model-repository"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "readOnly" not in mounts["model-repository"], "the Job writes the store"
    # The path the Job checks (--served-path) is where Triton mounts the repository.
    triton = _main_container(_one(rendered["profile:conversion-job"], "Deployment", "triton"))
    served = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}["model-repository"]
    assert f"--served-path={served}" in container["args"] and served == mounts["model-repository"]["mountPath"]
    assert mounts["engine"] == {
        "name": "engine",
        "mountPath": "/engines/base",
        "subPath": "llama-3.1-8b-bf16-lora",
        "readOnly": True,
    }

    # Job specs are immutable: other settings make another Job, the same settings the same one.
    values = _profile("conversion-job")
    grown = _deep_merge(values, {})
    grown["conversion"]["finetuned"].append({"name": "new-bot", "path": "/checkpoints/new-bot"})
    by_energy = _deep_merge(values, {"conversion": {"rank": None, "energy": 0.95}})
    names = {
        label: _one(render(chart, v), "Job")["metadata"]["name"]
        for label, v in {"same": values, "grown": grown, "energy": by_energy}.items()
    }
    assert names["same"] == job["metadata"]["name"]
    assert len(set(names.values())) == 3 and all(len(n) <= 63 for n in names.values())
    assert "--energy=0.95" in _main_container(_one(render(chart, by_energy), "Job"))["args"]
    wide = _deep_merge(grown, {"conversion": {"parallelism": 2, "backoffLimitPerIndex": 3, "maxFailedIndexes": 1}})
    wide_job = _one(render(chart, wide), "Job")
    kubernetes_validate.validate(wide_job, KUBE_VERSION, strict=True)
    assert {
        k: wide_job["spec"][k] for k in ("completions", "parallelism", "backoffLimitPerIndex", "maxFailedIndexes")
    } == {
        "completions": 3,
        "parallelism": 2,
        "backoffLimitPerIndex": 3,
        "maxFailedIndexes": 1,
    }
    capped = _deep_merge(values, {"conversion": {"prefetch": ["support-bot"], "prefetchLimit": 4}})
    args = _main_container(_one(render(chart, capped), "Job"))["args"]
    assert args[args.index("--prefetch=support-bot") :][:2] == ["--prefetch=support-bot", "--prefetch-limit=4"]


def _cli_options(command: str) -> set[str] | None:
    """Option names of ``phlora-nim <command>`` as the CLI defines them (None: no such command)."""
    from typer.main import get_command

    from phlora_nim.cli.main import app

    found = get_command(app).commands.get(command)
    return None if found is None else {name for param in found.params for name in param.opts}


@pytest.mark.parametrize(
    ("command", "case", "component"),
    [("convert", "profile:conversion-job", "conversion"), ("serve", "tls-and-tenants-secret", "router")],
)
def test_every_flag_the_chart_passes_is_one_the_cli_has(
    rendered: dict[str, list[dict[str, Any]]], command: str, case: str, component: str
) -> None:
    options = _cli_options(command)
    assert options is not None, f"the chart runs 'phlora-nim {command}', which is not a command of the CLI"
    workload = next(o for o in rendered[case] if o["kind"] in WORKLOAD_KINDS and _component(o) == component)
    container = _main_container(workload)
    assert container["command"] == ["phlora-nim"] and container["args"][0] == command
    flags = {arg.split("=", 1)[0] for arg in container["args"][1:]}
    assert flags <= options, f"phlora-nim {command} has no {sorted(flags - options)}"


def test_helm_test_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["profile:tensorrtllm"]
    pods = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}
    assert set(pods) == {f"{RELEASE}-phlora-nim-test-health", f"{RELEASE}-phlora-nim-test-infer"}
    router = _one(objects, "Service", "router")["metadata"]["name"]
    for pod in pods.values():
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert _env(_main_container(pod))["TARGET"] == f"{router}:8001"
        assert _main_container(pod)["image"] == "registry.example.com/ml/phlora-nim:0.1.0"
    infer = _main_container(pods[f"{RELEASE}-phlora-nim-test-infer"])
    assert infer["command"][-1] == "infer" and _env(infer)["MODEL"] == "support-bot"
    assert _main_container(pods[f"{RELEASE}-phlora-nim-test-health"])["command"][-1] == "health"
    script = next(o for o in objects if o["kind"] == "ConfigMap" and _component(o) == "test")
    assert script["metadata"]["annotations"]["helm.sh/hook"] == "test"
    compile(script["data"]["release_check.py"], "release_check.py", "exec")

    defaults = {o["metadata"]["name"]: o for o in rendered["defaults"] if o["kind"] == "Pod"}
    assert _env(_main_container(defaults[f"{RELEASE}-phlora-nim-test-infer"]))["MODEL"] == "tensorrt_llm"
    assert _env(_main_container(defaults[f"{RELEASE}-phlora-nim-test-infer"]))["ENGINE_INPUTS"] == "llmapi"
    legacy = {o["metadata"]["name"]: o for o in rendered["legacy-defaults"] if o["kind"] == "Pod"}
    assert _env(_main_container(legacy[f"{RELEASE}-phlora-nim-test-infer"]))["MODEL"] == "ensemble"
    secured = {o["metadata"]["name"]: o for o in rendered["tls-and-tenants-secret"] if o["kind"] == "Pod"}
    env = _env(_main_container(secured[f"{RELEASE}-phlora-nim-test-infer"]))
    assert env["CA_FILE"] == "/etc/phlora-nim/tls/ca.crt"
    assert env["API_KEY"] == {"secretKeyRef": {"name": "tenant-key", "key": "api-key"}}
    nim = [o for o in rendered["nim-with-network-policy"] if o["kind"] == "Pod"]  # NIM alone: its own API
    assert [_main_container(p)["command"][-1] for p in nim] == ["nim"]
    fronted = [o for o in rendered["profile:vllm"] if o["kind"] == "Pod"]  # behind the router: the router's
    assert sorted(_main_container(p)["command"][-1] for p in fronted) == ["health", "infer"]


def test_standard_labels_and_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for case, objects in rendered.items():
        for obj in objects:
            labels = obj["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "phlora-nim", (case, obj["kind"])
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["app.kubernetes.io/version"] == "0.1.0"
            assert labels["helm.sh/chart"] == "phlora-nim-0.1.0"
            assert labels["app.kubernetes.io/component"]
            assert obj["metadata"]["namespace"] == NAMESPACE
            assert len(obj["metadata"]["name"]) <= 63


def test_pinned_api_versions(rendered: dict[str, list[dict[str, Any]]]) -> None:
    expected = {
        "Deployment": "apps/v1",
        "Service": "v1",
        "ServiceAccount": "v1",
        "ConfigMap": "v1",
        "PersistentVolumeClaim": "v1",
        "Pod": "v1",
        "Job": "batch/v1",
        "PodDisruptionBudget": "policy/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
        "NetworkPolicy": "networking.k8s.io/v1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
    }
    kinds = {(o["kind"], o["apiVersion"]) for objects in rendered.values() for o in objects}
    assert kinds == set(expected.items())


def test_trtllm_engine_mode(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The default: TensorRT-LLM's llmapi model, its repository assembled from the volume and NVIDIA's files
    of the serving image's release, the adapter store read at the same path in every pod, the conversion
    Job writing model.yaml from values, the router naming adapters by path."""
    objects = rendered["profile:trtllm"]
    triton = _one(objects, "Deployment", "triton")
    main, spec = _main_container(triton), _pod_spec(triton)
    assert main["image"] == "nvcr.io/nvidia/tritonserver:26.09-trtllm-python-py3"
    assert "--model-repository=/opt/llmapi" in main["args"]
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["model-repository"] == {"name": "model-repository", "mountPath": "/models", "readOnly": True}
    assert mounts["checkpoints"]["mountPath"] == "/checkpoints"
    assert not any(e["name"] == "PYTHONPATH" for e in main["env"]), "NVIDIA's model.py needs no phlora_nim"
    init = next(c for c in spec["initContainers"] if c["name"] == "llmapi-model")
    assert init["image"] == main["image"], "model.py / helpers.py come from the serving image's TensorRT-LLM release"
    script = init["command"][2]
    assert "version('tensorrt_llm')" in script and 'git clone --depth 1 --branch "v$version"' in script
    assert "triton_backend/all_models/llmapi/tensorrt_llm/1/helpers.py" in script
    assert _env(init)["UPSTREAM_REPO"] == "https://github.com/NVIDIA/TensorRT-LLM.git"
    assert {m["name"] for m in init["volumeMounts"]} >= {"model-repository", "llmapi-model"}
    claim = _one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    job = _main_container(_one(objects, "Job", "conversion"))
    assert job["args"] == [
        "convert",
        "--base=/checkpoints/llama-3.1-8b",
        "--finetuned=/checkpoints/support-bot",
        "--name=support-bot",
        "--finetuned=/checkpoints/legal-summaries",
        "--name=legal-summaries",
        "--model-repository=/models",
        "--backend=trtllm",
        "--served-path=/models",  # lora_path: where every Triton pod mounts the store
        "--served-base=/checkpoints/llama-3.1-8b",
        "--model-yaml=/etc/phlora-nim/llmapi/model.yaml",
        "--max-loras=8",
        "--max-cpu-loras=64",
        "--tp=1",
        "--pp=1",
        "--rank=64",
        "--device=cuda",
    ]
    config = _one(objects, "ConfigMap", "conversion")
    model = yaml.safe_load(config["data"]["model.yaml"])
    assert model["model"] == "/checkpoints/llama-3.1-8b" and model["backend"] == "pytorch"
    assert model["kv_cache_config"] == {"free_gpu_memory_fraction": 0.8}

    router = _main_container(_one(objects, "Deployment", "router"))
    assert "--upstream-model=tensorrt_llm" in router["args"]

    from_image = _one(rendered["trtllm-image-files"], "Deployment", "triton")
    init = next(c for c in _pod_spec(from_image)["initContainers"] if c["name"] == "llmapi-model")
    assert init["image"] == "registry.example.com/llmapi-files:latest"
    assert "git clone" not in init["command"][2] and '"$UPSTREAM_DIR/helpers.py"' in init["command"][2]
