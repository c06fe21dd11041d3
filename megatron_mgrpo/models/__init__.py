"""Megatron models built from Hugging Face configs, and the HF <-> Megatron weight maps."""
