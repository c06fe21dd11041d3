"""A stand-in `sglang` package for tests: only `python -m sglang.launch_server` (see launch_server.py)."""
