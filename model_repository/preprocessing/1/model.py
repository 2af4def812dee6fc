"""Triton Python-backend entry point of ``preprocessing``; the logic is ``phlora_nim.triton_models.text.PreprocessingModel``."""

import triton_python_backend_utils as pb_utils

from phlora_nim.triton_models.text import PreprocessingModel


class TritonPythonModel(PreprocessingModel):
    pb = pb_utils
