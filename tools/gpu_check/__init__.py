"""GPU check kit: a one-call check of the GPU path, prepared on CPU (see docs/gpu-check.md)."""
