"""Offline half of phlora-nim: checkpoints in, LoRA adapters and reports out.

It builds only on ``phlora_nim.core`` (errors, dtypes, atomic writes, JSON files, names): the serving
side builds on these modules, never the other way round (tested).
"""
