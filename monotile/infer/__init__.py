"""Decoding: sampling with a KV cache."""
