"""The engines phlora-nim writes adapters for and routes requests to: one row each, one table.

Everything else asks this table (``engine("trtllm")``) instead of comparing engine names as
strings; what an engine needs besides its row (writers, deploy files, router transport, CPU
reference) lives in its own package beside this module, ``phlora_nim.engines.<package>``.
Facts here come from the upstream sources named in each package's docstring (and in
``tests/test_engine_registry.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from phlora_nim.core.errors import OptionError

if TYPE_CHECKING:
    from phlora_nim.engines.openai_api import OpenAIEngineFacts

# How a replica of the engine is reached: Triton's KServe v2 API (a model repository) or the OpenAI API.
Protocol = Literal["triton", "openai"]
# What a request names an adapter by / what the engine reads from disk.
AdapterForm = Literal["peft-folder", "trtllm-npy"]


@dataclass(frozen=True)
class Engine:
    """One engine target.

    Attributes:
        name: the ``--backend`` value.
        package: the package under ``phlora_nim.engines`` holding the engine's code.
        protocol: how the router talks to a replica.
        adapter_form: what the engine reads for an adapter.
        versions: which releases serve it (for ``--help`` and the README's engine table).
        summary: one line for ``--help``.
        cpu_reference: the engine is phlora-nim's own CPU reference of another (runs here, no GPU).
        aliases: earlier names still accepted (repositories written before keep them in their settings).
        lora_ranks: the only ranks the engine's largest-rank setting accepts (``--snap-ranks`` rounds
            adapter ranks up to one of them); empty: any rank.
        writes_repository: ``convert --backend`` writes a repository for it (Triton engines). OpenAI-speaking
            engines read the adapter store every repository holds, and ``phlora-nim serve --engine`` fronts them.
        triton_releases: the Triton backend releases whose config.pbtxt input names the engine's
            repository can be written for (``--trtllm-version``), the default first.
        triton_model: the Triton model of the engine's repository the router forwards requests to.
    """

    name: str
    package: str
    protocol: Protocol
    adapter_form: AdapterForm
    versions: str
    summary: str
    cpu_reference: bool = False
    aliases: tuple[str, ...] = field(default=())
    triton_releases: tuple[str, ...] = field(default=())
    triton_model: str = "ensemble"
    writes_repository: bool = True
    lora_ranks: tuple[int, ...] = field(default=())

    def module(self, name: str) -> ModuleType:
        """``phlora_nim.engines.<package>.<name>``, imported on first use (the router never loads torch)."""
        return importlib.import_module(f"phlora_nim.engines.{self.package}.{name}")

    def openai_facts(self) -> OpenAIEngineFacts:
        """What the router needs to reach a replica of an OpenAI-speaking engine (``<package>.openai``)."""
        facts: OpenAIEngineFacts = self.module("openai").FACTS
        return facts


# vLLM's --max-lora-rank accepts only these (vllm/config/lora.py, LoRAConfig.max_lora_rank); NIM 2.x runs vLLM.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

ENGINES: tuple[Engine, ...] = (
    Engine(
        name="trtllm",
        package="trtllm_llmapi",
        protocol="triton",
        adapter_form="peft-folder",
        versions="TensorRT-LLM ≥ 1.3 (PyTorch backend): Triton <yy.mm>-trtllm-python-py3, the llmapi model",
        summary="TensorRT-LLM's llmapi Triton model (GPU): PEFT folders read by lora_path, lora_id per adapter",
        triton_model="tensorrt_llm",
    ),
    Engine(
        name="trtllm-cpu",
        package="trtllm_llmapi",
        protocol="triton",
        adapter_form="peft-folder",
        versions="any CPU machine: phlora-nim's reference of the llmapi tensorrt_llm model",
        summary="CPU reference of the llmapi model on the real tritonserver (tests, demo)",
        cpu_reference=True,
        triton_model="tensorrt_llm",
    ),
    Engine(
        name="trtllm-legacy",
        package="trtllm_legacy",
        protocol="triton",
        adapter_form="trtllm-npy",
        versions="TensorRT-LLM ≤ 1.3.0rc20 (C++ inflight_batcher_llm backend), NIM 1.x",
        summary="compiled TensorRT engines on Triton's tensorrtllm backend: npy LoRA tensors, lora_task_id",
        aliases=("tensorrtllm",),
        # v0.20.0 renamed random_seed → seed (tensorrtllm_backend commit c2e65b8, 2025-05-13).
        triton_releases=("0.20", "0.19"),
    ),
    Engine(
        name="trtllm-legacy-cpu",
        package="trtllm_legacy",
        protocol="triton",
        adapter_form="trtllm-npy",
        versions="any CPU machine: phlora-nim's reference of the legacy tensorrt_llm model",
        summary="CPU reference of the legacy tensorrt_llm model on the real tritonserver (tests, demo)",
        cpu_reference=True,
        aliases=("reference",),
        triton_releases=("0.20", "0.19"),
    ),
    Engine(
        name="vllm",
        package="vllm",
        protocol="openai",
        writes_repository=False,
        lora_ranks=VLLM_LORA_RANKS,
        adapter_form="peft-folder",
        versions="vLLM ≥ 0.6 (vllm serve; runtime loading with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
        summary="vLLM's OpenAI server: model=<adapter>, adapters loaded with /v1/load_lora_adapter",
    ),
    Engine(
        name="nim",
        package="nim",
        protocol="openai",
        writes_repository=False,
        lora_ranks=VLLM_LORA_RANKS,
        adapter_form="peft-folder",
        versions="NVIDIA NIM for LLMs 2.x (vLLM inside; SGLang from 2.1)",
        summary="NIM 2.x: model=<adapter>, adapters from the watched NIM_PEFT_SOURCE store",
    ),
    Engine(
        name="sglang",
        package="sglang",
        protocol="openai",
        writes_repository=False,
        adapter_form="peft-folder",
        versions="SGLang ≥ 0.4.7 (runtime loading with /load_lora_adapter)",
        summary="SGLang's server: model=<base>:<adapter>, adapters loaded with /load_lora_adapter",
    ),
    Engine(
        name="trtllm-serve",
        package="trtllm_serve",
        protocol="openai",
        writes_repository=False,
        adapter_form="peft-folder",
        versions="TensorRT-LLM ≥ 1.0 (trtllm-serve, PyTorch backend)",
        summary="trtllm-serve: lora_request {lora_name, lora_int_id, lora_path} in each request",
    ),
)


# What `convert` writes when no --backend is given: the CPU reference, so that a repository runs here.
DEFAULT_ENGINE = "trtllm-legacy-cpu"


def engine(name: str, *, flag: str = "--backend") -> Engine:
    """The engine called ``name`` (or by an earlier alias).

    Raises:
        OptionError: no engine has that name; the message lists the names there are.
    """
    for row in ENGINES:
        if name == row.name or name in row.aliases:
            return row
    raise OptionError(
        "unknown engine",
        where=flag,
        expected=" or ".join(row.name for row in ENGINES),
        found=repr(name),
        fix="pick one of the engines listed (`phlora-nim convert --help` says what each serves)",
    )


def engine_names() -> tuple[str, ...]:
    return tuple(row.name for row in ENGINES)
