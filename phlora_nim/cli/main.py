"""The ``phlora-nim`` app with every command group registered, and its entry point.

Run it as the ``phlora-nim`` script or ``python -m phlora_nim.cli``.
"""

from __future__ import annotations

from phlora_nim.cli import adapter_commands, repository_commands, serving_commands
from phlora_nim.cli.app import app, run_app

for _group in (adapter_commands, repository_commands, serving_commands):
    _group.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``phlora-nim`` script."""
    run_app(argv)
