"""The generated Triton configs against TensorRT-LLM's own ``inflight_batcher_llm`` templates.

Tables restated from the release we target by default, v0.20.0 and later (TensorRT-LLM
``triton_backend/all_models/inflight_batcher_llm/{tensorrt_llm,ensemble,preprocessing,postprocessing}/
config.pbtxt``; read at TensorRT-LLM 2a9abd95, preprocessing at 08dc37e3, postprocessing at
89fd9b74). v0.19.0 (tensorrtllm_backend ``all_models/``, before commit c2e65b8) differs only in names
we use: ``random_seed`` for ``seed`` and ``min_length`` for ``min_tokens``.

Every input, output and parameter we write must exist there with the same data type, dims and
reshape, so clients and the real ``tensorrt_llm`` backend see what they expect. Columns: io, name,
data type, dims, reshape (``-`` none), optional, allow_ragged_batch (``T``/``F``, ``-`` absent).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from phlora_nim.engines.trtllm_legacy.deploy import (
    ensemble_config,
    llm_config,
    postprocessing_config,
    preprocessing_config,
)
from phlora_nim.repository.registry import RegistryState
from phlora_nim.repository.settings import RepositorySettings

TENSORRT_LLM = """
input  input_ids                            TYPE_INT32                               [-1]       -   T T
input  encoder_input_features               ${encoder_input_features_data_type}      [-1,-1]    -   T T
input  encoder_output_lengths               TYPE_INT32                               [1]        []  T F
input  input_lengths                        TYPE_INT32                               [1]        []  F F
input  request_output_len                   TYPE_INT32                               [1]        []  F F
input  num_return_sequences                 TYPE_INT32                               [1]        []  T F
input  draft_input_ids                      TYPE_INT32                               [-1]       -   T T
input  decoder_input_ids                    TYPE_INT32                               [-1]       -   T T
input  decoder_input_lengths                TYPE_INT32                               [1]        []  T F
input  draft_logits                         ${logits_datatype}                       [-1,-1]    -   T T
input  draft_acceptance_threshold           TYPE_FP32                                [1]        []  T F
input  end_id                               TYPE_INT32                               [1]        []  T F
input  pad_id                               TYPE_INT32                               [1]        []  T F
input  stop_words_list                      TYPE_INT32                               [2,-1]     -   T T
input  bad_words_list                       TYPE_INT32                               [2,-1]     -   T T
input  embedding_bias                       TYPE_FP32                                [-1]       -   T T
input  beam_width                           TYPE_INT32                               [1]        []  T F
input  temperature                          TYPE_FP32                                [1]        []  T F
input  runtime_top_k                        TYPE_INT32                               [1]        []  T F
input  runtime_top_p                        TYPE_FP32                                [1]        []  T F
input  runtime_top_p_min                    TYPE_FP32                                [1]        []  T F
input  runtime_top_p_decay                  TYPE_FP32                                [1]        []  T F
input  runtime_top_p_reset_ids              TYPE_INT32                               [1]        []  T F
input  len_penalty                          TYPE_FP32                                [1]        []  T F
input  early_stopping                       TYPE_BOOL                                [1]        []  T F
input  repetition_penalty                   TYPE_FP32                                [1]        []  T F
input  min_tokens                           TYPE_INT32                               [1]        []  T F
input  beam_search_diversity_rate           TYPE_FP32                                [1]        []  T F
input  presence_penalty                     TYPE_FP32                                [1]        []  T F
input  frequency_penalty                    TYPE_FP32                                [1]        []  T F
input  seed                                 TYPE_UINT64                              [1]        []  T F
input  return_log_probs                     TYPE_BOOL                                [1]        []  T F
input  return_context_logits                TYPE_BOOL                                [1]        []  T F
input  return_generation_logits             TYPE_BOOL                                [1]        []  T F
input  return_perf_metrics                  TYPE_BOOL                                [1]        []  T F
input  return_num_input_tokens              TYPE_BOOL                                [1]        []  T F
input  return_num_output_tokens             TYPE_BOOL                                [1]        []  T F
input  exclude_input_in_output              TYPE_BOOL                                [1]        []  T F
input  stop                                 TYPE_BOOL                                [1]        []  T F
input  streaming                            TYPE_BOOL                                [1]        []  T F
input  prompt_embedding_table               ${prompt_embedding_table_data_type}      [-1,-1]    -   T T
input  prompt_table_extra_ids               TYPE_UINT64                              [-1]       -   T T
input  prompt_vocab_size                    TYPE_INT32                               [1]        []  T F
input  cross_attention_mask                 TYPE_BOOL                                [-1,-1]    -   T T
input  mrope_rotary_cos_sin                 TYPE_FP32                                [-1]       -   T F
input  mrope_position_deltas                TYPE_INT64                               [1]        -   T F
input  lora_task_id                         TYPE_UINT64                              [1]        []  T F
input  lora_weights                         TYPE_FP16                                [-1,-1]    -   T T
input  lora_config                          TYPE_INT32                               [-1,3]     -   T T
input  context_phase_params                 TYPE_UINT8                               [-1]       -   T T
input  skip_cross_attn_blocks               TYPE_BOOL                                [1]        -   T T
input  retention_token_range_starts         TYPE_INT32                               [-1]       -   T T
input  retention_token_range_ends           TYPE_INT32                               [-1]       -   T T
input  retention_token_range_priorities     TYPE_INT32                               [-1]       -   T T
input  retention_token_range_durations_ms   TYPE_INT32                               [-1]       -   T T
input  retention_decode_priority            TYPE_INT32                               [1]        -   T T
input  retention_decode_duration_ms         TYPE_INT32                               [1]        -   T T
input  guided_decoding_guide_type           TYPE_STRING                              [1]        -   T T
input  guided_decoding_guide                TYPE_STRING                              [1]        -   T T
input  lookahead_window_size                TYPE_INT32                               [1]        -   T T
input  lookahead_ngram_size                 TYPE_INT32                               [1]        -   T T
input  lookahead_verification_set_size      TYPE_INT32                               [1]        -   T T
output output_ids                           TYPE_INT32                               [-1,-1]    -   F F
output sequence_length                      TYPE_INT32                               [-1]       -   F F
output cum_log_probs                        TYPE_FP32                                [-1]       -   F F
output output_log_probs                     TYPE_FP32                                [-1,-1]    -   F F
output context_logits                       ${logits_datatype}                       [-1,-1]    -   F F
output generation_logits                    ${logits_datatype}                       [-1,-1,-1] -   F F
output batch_index                          TYPE_INT32                               [1]        -   F F
output sequence_index                       TYPE_INT32                               [1]        -   F F
output context_phase_params                 TYPE_UINT8                               [-1]       -   F F
output kv_cache_alloc_new_blocks            TYPE_INT32                               [1]        -   F F
output kv_cache_reused_blocks               TYPE_INT32                               [1]        -   F F
output kv_cache_alloc_total_blocks          TYPE_INT32                               [1]        -   F F
output arrival_time_ns                      TYPE_INT64                               [1]        -   F F
output first_scheduled_time_ns              TYPE_INT64                               [1]        -   F F
output first_token_time_ns                  TYPE_INT64                               [1]        -   F F
output last_token_time_ns                   TYPE_INT64                               [1]        -   F F
output acceptance_rate                      TYPE_FP32                                [1]        -   F F
output total_accepted_draft_tokens          TYPE_INT32                               [1]        -   F F
output total_draft_tokens                   TYPE_INT32                               [1]        -   F F
output num_input_tokens                     TYPE_INT32                               [1]        -   F F
output num_output_tokens                    TYPE_INT32                               [1]        -   F F
"""

ENSEMBLE = """
input  text_input                           TYPE_STRING          [1]        F F
input  decoder_text_input                   TYPE_STRING          [1]        T F
input  max_tokens                           TYPE_INT32           [1]        F F
input  num_return_sequences                 TYPE_INT32           [1]        T F
input  bad_words                            TYPE_STRING          [-1]       T F
input  stop_words                           TYPE_STRING          [-1]       T F
input  exclude_input_in_output              TYPE_BOOL            [1]        T F
input  end_id                               TYPE_INT32           [1]        T F
input  pad_id                               TYPE_INT32           [1]        T F
input  top_k                                TYPE_INT32           [1]        T F
input  top_p                                TYPE_FP32            [1]        T F
input  temperature                          TYPE_FP32            [1]        T F
input  length_penalty                       TYPE_FP32            [1]        T F
input  repetition_penalty                   TYPE_FP32            [1]        T F
input  min_tokens                           TYPE_INT32           [1]        T F
input  presence_penalty                     TYPE_FP32            [1]        T F
input  frequency_penalty                    TYPE_FP32            [1]        T F
input  seed                                 TYPE_UINT64          [1]        T F
input  return_log_probs                     TYPE_BOOL            [1]        T F
input  return_context_logits                TYPE_BOOL            [1]        T F
input  return_generation_logits             TYPE_BOOL            [1]        T F
input  return_perf_metrics                  TYPE_BOOL            [1]        T F
input  return_num_input_tokens              TYPE_BOOL            [1]        T F
input  return_num_output_tokens             TYPE_BOOL            [1]        T F
input  beam_width                           TYPE_INT32           [1]        T F
input  stream                               TYPE_BOOL            [1]        T F
input  prompt_embedding_table               TYPE_FP16            [-1,-1]    T F
input  prompt_table_extra_id                TYPE_UINT64          [1]        T F
input  prompt_vocab_size                    TYPE_INT32           [1]        T F
input  embedding_bias_words                 TYPE_STRING          [-1]       T F
input  embedding_bias_weights               TYPE_FP32            [-1]       T F
input  lora_task_id                         TYPE_UINT64          [1]        T F
input  lora_weights                         TYPE_FP16            [-1,-1]    T T
input  lora_config                          TYPE_INT32           [-1,3]     T T
input  guided_decoding_guide_type           TYPE_STRING          [1]        T T
input  guided_decoding_guide                TYPE_STRING          [1]        T T
output text_output                          TYPE_STRING          [-1]       | -
output cum_log_probs                        TYPE_FP32            [-1]       | -
output output_log_probs                     TYPE_FP32            [-1,-1]    | -
output context_logits                       ${logits_datatype}   [-1,-1]    | -
output generation_logits                    ${logits_datatype}   [-1,-1,-1] | -
output batch_index                          TYPE_INT32           [1]        | -
output sequence_index                       TYPE_INT32           [1]        | -
output kv_cache_alloc_new_blocks            TYPE_INT32           [1]        | -
output kv_cache_reused_blocks               TYPE_INT32           [1]        | -
output kv_cache_alloc_total_blocks          TYPE_INT32           [1]        | -
output arrival_time_ns                      TYPE_INT64           [1]        | -
output first_scheduled_time_ns              TYPE_INT64           [1]        | -
output first_token_time_ns                  TYPE_INT64           [1]        | -
output last_token_time_ns                   TYPE_INT64           [1]        | -
output acceptance_rate                      TYPE_FP32            [1]        | -
output total_accepted_draft_tokens          TYPE_INT32           [1]        | -
output total_draft_tokens                   TYPE_INT32           [1]        | -
output num_input_tokens                     TYPE_INT32           [1]        | -
output num_output_tokens                    TYPE_INT32           [1]        | -
"""

PREPROCESSING = """
input  QUERY                      TYPE_STRING  [1]           F
input  DECODER_QUERY              TYPE_STRING  [1]           T
input  IMAGE_BYTES                TYPE_UINT8   [-1,-1,-1,-1] T
input  IMAGE_URL                  TYPE_STRING  [1]           T
input  IMAGES                     TYPE_STRING  [-1]          T
input  VIDEO_BYTES                TYPE_UINT8   [-1,-1,-1,-1] T
input  REQUEST_OUTPUT_LEN         TYPE_INT32   [1]           F
input  BAD_WORDS_DICT             TYPE_STRING  [-1]          T
input  STOP_WORDS_DICT            TYPE_STRING  [-1]          T
input  EMBEDDING_BIAS_WORDS       TYPE_STRING  [-1]          T
input  EMBEDDING_BIAS_WEIGHTS     TYPE_FP32    [-1]          T
input  END_ID                     TYPE_INT32   [1]           T
input  PAD_ID                     TYPE_INT32   [1]           T
input  PROMPT_TABLE_EXTRA_ID      TYPE_UINT64  [1]           T
output INPUT_ID                   TYPE_INT32   [-1]          -
output REQUEST_INPUT_LEN          TYPE_INT32   [1]           -
output DECODER_INPUT_ID           TYPE_INT32   [-1]          -
output REQUEST_DECODER_INPUT_LEN  TYPE_INT32   [1]           -
output BAD_WORDS_IDS              TYPE_INT32   [2,-1]        -
output STOP_WORDS_IDS             TYPE_INT32   [2,-1]        -
output EMBEDDING_BIAS             TYPE_FP32    [-1]          -
output REQUEST_OUTPUT_LEN         TYPE_INT32   [-1]          -
output OUT_END_ID                 TYPE_INT32   [1]           -
output OUT_PAD_ID                 TYPE_INT32   [1]           -
output OUT_PROMPT_TABLE_EXTRA_IDS TYPE_UINT64  [-1]          -
"""

POSTPROCESSING = """
input  TOKENS_BATCH     TYPE_INT32  [-1,-1] F
input  SEQUENCE_LENGTH  TYPE_INT32  [-1]    F
output OUTPUT           TYPE_STRING [-1]    -
"""

_LLM_PARAMETER_NAMES = """
    max_beam_width FORCE_CPU_ONLY_INPUT_TENSORS gpt_model_type gpt_model_path encoder_model_path
    max_tokens_in_paged_kv_cache max_attention_window_size sink_token_length batch_scheduler_policy
    kv_cache_free_gpu_mem_fraction cross_kv_cache_fraction kv_cache_host_memory_bytes kv_cache_onboard_blocks
    enable_trt_overlap exclude_input_in_output cancellation_check_period_ms stats_check_period_ms
    iter_stats_max_iterations request_stats_max_iterations enable_kv_cache_reuse normalize_log_probs
    enable_chunked_context gpu_device_ids participant_ids num_nodes lora_cache_optimal_adapter_size
    lora_cache_max_adapter_size lora_cache_gpu_memory_fraction lora_cache_host_memory_bytes lora_prefetch_dir
    decoding_mode executor_worker_path lookahead_window_size lookahead_ngram_size lookahead_verification_set_size
    medusa_choices eagle_choices gpu_weights_percent enable_context_fmha_fp32_acc multi_block_mode cuda_graph_mode
    cuda_graph_cache_size speculative_decoding_fast_logits tokenizer_dir guided_decoding_backend
    xgrammar_tokenizer_info_path
"""
LLM_PARAMETERS = set(_LLM_PARAMETER_NAMES.split())
PREPROCESSING_PARAMETERS = {"tokenizer_dir", "add_special_tokens", "multimodal_model_path", "gpt_model_path"}
PREPROCESSING_PARAMETERS |= {"max_num_images", "hf_model_path"}
POSTPROCESSING_PARAMETERS = {"tokenizer_dir", "skip_special_tokens"}
# Parameters read with no default, so a config without them does not load (``ModelState::GetParameter``
# throws "Cannot find parameter with name: …", the model fails at initialize). Read in
# tensorrtllm_backend inflight_batcher_llm/src/model_instance_state.cc at v0.19.0, and at c2e65b8 (the
# last commit before the backend moved into TensorRT-LLM's triton_backend/ for v0.20.0; the same reads
# there): ModelInstanceState::getBatchingTypeFromParams (gpt_model_type, outside any try);
# ModelInstanceState::getGuidedDecodingConfigFromParams (tokenizer_dir, xgrammar_tokenizer_info_path,
# guided_decoding_backend; empty strings mean "no guided decoding"). gpt_model_path is read in a try
# in the constructor, but then TLLM_CHECK_WITH_INFO "Both encoder and decoder model paths are empty".
BACKEND_REQUIRED = {
    release: {
        "gpt_model_type",
        "gpt_model_path",
        "tokenizer_dir",
        "guided_decoding_backend",
        "xgrammar_tokenizer_info_path",
    }
    for release in ("0.19", "0.20")
}
# all_models/inflight_batcher_llm/<model>/1/model.py, TritonPythonModel.initialize, same at both
# releases: model_config['parameters'][key] (a KeyError when missing). preprocessing: tokenizer_dir and
# multimodal_model_path (gpt_model_path only for multimodal models); postprocessing: tokenizer_dir;
# tensorrt_llm_bls reads every parameter with .get().
MODEL_PY_REQUIRED = {
    "preprocessing": {"tokenizer_dir", "multimodal_model_path"},
    "postprocessing": {"tokenizer_dir"},
    "tensorrt_llm_bls": set(),
}
# Our own Python models (not upstream's model.py files) take these too.
OWN_PARAMETERS = {"default_max_tokens"}
# Upstream requires these; our preprocessing defaults them (a client that sends them works on both).
OPTIONAL_HERE = {"max_tokens", "REQUEST_OUTPUT_LEN", "SEQUENCE_LENGTH"}
RENAMED_IN_0_20 = {"seed": "random_seed", "min_tokens": "min_length"}


def _table(text: str, release: str) -> dict[tuple[str, str], tuple[str, ...]]:
    rows = {}
    for line in text.strip().splitlines():
        io, name, *rest = line.split()
        if release == "0.19":
            name = RENAMED_IN_0_20.get(name, name)
        rows[(io, name)] = tuple(rest)
    return rows


def _dims(values) -> str:
    return "[" + ",".join(str(int(d)) for d in values) + "]"


def _flag(value: bool) -> str:
    return "T" if value else "F"


def _settings(tmp_path: Path, release: str, dtype: str = "float16") -> RepositorySettings:
    return RepositorySettings(backend="trtllm-legacy", base=str(tmp_path), dtype=dtype, trtllm_version=release)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("release", ["0.20", "0.19"])
def test_tensorrt_llm_config_matches_the_template(release: str, dtype: str, tmp_path: Path) -> None:
    config = llm_config(_settings(tmp_path, release, dtype), RegistryState(), tmp_path)
    table = _table(TENSORRT_LLM, release)
    for spec in config.input:
        data_type, dims, reshape, optional, ragged = table[("input", spec.name)]
        if spec.name == "lora_weights":  # upstream hard-codes TYPE_FP16 and asks bf16 users to edit it
            data_type = mc.DataType.Name(mc.TYPE_BF16 if dtype == "bfloat16" else mc.TYPE_FP16)
        ours = (
            mc.DataType.Name(spec.data_type),
            _dims(spec.dims),
            _dims(spec.reshape.shape) if spec.HasField("reshape") else "-",
            _flag(spec.optional),
            _flag(spec.allow_ragged_batch),
        )
        assert ours == (data_type, dims, reshape, optional, ragged), spec.name
    for spec in config.output:
        data_type, dims, *_ = table[("output", spec.name)]
        assert (mc.DataType.Name(spec.data_type), _dims(spec.dims)) == (data_type, dims), spec.name
    assert set(config.parameters) <= LLM_PARAMETERS
    assert config.backend == "tensorrtllm"
    seed = "seed" if release == "0.20" else "random_seed"
    assert seed in {i.name for i in config.input}


@pytest.mark.parametrize("release", ["0.20", "0.19"])
def test_text_models_match_the_templates(release: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, release)
    cases = [
        (ensemble_config(settings), _table(ENSEMBLE, release), set()),
        (preprocessing_config(settings), _table(PREPROCESSING, release), PREPROCESSING_PARAMETERS),
        (postprocessing_config(settings), _table(POSTPROCESSING, release), POSTPROCESSING_PARAMETERS),
    ]
    for config, table, parameters in cases:
        for spec in config.input:
            data_type, dims, optional, *ragged = table[("input", spec.name)]
            assert (mc.DataType.Name(spec.data_type), _dims(spec.dims)) == (data_type, dims), spec.name
            assert not spec.HasField("reshape"), spec.name
            if spec.name not in OPTIONAL_HERE:
                assert _flag(spec.optional) == optional, spec.name
            if ragged and ragged[0] != "-":
                assert _flag(spec.allow_ragged_batch) == ragged[0], spec.name
        for spec in config.output:
            data_type, dims, *_ = table[("output", spec.name)]
            assert (mc.DataType.Name(spec.data_type), _dims(spec.dims)) == (data_type, dims), spec.name
        assert set(config.parameters) <= parameters | OWN_PARAMETERS, config.name


@pytest.mark.parametrize("release", ["0.20", "0.19"])
def test_ensemble_feeds_tensorrt_llm_only_inputs_it_declares(release: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, release)
    llm = _table(TENSORRT_LLM, release)
    step = next(s for s in ensemble_config(settings).ensemble_scheduling.step if s.model_name == "tensorrt_llm")
    assert {("input", name) for name in step.input_map} <= set(llm)
    assert {("output", name) for name in step.output_map} <= set(llm)
    declared = {i.name for i in llm_config(settings, RegistryState(), tmp_path).input}
    assert set(step.input_map) <= declared


def test_unknown_release_is_refused(tmp_path: Path) -> None:
    from phlora_nim.core.errors import OptionError

    with pytest.raises(OptionError, match="--trtllm-version"):
        RepositorySettings(base=str(tmp_path), trtllm_version="0.18")


@pytest.mark.parametrize("release", ["0.20", "0.19"])
def test_tensorrt_llm_config_carries_every_parameter_the_backend_requires(release: str, tmp_path: Path) -> None:
    params = llm_config(_settings(tmp_path, release), RegistryState(), tmp_path).parameters
    missing = BACKEND_REQUIRED[release] - set(params)
    assert not missing, f"the tensorrt_llm backend would fail to load: {sorted(missing)} absent"
    for key in BACKEND_REQUIRED[release]:
        assert "${" not in params[key].string_value, key  # a template placeholder left unfilled
    assert params["gpt_model_type"].string_value == "inflight_fused_batching"
    assert params["gpt_model_path"].string_value  # empty: "Both encoder and decoder model paths are empty"
    # Empty (as upstream's filled template leaves them) turns guided decoding off; a non-empty info
    # path would have to exist.
    for name in ("guided_decoding_backend", "xgrammar_tokenizer_info_path"):
        assert params[name].string_value == "", name


# Our preprocessing / postprocessing (phlora_nim/triton/models/text.py, _TokenizerModel.initialize)
# index params["tokenizer_dir"]; every other parameter has a default there.
REQUIRED_TEXT_PARAMETERS = {"tokenizer_dir"}


@pytest.mark.parametrize("release", ["0.20", "0.19"])
def test_text_models_carry_every_parameter_they_index(release: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, release)
    for config in (preprocessing_config(settings), postprocessing_config(settings)):
        assert set(config.parameters) >= REQUIRED_TEXT_PARAMETERS, config.name
        assert config.parameters["tokenizer_dir"].string_value == str(tmp_path), config.name


@pytest.mark.parametrize("release", ["0.20", "0.19"])
def test_upstream_text_models_would_load_our_configs(release: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, release)
    for config in (preprocessing_config(settings), postprocessing_config(settings)):
        missing = MODEL_PY_REQUIRED[config.name] - set(config.parameters)
        assert not missing, f"upstream {config.name}/1/model.py would raise KeyError: {sorted(missing)}"
    # multimodal_model_path empty means a text-only model to upstream's preprocessing.
    assert preprocessing_config(settings).parameters["multimodal_model_path"].string_value == ""


def _engine(plugin: dict, *, legacy: bool = False) -> dict:
    """A small engine config.json (2 layers, 3 LoRA modules) with ``plugin`` as its plugin_config."""
    pretrained = {
        "dtype": "float16",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_size": 16,
        "intermediate_size": 128,
        "mapping": {"tp_size": 1},
    }
    lora = {"max_lora_rank": 8, "lora_target_modules": ["attn_q", "attn_k", "attn_v"]}
    if legacy:  # no version: builder_config and a top-level plugin_config (gptJsonConfig.cpp)
        return {"pretrained_config": pretrained, "builder_config": lora, "plugin_config": plugin}
    return {
        "version": "0.20.0",
        "pretrained_config": pretrained,
        "build_config": {"lora_config": lora, "plugin_config": plugin},
    }


@pytest.mark.parametrize(
    "engine, chunked",
    [
        (_engine({"lora_plugin": "float16", "use_paged_context_fmha": True}), "true"),
        (_engine({"lora_plugin": "float16", "use_paged_context_fmha": False}), "false"),
        (_engine({"lora_plugin": "float16"}), "false"),
        (_engine({"lora_plugin": "float16", "use_paged_context_fmha": True}, legacy=True), "true"),
        (None, "false"),  # no engine read: never claim a build flag we did not see
    ],
)
def test_chunked_context_only_for_a_paged_context_fmha_engine(engine, chunked: str, tmp_path: Path) -> None:
    from phlora_nim.engines.trtllm_legacy.cache_settings import with_engine

    settings = with_engine(_settings(tmp_path, "0.20"), engine)
    config = llm_config(settings, RegistryState(), tmp_path)
    assert config.parameters["enable_chunked_context"].string_value == chunked


def test_chunked_context_asked_of_an_engine_without_paged_context_fmha_is_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    from phlora_nim.core.errors import OptionError
    from phlora_nim.engines.trtllm_legacy.cache_settings import with_engine

    engine = _engine({"lora_plugin": "float16", "use_paged_context_fmha": False})
    asked = replace(with_engine(_settings(tmp_path, "0.20"), engine), llm_parameters={"enable_chunked_context": "true"})
    with pytest.raises(OptionError, match="Chunked context requires context FMHA, paged kv_cache"):
        llm_config(asked, RegistryState(), tmp_path)
