"""Output formats of an adapter: PEFT, TensorRT-LLM tensors and the NIM adapter store (a writer and a reader each)."""
