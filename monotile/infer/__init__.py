"""Decoding: sampling with a KV cache."""

# what `optimize_for_inference` (and --dtype of generate, chat and serve) makes each weight
INFERENCE_DTYPES = ("float32", "bfloat16", "int8", "int4")
