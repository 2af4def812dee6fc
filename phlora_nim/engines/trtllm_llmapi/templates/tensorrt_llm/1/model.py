"""Triton Python-backend entry of phlora-nim's CPU reference of the llmapi model (logic importable without Triton)."""

import triton_python_backend_utils as pb_utils

from phlora_nim.engines.trtllm_llmapi.reference_model import LlmapiReferenceModel


class TritonPythonModel(LlmapiReferenceModel):
    pb = pb_utils
