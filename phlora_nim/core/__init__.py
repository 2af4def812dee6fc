"""The kernel every layer of phlora-nim uses: the error hierarchy, the dtype table, atomic writes,
JSON files and adapter names. It imports nothing else of ``phlora_nim`` (tested) and no torch at
import time, so the router, the Triton models and the offline half can all build on it.
"""

from phlora_nim.core.errors import InputError, OptionError, OutputError, PhloraError

__all__ = ["InputError", "OptionError", "OutputError", "PhloraError"]
