"""Stand-in for the ``ensemble`` of a TensorRT-LLM deployment: ``y = x + round(sum(lora_weights))``.

Implements the LoRA cache protocol of the real engine (see ``phlora_nim.testing.lora_standin``). An optional
``delay_ms`` input makes a request slow (for in-flight limits).
"""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from phlora_nim.testing.lora_standin import LoraCache, LoraError, read


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        capacity = int(config["parameters"]["lora_cache_capacity"]["string_value"])
        self.cache = LoraCache(capacity)

    def execute(self, requests: list[object]) -> list[object]:
        responses = []
        for request in requests:
            try:
                x = read(request, "x")
                delay = read(request, "delay_ms")
                if delay is not None:
                    time.sleep(float(delay.reshape(-1)[0]) / 1000.0)
                offsets = self.cache.offsets_of(request, rows=x.shape[0])
                y = (x.astype(np.int64) + offsets.astype(np.int64)).astype(np.int32)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", y)]))
            except LoraError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
