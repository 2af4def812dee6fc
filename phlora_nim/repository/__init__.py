"""The Triton model repository: its layout, the adapter registry, config.pbtxt generation and ``convert``."""
