"""Offline half of phlora-nim: checkpoints in, LoRA adapters and reports out.

Nothing here imports ``phlora_nim``; the serving side builds on these modules.
"""

from converters.errors import InputError, OptionError, OutputError, PhloraError

__all__ = ["InputError", "OptionError", "OutputError", "PhloraError"]
