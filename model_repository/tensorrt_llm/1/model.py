"""Triton Python-backend entry point of ``tensorrt_llm``; the logic is ``phlora_nim.triton_models.reference_llm.ReferenceLlmModel``."""

import triton_python_backend_utils as pb_utils

from phlora_nim.triton_models.reference_llm import ReferenceLlmModel


class TritonPythonModel(ReferenceLlmModel):
    pb = pb_utils
