"""Triton Python-backend entry point of ``postprocessing``; the logic is ``phlora_nim.triton_models.text.PostprocessingModel``."""

import triton_python_backend_utils as pb_utils

from phlora_nim.triton_models.text import PostprocessingModel


class TritonPythonModel(PostprocessingModel):
    pb = pb_utils
