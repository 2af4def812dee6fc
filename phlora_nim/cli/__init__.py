"""The ``phlora-nim`` command line, one module per command group."""

from phlora_nim.cli.main import app, main

__all__ = ["app", "main"]
