"""Hugging Face <-> megatron-core conversion for policies and Global Value Models."""
