"""Subcommands of `rpp-triton`, one module each (see rpp_triton/cli.py)."""
