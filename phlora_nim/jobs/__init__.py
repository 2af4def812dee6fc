"""Offline jobs behind the CLI that write adapter folders atomically, verification and plots."""
