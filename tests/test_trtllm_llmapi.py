"""The ``trtllm`` engine (TensorRT-LLM ≥ 1.3, the Triton ``llmapi`` model): its facts checked against
upstream, and every adapter kind we write exact under its HF loader rule.

Upstream sources (NVIDIA/TensorRT-LLM; restated, nothing copied):
- ``triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt`` (commit 0a71057313ec0626527e164a8fc0205c5822e2f5,
  with the LoRA inputs of PR #14079): the inputs and outputs in :data:`UPSTREAM_INPUTS` / :data:`UPSTREAM_OUTPUTS`.
- ``triton_backend/all_models/llmapi/tensorrt_llm/1/helpers.py`` ``get_lora_request_from_request``: the
  error texts; ``1/model.py`` ``_generate``: ``Error generating request: …``.
- ``tensorrt_llm/_torch/peft/lora/manager.py`` ``LoraManager.load_from_hf``: scale ``lora_alpha /
  t_in.shape[0]`` (rsLoRA ``/ sqrt``), only ``r`` / ``lora_alpha`` / ``use_rslora`` read (no patterns),
  ``preprocess_lora_weights`` swapping ``gate_up_proj.lora_B.weight`` halves, modules outside
  ``lora_target_modules`` skipped with a warning; ``loaders.py`` ``iterate_hf_lora`` (``unsupported key``).
- ``tensorrt_llm/_torch/models/modeling_phi3.py`` ``Phi3ForCausalLM.load_weights``: the fused
  ``gate_up_proj`` keeps HF's ``[gate; up]`` order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2

from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.formats.peft import load_peft
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.core.errors import InputError, OptionError, PhloraError
from phlora_nim.engines.trtllm_llmapi import interface, model_yaml, transport
from phlora_nim.engines.trtllm_llmapi.adapter_folder import save_for_trtllm
from phlora_nim.engines.trtllm_llmapi.loader_rule import TRTLLM_TO_HF, LoaderError, load_for_trtllm, trtllm_modules_of
from phlora_nim.jobs import adapter_jobs as jobs
from phlora_nim.testing.peft_answers import peft_text_answers

# config.pbtxt of the llmapi model, as upstream declares it: (name, data_type, dims, optional).
UPSTREAM_INPUTS = [
    ("text_input", "TYPE_STRING", [-1], False),
    ("image_url", "TYPE_STRING", [-1], True),
    ("streaming", "TYPE_BOOL", [1], True),
    ("sampling_param_best_of", "TYPE_INT32", [1], True),
    ("sampling_param_temperature", "TYPE_FP32", [1], True),
    ("sampling_param_top_k", "TYPE_INT32", [1], True),
    ("sampling_param_top_p", "TYPE_FP32", [1], True),
    ("sampling_param_frequency_penalty", "TYPE_FP32", [1], True),
    ("sampling_param_presence_penalty", "TYPE_FP32", [1], True),
    ("sampling_param_max_tokens", "TYPE_INT32", [1], True),
    ("sampling_param_stop", "TYPE_STRING", [-1], True),
    ("sampling_param_seed", "TYPE_UINT64", [1], True),
    ("sampling_param_exclude_input_from_output", "TYPE_BOOL", [1], True),
    ("sampling_param_return_perf_metrics", "TYPE_BOOL", [1], True),
    ("return_finish_reason", "TYPE_BOOL", [1], True),
    ("return_stop_reason", "TYPE_BOOL", [1], True),
    ("return_cumulative_logprob", "TYPE_BOOL", [1], True),
    ("stop", "TYPE_BOOL", [1], True),
    ("lora_id", "TYPE_UINT64", [1], True),
    ("lora_name", "TYPE_STRING", [1], True),
    ("lora_path", "TYPE_STRING", [1], True),
    ("lora_ckpt_source", "TYPE_STRING", [1], True),
]
UPSTREAM_OUTPUTS = [
    ("text_output", "TYPE_STRING", [-1]),
    ("finish_reason", "TYPE_STRING", [-1]),
    ("stop_reason", "TYPE_STRING", [-1]),
    ("cumulative_logprob", "TYPE_FP32", [-1]),
    ("kv_cache_reused_block", "TYPE_INT32", [-1]),
    ("kv_cache_missed_block", "TYPE_INT32", [-1]),
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", [-1]),
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", [-1]),
    ("kv_cache_hit_rate", "TYPE_FP32", [-1]),
    ("arrival_time_ns", "TYPE_INT64", [1]),
    ("first_scheduled_time_ns", "TYPE_INT64", [1]),
    ("first_token_time_ns", "TYPE_INT64", [1]),
    ("last_token_time_ns", "TYPE_INT64", [1]),
    ("acceptance_rate", "TYPE_FP32", [1]),
    ("total_accepted_draft_tokens", "TYPE_INT32", [1]),
    ("total_draft_tokens", "TYPE_INT32", [1]),
]


def test_config_pbtxt_has_upstream_inputs_and_outputs() -> None:
    """Parsed with Triton's own ModelConfig schema: name, backend, every input and output as upstream."""
    cfg = text_format.Parse(interface.render_config_pbtxt(), model_config_pb2.ModelConfig())
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("tensorrt_llm", "python", 0)
    dtype = model_config_pb2.DataType.Name
    assert [(t.name, dtype(t.data_type), list(t.dims), t.optional) for t in cfg.input] == UPSTREAM_INPUTS
    assert [(t.name, dtype(t.data_type), list(t.dims)) for t in cfg.output] == UPSTREAM_OUTPUTS
    assert not cfg.HasField("model_transaction_policy")  # upstream takes decoupled from model.yaml


def test_error_texts_are_upstreams() -> None:
    assert interface.LORA_TOGETHER == "lora_id, lora_name, and lora_path must all be provided together"
    assert interface.lora_path_missing("/x") == "lora_path does not exist on the Triton server's filesystem: /x"
    assert interface.ckpt_source_invalid("npy") == "lora_ckpt_source must be one of ('hf', 'nemo'), got 'npy'"
    assert interface.is_lora_path_missing("Error generating request: " + interface.lora_path_missing("/s/a"))


# ---------------------------------------------------------------- the loader rule against PEFT's outputs

KINDS = {
    "rank": ("llama", RankPolicy(rank=4)),
    "energy": ("llama", RankPolicy(energy=0.8, max_rank=16)),
    "budget": ("llama", RankPolicy(budget_params=6000)),
    "phi3-fused": ("phi3", RankPolicy(rank=4)),
}


@pytest.fixture(scope="module")
def folders(model_pairs, tmp_path_factory):
    """Per kind: the base, the extracted PEFT folder and the folder written for TensorRT-LLM."""
    out = {}
    for kind, (family, policy) in KINDS.items():
        base, ft = model_pairs(family)
        root = tmp_path_factory.mktemp(kind)
        peft_dir, trt_dir = root / "peft", root / "trt"
        jobs.extract(base, ft, peft_dir, ExtractOptions(policy=policy), plot=False)
        trt_dir.mkdir()
        save_for_trtllm(load_peft(peft_dir), trt_dir, name=kind)
        out[kind] = (base, peft_dir, trt_dir)
    return out


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 2, 7]])


def _peft_logits(base: Path, folder: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _rule_logits(base: Path, folder: Path, *, targets: list[str] | None = None) -> torch.Tensor:
    """The base plus each (layer, module) update the loader rule yields, as the engine computes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if targets is None:
        targets = sorted(trtllm_modules_of(folder)[0])
    loaded = load_for_trtllm(folder, lora_target_modules=targets)
    linears = dict(model.named_modules())
    with torch.no_grad():
        for (layer, module), (a, b) in loaded.factors.items():
            leaf = TRTLLM_TO_HF[module]
            (path,) = [
                p
                for p in linears
                if p.endswith(f"layers.{layer}.self_attn.{leaf}") or p.endswith(f"layers.{layer}.mlp.{leaf}")
            ]
            linears[path].weight += (b @ a).to(linears[path].weight.dtype)
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_exact_under_the_trtllm_rule(folders, kind: str) -> None:
    base, peft_dir, trt_dir = folders[kind]
    expected = _peft_logits(base, peft_dir)
    got = _rule_logits(base, trt_dir)
    base_logits = _rule_logits(base, trt_dir, targets=["none"])  # every module skipped: the base
    assert (expected - base_logits).abs().max() > 1e-3, (
        "the adapter must change the outputs for the test to mean anything"
    )
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_a_plain_peft_folder_of_a_fused_family_is_wrong_under_the_rule(folders) -> None:
    """The loader swaps gate_up_proj's B halves: the folder PEFT reads is wrong on TensorRT-LLM (why we pre-swap)."""
    base, peft_dir, _ = folders["phi3-fused"]
    diff = (_rule_logits(base, peft_dir) - _peft_logits(base, peft_dir)).abs().max()
    assert diff > 1e-3


def test_a_mis_scaled_folder_fails(folders, tmp_path: Path) -> None:
    """alpha_pattern: PEFT honours it, TensorRT-LLM's loader ignores it — the same folder gives other outputs."""
    base, peft_dir, _ = folders["rank"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in peft_dir.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"q_proj": cfg["lora_alpha"] * 3, "down_proj": cfg["lora_alpha"] * 0.5}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_rule_logits(base, bad), _peft_logits(base, bad), atol=2e-5, rtol=1e-4)


def test_loader_refuses_bias_keys_and_skips_uncovered_modules(folders, tmp_path: Path, caplog) -> None:
    from safetensors.torch import load_file, save_file

    _, _, trt_dir = folders["rank"]
    with caplog.at_level(logging.WARNING, logger="phlora_nim.trtllm_llmapi"):
        loaded = load_for_trtllm(trt_dir, lora_target_modules=["attn_q", "attn_k", "attn_v"])
    assert loaded.skipped and "attn_dense" in loaded.skipped
    assert {m for _, m in loaded.factors} <= {"attn_q", "attn_k", "attn_v"}
    assert "not in target modules" in caplog.text
    bad = tmp_path / "bias"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((trt_dir / "adapter_config.json").read_bytes())
    tensors = load_file(str(trt_dir / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key.replace(".weight", ".bias")] = torch.zeros(tensors[key].shape[0])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(LoaderError, match=r"unsupported key .*lora_B\.bias from HF LoRA weights"):
        load_for_trtllm(bad, lora_target_modules=["attn_q"])


def test_writer_refuses_what_the_loader_cannot_apply(folders, tmp_path: Path) -> None:
    _, peft_dir, _ = folders["rank"]
    adapter = load_peft(peft_dir)
    name = next(iter(adapter.modules))
    adapter.lora_biases[name] = torch.ones(adapter.modules[name].b.shape[0])
    adapter.modules_to_save["model.norm.weight"] = torch.ones(4)
    with pytest.raises(InputError, match=r"(?s)lora_B\.bias keys.*modules_to_save"):
        save_for_trtllm(adapter, tmp_path, name="x")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- model.yaml


def test_model_yaml_covers_and_widens(tmp_path: Path) -> None:
    fresh = model_yaml.LlmapiConfig(
        model="/models/base", lora_target_modules=(), max_lora_rank=1, max_loras=4, max_cpu_loras=16
    )
    first, notes = model_yaml.plan(None, fresh, [model_yaml.Need("a", frozenset({"attn_q", "attn_v"}), 8)])
    assert (first.lora_target_modules, first.max_lora_rank, notes) == (("attn_q", "attn_v"), 8, [])
    path = tmp_path / "model.yaml"
    model_yaml.write(path, first)
    data = __import__("yaml").safe_load(path.read_text())
    assert data["backend"] == "pytorch" and data["model"] == "/models/base"
    assert data["lora_config"] == {
        "max_lora_rank": 8,
        "lora_target_modules": ["attn_q", "attn_v"],
        "max_loras": 4,
        "max_cpu_loras": 16,
        "swap_gate_up_proj_lora_b_weight": True,
    }
    assert data["triton_config"] == {"max_batch_size": 0, "decoupled": False}
    again = model_yaml.read(path)
    wider, notes = model_yaml.plan(again, fresh, [model_yaml.Need("b", frozenset({"mlp_4h_to_h"}), 16)])
    assert wider.lora_target_modules == ("attn_q", "attn_v", "mlp_4h_to_h") and wider.max_lora_rank == 16
    assert any("widened by mlp_4h_to_h" in n for n in notes) and any("8 → 16" in n for n in notes)
    with pytest.raises(
        InputError, match=r"b: modules mlp_4h_to_h not in lora_target_modules.*rank 16 > max_lora_rank 8"
    ):
        model_yaml.plan(again, fresh, [model_yaml.Need("b", frozenset({"mlp_4h_to_h"}), 16)], fixed=True)


# ---------------------------------------------------------------- the router's transport


def test_lora_inputs_ride_on_the_clients_request() -> None:
    ref = transport.LoraRef(lora_id=123456789, name="support", path="/store/support@abc")
    client = service_pb2.ModelInferRequest(model_name="tensorrt_llm")
    t = client.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"hi")
    typed = service_pb2.ModelInferRequest.FromString(client.SerializeToString() + transport.lora_suffix(ref, raw=False))
    got = {i.name: i for i in typed.inputs}
    assert list(got["lora_id"].contents.uint64_contents) == [123456789]
    assert list(got["lora_path"].contents.bytes_contents) == [b"/store/support@abc"]
    raw_client = service_pb2.ModelInferRequest(model_name="tensorrt_llm")
    raw_client.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    raw_client.raw_input_contents.append(b"\x02\x00\x00\x00hi")
    raw = service_pb2.ModelInferRequest.FromString(
        raw_client.SerializeToString() + transport.lora_suffix(ref, raw=True)
    )
    assert [i.name for i in raw.inputs] == ["text_input", "lora_id", "lora_name", "lora_path"]
    assert raw.raw_input_contents[1] == (123456789).to_bytes(8, "little")
    assert raw.raw_input_contents[3] == len(ref.path).to_bytes(4, "little") + ref.path.encode()
    with pytest.raises(ValueError):
        transport.LoraRef(lora_id=2**63, name="x", path="/p")
    whole = transport.text_request("Hello", max_tokens=16, lora=ref)
    assert {i.name for i in whole.inputs} >= {
        "text_input",
        "sampling_param_max_tokens",
        "lora_id",
        "lora_name",
        "lora_path",
    }


# ---------------------------------------------------------------- the CPU reference on the real tritonserver


@pytest.fixture(scope="module")
def reference_server(llama_finetunes, tmp_path_factory):
    """A repository with the CPU reference (max_loras 1: every switch evicts) and two adapters in a store."""
    import tritonclient.grpc as grpcclient

    from phlora_nim.engines.trtllm_llmapi.deploy import write_model
    from phlora_nim.triton.launcher import LocalTriton

    base, fts = llama_finetunes
    root = tmp_path_factory.mktemp("llmapi")
    store = root / "store"
    adapters = {}
    for name, ft in zip(("support", "legal"), fts[:2], strict=True):
        extracted = root / f"extract-{name}"
        jobs.extract(base, ft, extracted, ExtractOptions(policy=RankPolicy(rank=8)), plot=False)
        (store / name).mkdir(parents=True)
        save_for_trtllm(load_peft(extracted), store / name, name=name)
        adapters[name] = (extracted, store / name)
    needs = [
        model_yaml.Need(n, frozenset(trtllm_modules_of(p)[0]), trtllm_modules_of(p)[1])
        for n, (_, p) in adapters.items()
    ]
    fresh = model_yaml.LlmapiConfig(
        model=str(base), lora_target_modules=(), max_lora_rank=1, max_loras=1, max_cpu_loras=1
    )
    config, _ = model_yaml.plan(None, fresh, needs)
    repo = root / "model_repository"
    write_model(repo, config, cpu_reference=True)
    with LocalTriton(repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield base, adapters, server, client
        client.close()


def _ask(client, prompt: str, n: int, lora: tuple[int, str, str] | None = None, **extra):
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        x = grpcclient.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        return x

    inputs = [
        tensor("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
        tensor("sampling_param_max_tokens", np.array([n], dtype=np.int32), "INT32"),
    ]
    fields = dict(zip(("lora_id", "lora_name", "lora_path"), lora or (), strict=False)) | extra
    for key, value in fields.items():
        if key == "lora_id":
            inputs.append(tensor(key, np.array([value], dtype=np.uint64), "UINT64"))
        else:
            inputs.append(tensor(key, np.array([str(value).encode()], dtype=object), "BYTES"))
    result = client.infer("tensorrt_llm", inputs)
    return result.as_numpy("text_output")[0].decode()


PROMPTS = ["the cat and the dog", "red fish in the river", "one two three"]


def _peft_answers(base: Path, folder: Path | None, n: int) -> list[str]:
    return peft_text_answers(base, folder, PROMPTS, n)


def test_reference_answers_like_peft_and_reloads_after_eviction(reference_server) -> None:
    base, adapters, _, client = reference_server
    expected = {None: _peft_answers(base, None, 8)} | {n: _peft_answers(base, e, 8) for n, (e, _) in adapters.items()}
    assert expected["support"] != expected["legal"] != expected[None]
    ids = {"support": 11, "legal": 22}
    for _ in range(2):  # max_loras 1: each switch evicts the other, which is read again from its path
        for name in ("support", "legal", None):
            lora = None if name is None else (ids[name], name, str(adapters[name][1]))
            assert [_ask(client, p, 8, lora) for p in PROMPTS] == expected[name], name


def test_reference_error_texts(reference_server) -> None:
    from tritonclient.utils import InferenceServerException

    _, adapters, _, client = reference_server
    with pytest.raises(
        InferenceServerException, match="lora_id, lora_name, and lora_path must all be provided together"
    ):
        _ask(client, "a b", 2, lora_id=5)
    with pytest.raises(
        InferenceServerException, match="lora_path does not exist on the Triton server's filesystem: /nowhere/x"
    ):
        _ask(client, "a b", 2, (5, "x", "/nowhere/x"))
    with pytest.raises(InferenceServerException, match=r"lora_ckpt_source must be one of \('hf', 'nemo'\), got 'npy'"):
        _ask(client, "a b", 2, (11, "support", str(adapters["support"][1])), lora_ckpt_source="npy")


# ---------------------------------------------------------------- convert for the llmapi engine


def _job(base, fts, names, repo, **kw):
    """The one ``convert`` job, for the llmapi engine (its own options in ``engine_options``)."""
    from phlora_nim.engines.trtllm_llmapi.staging import Options
    from phlora_nim.jobs.convert import ConvertJob
    from phlora_nim.repository.settings import RepositorySettings

    policy = kw.pop("policy", RankPolicy(rank=4))
    target = kw.pop("target_modules", None)
    backend, served = kw.pop("backend", "trtllm-cpu"), kw.pop("served_root", None)
    return ConvertJob(
        base=base,
        finetuned=tuple(fts),
        names=tuple(names),
        repository=repo,
        options=ExtractOptions(policy=policy, target_modules=target),
        settings=RepositorySettings(backend=backend, base=str(base), served_path=served),
        engine_options=Options(**kw),
    )


def test_convert_writes_the_repository_and_widens_model_yaml(llama_finetunes, tmp_path: Path) -> None:
    import yaml

    from phlora_nim.engines.trtllm_llmapi.deploy import store_dir
    from phlora_nim.jobs.convert import convert
    from phlora_nim.repository.registry import Registry

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    job = _job(base, fts[:1], ["support"], repo, target_modules=r".*\.(q_proj|v_proj)")
    (support,) = convert(job)
    cfg = text_format.Parse((repo / "tensorrt_llm/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [t.name for t in cfg.input] == [t[0] for t in UPSTREAM_INPUTS]
    data = yaml.safe_load((repo / "tensorrt_llm/1/model.yaml").read_text())
    assert data["lora_config"]["lora_target_modules"] == ["attn_q", "attn_v"]
    assert data["lora_config"]["max_lora_rank"] == 4
    assert support.entry.lora_path == str(store_dir(repo.resolve(), support.entry.task_id))
    assert (Path(support.entry.lora_path) / "adapter_config.json").is_file()
    job2 = _job(base, fts[1:2], ["legal"], repo, policy=RankPolicy(rank=6))
    convert(job2)
    data = yaml.safe_load((repo / "tensorrt_llm/1/model.yaml").read_text())
    assert data["lora_config"]["max_lora_rank"] == 6
    assert set(data["lora_config"]["lora_target_modules"]) > {"attn_q", "attn_v", "attn_dense", "mlp_4h_to_h"}
    assert any("widened" in n for n in job2.notes) and any("4 → 6" in n for n in job2.notes)
    assert set(Registry(repo).read().adapters) == {"support", "legal"}


def test_convert_mixed_layout_is_exact_under_the_trtllm_rule_and_refused_by_the_legacy_engine(
    folders, llama_finetunes, tmp_path: Path
) -> None:
    """--layout mixed: each module at its own rank (rank_pattern), the loader's lora_alpha / tensor rank
    gives PEFT's outputs of the padded folder; the report says both sizes. The legacy engine (npy rows
    padded by format, a PEFT store vLLM may serve) refuses it before writing anything."""
    import dataclasses

    from safetensors.torch import load_file

    from phlora_nim.converters.formats.peft import WEIGHTS_NAME
    from phlora_nim.jobs.convert import convert
    from phlora_nim.repository.settings import RepositorySettings

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    job = dataclasses.replace(_job(base, fts[:1], ["mix"], repo, policy=RankPolicy(budget_params=6000)), layout="mixed")
    (mix,) = convert(job)
    folder = Path(mix.entry.lora_path)
    ranks = load_peft(folder).ranks()
    assert len(set(ranks.values())) > 1 and json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    stored = load_file(str(folder / WEIGHTS_NAME))
    assert {v.shape[0] for k, v in stored.items() if ".lora_A" in k} == set(ranks.values())  # no padding
    totals = json.loads((folder / "phlora_report.json").read_text())["totals"]
    assert totals["layout"] == "mixed" and totals["stored_parameters"] == totals["adapter_parameters"]
    padded = tmp_path / "padded"
    jobs.extract(base, fts[0], padded, ExtractOptions(policy=RankPolicy(budget_params=6000)), plot=False)
    torch.testing.assert_close(_rule_logits(base, folder), _peft_logits(base, padded), atol=2e-5, rtol=1e-4)
    legacy = tmp_path / "legacy"
    settings = RepositorySettings(backend="trtllm-legacy-cpu", base=str(base))
    job = dataclasses.replace(job, repository=legacy, settings=settings, engine_options=None)
    with pytest.raises(OptionError, match="cannot take --layout mixed"):
        convert(job)
    assert not legacy.exists()


def test_convert_refuses_with_nothing_written(llama_finetunes, tmp_path: Path) -> None:
    from phlora_nim.jobs.convert import convert

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    with pytest.raises(PhloraError, match="store path Triton cannot see"):
        convert(_job(base, fts[:1], ["a"], repo, served_root="/models"))
    assert not repo.exists()
    fixed = tmp_path / "model.yaml"
    model_yaml.write(fixed, model_yaml.LlmapiConfig(model=str(base), lora_target_modules=("attn_q",), max_lora_rank=2))
    with pytest.raises(
        PhloraError, match=r"a: modules .*not in lora_target_modules \[attn_q\].*rank 4 > max_lora_rank 2"
    ):
        convert(_job(base, fts[:1], ["a"], repo, model_yaml=fixed, fixed=True, backend="trtllm"))
    assert not repo.exists()


def test_cli_convert_for_trtllm(llama_finetunes, tmp_path: Path, run_cli) -> None:
    """The GPU engine: repository, model.yaml covering both adapters, and how to get NVIDIA's model files."""
    import yaml

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    args = ["convert", "--base", base, "--finetuned", fts[0], "--finetuned", fts[1], "--name", "support"]
    args += ["--name", "legal", "-m", repo, "--backend", "trtllm", "--rank", "4", "--served-path", "/models"]
    code, out, err = run_cli(*args, "--max-loras", "2", "--max-cpu-loras", "4")
    assert code == 0, err
    cfg = text_format.Parse((repo / "tensorrt_llm/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type)) for t in cfg.input] == [
        (n, d) for n, d, _, _ in UPSTREAM_INPUTS
    ]
    data = yaml.safe_load((repo / "tensorrt_llm/1/model.yaml").read_text())
    assert data["lora_config"]["max_loras"] == 2 and data["lora_config"]["max_cpu_loras"] == 4
    for folder in (repo / "tensorrt_llm/lora_store").iterdir():
        modules, rank = trtllm_modules_of(folder)
        assert (
            modules <= set(data["lora_config"]["lora_target_modules"]) and rank <= data["lora_config"]["max_lora_rank"]
        )
    assert not (repo / "tensorrt_llm/1/model.py").exists()  # NVIDIA's, put in place from the container
    assert "git clone --depth 1 --branch" in out and "/models/tensorrt_llm/1" in out and "helpers.py" in out
    code, _, err = run_cli(*args, "--engine-dir", "/engines/x")
    assert code == 2 and "--engine-dir" in err and "do not apply to --backend trtllm" in err


def test_id_collision_is_refused_and_remove_schedules_the_folder(llama_finetunes, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from phlora_nim.engines.trtllm_llmapi.deploy import store_dir
    from phlora_nim.jobs.convert import convert
    from phlora_nim.jobs.maintenance import remove_adapter
    from phlora_nim.repository.registry import Registry

    base, fts = llama_finetunes
    repo = tmp_path / "repo"
    (first,) = convert(_job(base, fts[:1], ["a"], repo))
    folder = store_dir(repo, first.entry.task_id)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 2  # other weights under the same id
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    before = (repo / "phlora_registry.json").read_text()
    with pytest.raises(PhloraError, match="lora_id collision"):
        convert(_job(base, fts[:2], ["a", "b"], repo))
    assert (repo / "phlora_registry.json").read_text() == before, "nothing registered"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "nothing moved into the store"
    remove_adapter(repo, "a", grace=30)
    state = Registry(repo).read()
    assert "a" not in state.adapters
    assert any(p.path.endswith(f"lora_store/{first.entry.task_id}") for p in state.pending_deletions)


def test_both_engines_have_the_same_convert_steps() -> None:
    """The one convert job reaches either engine through the same step functions, called alike."""
    import inspect

    from phlora_nim.engines.registry import engine

    steps = (
        "prepare",
        "stage",
        "check_staged",
        "lora_path",
        "check_fit",
        "unchanged",
        "place",
        "engine_files",
        "notes",
    )
    legacy, llmapi = (engine(n).module("staging") for n in ("trtllm-legacy-cpu", "trtllm-cpu"))
    for step in steps:
        params = [list(inspect.signature(getattr(m, step)).parameters) for m in (legacy, llmapi)]
        assert params[0] == params[1], step
    assert legacy.PEFT_STORE and not llmapi.PEFT_STORE
    assert legacy.LAYOUTS == ("padded",) and set(llmapi.LAYOUTS) == {"padded", "mixed"}
    deploys = [engine(n).module("deploy").write_repository for n in ("trtllm-legacy-cpu", "trtllm-cpu")]
    assert [list(inspect.signature(f).parameters) for f in deploys] == [["root", "settings", "state", "fit"]] * 2
