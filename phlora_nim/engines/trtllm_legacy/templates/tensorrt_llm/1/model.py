"""Triton Python-backend entry point; the logic lives in the imported class (testable without Triton)."""

import triton_python_backend_utils as pb_utils

from phlora_nim.engines.trtllm_legacy.reference_model import ReferenceLlmModel


class TritonPythonModel(ReferenceLlmModel):
    pb = pb_utils
