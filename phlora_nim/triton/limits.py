"""The engine's request limits, checked per request before it joins a batch, as TensorRT-LLM does.

A TensorRT-LLM engine is built with ``max_input_len``, ``max_seq_len`` and ``max_num_tokens``; the
runtime checks every request against them on its own (``LlmRequest::validate`` in
``cpp/tensorrt_llm/batch_manager/llmRequest.cpp``; ``Request::validate`` in
``cpp/tensorrt_llm/executor/requestImpl.h``), so one bad request fails alone. The reference model
checks the same things with the same wording, and additionally the token ids themselves: on a GPU an
out-of-vocabulary id reads past the embedding table, here it would fail the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# TensorRT-LLM's defaults (trtllm-build): max_input_len 1024, max_seq_len = the model's context,
# max_num_tokens 8192.
DEFAULT_MAX_INPUT_LEN = 1024
DEFAULT_MAX_NUM_TOKENS = 8192


class RequestRejected(ValueError):
    """A request the engine refuses before running it (the client's fault: INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class EngineLimits:
    """What one request and one batch may hold.

    Args:
        vocab_size: token ids must lie in ``[0, vocab_size)``.
        max_input_len: the longest prompt.
        max_seq_len: prompt + generated tokens; longer requests get fewer new tokens (with a warning
            in TensorRT-LLM; here in the log), never an error.
        max_num_tokens: prompt tokens in one batch round (a round holds at least one request).
    """

    vocab_size: int
    max_input_len: int = DEFAULT_MAX_INPUT_LEN
    max_seq_len: int = 2048
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_input_len", "max_seq_len", "max_num_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, found {getattr(self, name)}")
        if self.max_input_len >= self.max_seq_len:
            raise ValueError(
                f"max_input_len ({self.max_input_len}) must be below max_seq_len ({self.max_seq_len}): "
                "no room left for a generated token"
            )

    @classmethod
    def from_parameters(cls, params: dict[str, str], model_config: dict[str, Any]) -> EngineLimits:
        """Limits from the ``tensorrt_llm`` config's parameters, defaulting to TensorRT-LLM's build defaults
        capped by the model's context (``max_position_embeddings``)."""
        context = int(model_config.get("max_position_embeddings") or 2048)
        max_seq_len = int(params.get("max_seq_len") or context)
        max_input_len = int(params.get("max_input_len") or min(DEFAULT_MAX_INPUT_LEN, max_seq_len - 1))
        return cls(
            vocab_size=int(model_config["vocab_size"]),
            max_input_len=max_input_len,
            max_seq_len=max_seq_len,
            max_num_tokens=int(params.get("max_num_tokens") or DEFAULT_MAX_NUM_TOKENS),
        )

    def check(self, input_ids: list[int], max_new_tokens: int, end_id: int) -> int:
        """Refuse a request the engine would refuse; return the number of tokens it may generate.

        Raises:
            RequestRejected: with TensorRT-LLM's text where it has one.
        """
        if not input_ids:
            raise RequestRejected("Assertion failed: !mInputTokenIds.empty() (the prompt has no tokens)")
        if max_new_tokens <= 0:
            raise RequestRejected(
                f"Assertion failed: mMaxNewTokens > 0 (request_output_len is {max_new_tokens}; ask for ≥ 1 token)"
            )
        bad = next((t for t in input_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestRejected(f"Input token id ({bad}) is not within acceptable range [0, {self.vocab_size}).")
        if not -1 <= end_id < self.vocab_size:
            raise RequestRejected(f"EndId ({end_id}) is not within acceptable range [-1, {self.vocab_size}).")
        if len(input_ids) > self.max_input_len:
            raise RequestRejected(
                f"Prompt length ({len(input_ids)}) exceeds maximum input length ({self.max_input_len}). "
                "Set log level to info and check TRTGptModel logs for how maximum input length is set"
            )
        return min(max_new_tokens, self.max_seq_len - len(input_ids))
