"""Interoperation with other model formats (Hugging Face)."""
