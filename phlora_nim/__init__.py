"""phlora-nim: post-hoc LoRA adapters from full fine-tunes, served from one Triton engine."""

__version__ = "0.1.0"
