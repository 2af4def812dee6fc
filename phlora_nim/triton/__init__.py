"""Triton at run time: the local server launcher, the CPU reference engine and its LoRA cache, the model classes."""
