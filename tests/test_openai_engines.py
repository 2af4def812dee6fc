"""The OpenAI-speaking engines' facts (phlora_nim/engines/<engine>/openai.py) against their upstream sources.

Sources read (cited where each fact is checked):
- vllm-project/vllm 0.32: ``vllm/entrypoints/openai/models/serving.py`` (``OpenAIServingModels``:
  ``load_lora_adapter``, ``unload_lora_adapter``, ``_check_load_lora_adapter_request``,
  ``_check_unload_lora_adapter_request``, ``show_available_models``, the ``does not exist`` 404 of
  ``OpenAIModelRegistry``), ``vllm/entrypoints/serve/lora/api_router.py`` (``/v1/load_lora_adapter``,
  ``/v1/unload_lora_adapter``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``),
  ``vllm/entrypoints/serve/lora/protocol.py`` (``LoadLoRAAdapterRequest {lora_name, lora_path}``).
  Checked against the installed vLLM when ``.venv-vllm`` is set up.
- sgl-project/sglang: ``python/sglang/srt/entrypoints/http_server.py`` (``/load_lora_adapter`` and
  ``/unload_lora_adapter`` with ``LoadLoRAAdapterReqInput``, 400 on failure), ``docs/advanced_features/lora.md``
  (``model="<base>:<adapter>"``).
- NVIDIA/TensorRT-LLM: ``examples/serve/openai_completion_client_for_lora.py`` (``extra_body={"lora_request":
  {"lora_name", "lora_int_id", "lora_path"}}``, ``model`` = the base), ``tensorrt_llm/serve/openai_protocol.py``.
- NIM for LLMs 2.x docs: PEFT (``NIM_PEFT_SOURCE`` folders served under their names), ``/v1/health/ready``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from phlora_nim.engines.registry import ENGINES, engine

OPENAI_ENGINES = ("vllm", "nim", "sglang", "trtllm-serve")
REQUEST = {"model": "support", "prompt": "hi", "max_tokens": 4}


def test_every_openai_engine_has_its_facts() -> None:
    rows = [row for row in ENGINES if row.protocol == "openai"]
    assert sorted(row.name for row in rows) == sorted(OPENAI_ENGINES)
    for row in rows:
        facts = row.openai_facts()
        assert facts.ready_path.startswith("/") and facts.models_path == "/v1/models"
        assert row.adapter_form == "peft-folder" and not row.writes_repository


@pytest.mark.parametrize(
    ("name", "model", "extra"),
    [
        ("vllm", "support", None),  # vLLM: OpenAI model = the adapter's name
        ("nim", "support", None),  # NIM 2.x: the store folder's name
        ("sglang", "base-model:support", None),  # SGLang: <base>:<adapter>
        ("trtllm-serve", "base-model", {"lora_name": "support", "lora_int_id": 7, "lora_path": "/store/support"}),
    ],
)
def test_a_request_names_the_adapter_as_the_engine_takes_it(name: str, model: str, extra: dict | None) -> None:
    facts = engine(name).openai_facts()
    aimed = facts.aim(REQUEST, base="base-model", adapter="support", lora_id=7, path="/store/support")
    assert aimed["model"] == model
    assert aimed.get("lora_request") == extra
    assert {k: v for k, v in aimed.items() if k not in ("model", "lora_request")} == {"prompt": "hi", "max_tokens": 4}
    base = engine(name).openai_facts().aim(REQUEST, base="base-model", adapter=None, lora_id=0, path="")
    assert base["model"] == "base-model" and "lora_request" not in base


def test_load_endpoints_and_bodies() -> None:
    vllm, sglang = engine("vllm").openai_facts().loading, engine("sglang").openai_facts().loading
    assert vllm is not None and sglang is not None
    assert (vllm.load_path, vllm.unload_path) == ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
    assert (sglang.load_path, sglang.unload_path) == ("/load_lora_adapter", "/unload_lora_adapter")
    assert vllm.load_body("a", "/s/a") == {"lora_name": "a", "lora_path": "/s/a"} == sglang.load_body("a", "/s/a")
    assert vllm.unload_body("a") == {"lora_name": "a"}
    assert engine("nim").openai_facts().loading is None  # the watched NIM_PEFT_SOURCE store
    assert engine("trtllm-serve").openai_facts().loading is None  # the path travels in each request
    assert engine("nim").openai_facts().ready_path == "/v1/health/ready"


def test_residency_read_from_the_model_list() -> None:
    listing = {
        "data": [
            {"id": "base-model", "parent": None},
            {"id": "support", "parent": "base-model", "root": "/store/support"},
        ]
    }
    assert engine("vllm").openai_facts().resident_in(listing, "base-model") == {"support"}
    colon = {"data": [{"id": "base-model"}, {"id": "base-model:legal"}]}
    assert engine("sglang").openai_facts().resident_in(colon, "base-model") == {"legal"}
    assert engine("trtllm-serve").openai_facts().resident_in(listing, "base-model") == set()


def test_vllm_texts_say_what_the_router_reads_them_as() -> None:
    facts = engine("vllm").openai_facts()
    # OpenAIModelRegistry / OpenAIServingModels: a name neither base nor loaded → 404 "The model `x` does not exist."
    assert facts.is_not_resident(404, "The model `support` does not exist.")
    assert not facts.is_not_resident(400, "The model `support` does not exist.")
    assert not facts.is_not_resident(404, "something else")


def _vllm_source(relative: str) -> str:
    from phlora_nim.testing.vllm_check import VLLM_VENV

    found = sorted((VLLM_VENV / "lib").glob(f"python3*/site-packages/vllm/{relative}"))
    if not found:
        pytest.skip(f"vLLM is not installed in {VLLM_VENV} (tests/setup_vllm_env.sh)")
    return found[0].read_text()


def test_vllm_facts_match_the_installed_vllm_source() -> None:
    """Every vLLM text and path the router relies on, found in the vLLM the tests run."""
    facts = engine("vllm").openai_facts()
    loading = facts.loading
    assert loading is not None
    serving = _vllm_source("entrypoints/openai/models/serving.py")
    for text in (*loading.already_loaded, *loading.not_loaded, *facts.not_resident):
        assert text in serving, text
    router = _vllm_source("entrypoints/serve/lora/api_router.py")
    assert f'"{loading.load_path}"' in router and f'"{loading.unload_path}"' in router
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in router
    protocol = _vllm_source("entrypoints/serve/lora/protocol.py")
    assert f"{loading.name_field}: str" in protocol and f"{loading.path_field}: str" in protocol
    completion = _vllm_source("entrypoints/openai/completion/protocol.py")
    assert f"{facts.token_ids_field}:" in completion


def test_the_router_never_imports_torch() -> None:
    import subprocess

    code = (
        "import sys, phlora_nim.router.server, phlora_nim.router.openai.server;"
        "import phlora_nim.router.upstreams.openai_delivery, phlora_nim.router.cli;"
        "sys.exit('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
