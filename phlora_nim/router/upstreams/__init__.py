"""Upstream kinds other than Triton's KServe v2: replicas that speak the OpenAI API (vLLM, NIM 2.x,
SGLang, trtllm-serve), reached through the router's one routing, admission and tenancy path.
"""
