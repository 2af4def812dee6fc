"""Offline half of phlora-nim: checkpoints in, LoRA adapters and reports out.

Nothing here imports the rest of ``phlora_nim`` (repository, triton, router, jobs, cli, demo): the
serving side builds on these modules, never the other way round (tested).
"""

from phlora_nim.converters.errors import InputError, OptionError, OutputError, PhloraError

__all__ = ["InputError", "OptionError", "OutputError", "PhloraError"]
