"""Triton Python-backend entry point; the logic lives in the imported class (testable without Triton)."""

import triton_python_backend_utils as pb_utils

from phlora_nim.triton.models.text import PreprocessingModel


class TritonPythonModel(PreprocessingModel):
    pb = pb_utils
