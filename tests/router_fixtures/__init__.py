"""Fixtures of the router tests: a stand-in Triton repository and a tiny adapter registry."""
