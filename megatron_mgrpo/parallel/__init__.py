"""Distributed initialisation and the CPU adaptation of megatron-core."""
