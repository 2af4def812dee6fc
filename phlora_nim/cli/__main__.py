"""``python -m phlora_nim.cli``: the ``phlora-nim`` script."""

from phlora_nim.cli.main import main

main()
