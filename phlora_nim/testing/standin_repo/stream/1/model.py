"""Decoupled stand-in: several responses per request, ``y = x + round(sum(lora_weights)) + i``.

Same LoRA cache protocol as the ``ensemble`` stand-in; a failure is sent as the request's only
(final) response, as the TensorRT-LLM backend does on a stream.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from phlora_nim.testing.lora_standin import LoraCache, LoraError, read

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.cache = LoraCache(int(config["parameters"]["lora_cache_capacity"]["string_value"]))
        self.count = int(config["parameters"]["responses"]["string_value"])

    def execute(self, requests: list[object]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                x = read(request, "x")
                offsets = self.cache.offsets_of(request, rows=x.shape[0])
            except LoraError as exc:
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))), flags=FINAL
                )
                continue
            for i in range(self.count):
                y = (x.astype(np.int64) + offsets.astype(np.int64) + i).astype(np.int32)
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", y)]))
            sender.send(flags=FINAL)
        return None
