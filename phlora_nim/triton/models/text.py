"""``preprocessing`` and ``postprocessing``: the tokenizer on either side of the token-level model.

Same tensor names as TensorRT-LLM's ``inflight_batcher_llm`` repository, so the ensemble wiring
is the one users know. The tokenizer is the base checkpoint's (``tokenizer_dir`` parameter).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a Python-backend model's config, as plain strings."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class _TokenizerModel:
    """Shared set-up: load the tokenizer named by the ``tokenizer_dir`` parameter."""

    pb: Any = None  # triton_python_backend_utils, set by model.py

    def initialize(self, args: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        self.params = model_parameters(args)
        self.tokenizer = AutoTokenizer.from_pretrained(self.params["tokenizer_dir"])
        eos = self.tokenizer.eos_token_id
        self.end_id = int(eos) if eos is not None else -1
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else max(self.end_id, 0)

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _error(self, message: str) -> Any:
        """A request the client got wrong (missing input, empty prompt): INVALID_ARGUMENT, this request only."""
        error = self.pb.TritonError(message, self.pb.TritonError.INVALID_ARG)
        return self.pb.InferenceResponse(output_tensors=[], error=error)

    def finalize(self) -> None:
        self.tokenizer = None


class PreprocessingModel(_TokenizerModel):
    """``QUERY`` [b, 1] strings → ``INPUT_ID`` [b, L] (padded), lengths, output length, end/pad ids."""

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        query = self._input(request, "QUERY")
        if query is None:
            return self._error("preprocessing: missing input QUERY")
        texts = [q.decode("utf-8") if isinstance(q, bytes) else str(q) for q in query.reshape(-1)]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        if any(len(x) == 0 for x in ids):
            return self._error("preprocessing: text_input encodes to no tokens; send a non-empty prompt")
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int32)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
        out_len = self._input(request, "REQUEST_OUTPUT_LEN")
        if out_len is None:
            out_len = np.full((len(ids), 1), int(self.params.get("default_max_tokens", 16)), dtype=np.int32)
        batch = len(ids)
        tensors = [
            self.pb.Tensor("INPUT_ID", input_ids),
            self.pb.Tensor("REQUEST_INPUT_LEN", np.array([[len(x)] for x in ids], dtype=np.int32)),
            self.pb.Tensor("REQUEST_OUTPUT_LEN", out_len.astype(np.int32).reshape(batch, 1)),
            self.pb.Tensor("OUT_END_ID", np.full((batch, 1), self.end_id, dtype=np.int32)),
            self.pb.Tensor("OUT_PAD_ID", np.full((batch, 1), self.pad_id, dtype=np.int32)),
        ]
        return self.pb.InferenceResponse(output_tensors=tensors)


class PostprocessingModel(_TokenizerModel):
    """``TOKENS_BATCH`` [b, beams, L] (+ ``SEQUENCE_LENGTH`` [b, beams]) → ``OUTPUT`` [b, beams] text."""

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        tokens = self._input(request, "TOKENS_BATCH")
        if tokens is None:
            return self._error("postprocessing: missing input TOKENS_BATCH")
        lengths = self._input(request, "SEQUENCE_LENGTH")
        if tokens.ndim == 2:
            tokens = tokens[:, None, :]
        skip = self.params.get("skip_special_tokens", "true") == "true"
        texts = np.empty(tokens.shape[:2], dtype=object)
        for b in range(tokens.shape[0]):
            for k in range(tokens.shape[1]):
                n = int(lengths.reshape(tokens.shape[:2])[b, k]) if lengths is not None else tokens.shape[2]
                texts[b, k] = self.tokenizer.decode(tokens[b, k, :n].tolist(), skip_special_tokens=skip).encode()
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("OUTPUT", texts)])
