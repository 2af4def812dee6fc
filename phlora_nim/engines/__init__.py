"""Every engine phlora-nim writes adapters for and routes to, one package each, chosen from one table
(:mod:`phlora_nim.engines.registry`).
"""
