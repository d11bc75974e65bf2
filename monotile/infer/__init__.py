"""Decoding: sampling with a KV cache."""

# what `optimize_for_inference` (and --dtype of generate, chat and serve) makes each weight
INFERENCE_DTYPES = ("float32", "bfloat16", "int8", "int4")

# --compile of generate and chat (infer/generate.py compile_decoding)
COMPILE_HELP = ("compile the decoding step (torch.compile, needs g++): ~40 s at the start (less "
                "once cached), then faster tokens, most in int4 and int8 "
                "(bench/real_models.py --compile)")
