"""Triton Python-backend entry point; the logic lives in the imported class (testable without Triton)."""

import triton_python_backend_utils as pb_utils

from phlora_nim.triton.models.text import PostprocessingModel


class TritonPythonModel(PostprocessingModel):
    pb = pb_utils
