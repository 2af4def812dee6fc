"""Testing a deployment without an LLM: a stand-in LoRA model for router tests and benchmarks."""
