"""Named recipes: a task, model dimensions and training settings, as plain data.

Every field can be overridden by name with `--set key=value` (or `overrides=` in Python).
"""

from __future__ import annotations

# the model and schedule of the small series presets (co2, sunspots)
_SMALL_SERIES = {
    "task": "series",
    "model": dict(n_layer=2, n_head=4, d_model=32, d_ff=64, positions="none", norm="layernorm",
                  mlp="gelu", bias=True, dropout=0.2),
    "train": dict(max_steps=1000, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_steps=50,
                  beta2=0.99, weight_decay=0.05, grad_clip=1.0, eval_interval=250),
}

# M4's frequencies: (horizon, seasonal period), as the competition scores them (the same
# table as monotile/modalities/series_formats.M4, which presets may not import)
_M4 = {"yearly": (6, 1), "quarterly": (8, 4), "monthly": (18, 12), "weekly": (13, 1),
       "daily": (14, 1), "hourly": (48, 24)}


def _m4(frequency: str, **series) -> dict:
    """One global model over an M4 frequency's series: RevIN normalises each window and its
    loss, no global scaling; scored by sMAPE, MASE and OWA against Naive2."""
    horizon, season = _M4[frequency]
    return {
        "task": "series",
        "model": dict(n_layer=3, n_head=4, d_model=64, d_ff=128, positions="none",
                      norm="layernorm", mlp="gelu", bias=True, dropout=0.1),
        "train": dict(max_steps=3000, batch_size=256, lr=1e-3, min_lr=1e-5, warmup_steps=100,
                      beta2=0.99, weight_decay=0.05, grad_clip=1.0, eval_interval=500),
        "series": dict(data=f"m4-{frequency}", horizon=horizon, season=season, scale=False,
                       **series),
    }


PRESETS: dict[str, dict] = {
    # nanoGPT's CPU "baby GPT" (config/train_shakespeare_char.py with the README's CPU flags):
    # 4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps, AdamW 1e-3 -> 1e-4
    # cosine after 100 warmup steps, beta2 0.99, no dropout, a character vocabulary. One change,
    # of the kind the recipe leaves open: rotary positions instead of learned ones (same size
    # and compute; validation loss 1.78 instead of 1.89 after the same 2000 steps).
    "shakespeare-char": {
        "task": "text",
        "model": dict(n_layer=4, n_head=4, d_model=128, context=64, dropout=0.0, bias=False,
                      norm="layernorm", mlp="gelu", positions="rope", tie_embeddings=True),
        "train": dict(max_steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                      beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=500),
        "text": dict(data="tinyshakespeare/input.txt", tokenizer="char"),
    },
    # A Llama-style trunk (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases) on a
    # byte-level BPE of ~4k tokens trained on the public-domain speeches.
    "speeches-bpe": {
        "task": "text",
        "model": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=192, context=128, dropout=0.0,
                      bias=False, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", positions="rope",
                      tie_embeddings=True),
        "train": dict(max_steps=2000, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=100,
                      beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=500),
        "text": dict(data="speeches/speeches_public_domain.txt", tokenizer="bpe",
                     bpe_vocab=4096),
    },
    # GPT-2 small (124M) as karpathy/build-nanogpt's train_gpt2.py reproduces it: 12 layers, 12
    # heads, width 768, context 1024, learned positions, LayerNorm, GPT-2's tanh GELU, biases,
    # tied embeddings, no dropout; 524,288 tokens a step (64 sequences x 1024 x grad_accum 8),
    # AdamW lr 6e-4 with betas (0.9, 0.95), weight decay 0.1, clipping at 1.0, 715 warmup steps
    # then a cosine to 6e-5 at step 19,073: 10B tokens, one epoch of FineWeb-Edu's sample-10BT.
    # vocab_size is GPT-2's 50,257 padded to 50,304 (a multiple of 64, as nanoGPT pads it) for
    # `explain --preset`; training sizes the embedding to the tokenizer, a byte-level BPE of
    # 50,257 tokens trained on the data (no package here ships GPT-2's own merges). bf16
    # autocast on GPUs (dtype=auto) and torch.compile; on a CPU, --set compile=false. The plan
    # for one 8-GPU node: docs/scaling.md.
    "gpt2-124m": {
        "task": "text",
        "model": dict(vocab_size=50304, n_layer=12, n_head=12, d_model=768, context=1024,
                      positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True,
                      tie_embeddings=True, dropout=0.0),
        "train": dict(max_steps=19073, batch_size=64, grad_accum=8, lr=6e-4, min_lr=6e-5,
                      warmup_steps=715, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0,
                      eval_interval=250, log_interval=10, compile=True),
        "text": dict(data="fineweb-edu-10BT", tokenizer="bpe", bpe_vocab=50257,
                     eval_tokens=10 * 2**20),
    },
    # A small ViT on scikit-learn's 8x8 digits, shown at 16x16: a two-layer convolutional stem
    # makes a 4x4 grid of tokens (and a CLS token); small random rotations, shifts and zooms,
    # label smoothing, a moving average of the weights. 99.4 % on the stratified 80/20 split
    # (seed 0) in 50 s on 2 cores.
    "digits": {
        "task": "vision",
        "model": dict(n_layer=4, n_head=4, d_model=64, d_ff=128, positions="none",
                      norm="layernorm", mlp="gelu", bias=True, dropout=0.0),
        "train": dict(max_steps=1000, batch_size=64, lr=2e-3, min_lr=1e-5, warmup_steps=100,
                      beta2=0.99, weight_decay=0.05, grad_clip=1.0, eval_interval=500,
                      ema=0.99),
        "vision": dict(data="digits", image_size=16, channels=1, patch_size=4, stem="conv",
                       rotate=8, shift=0.08, scale=0.08, label_smoothing=0.1),
    },
    # A ViT on MNIST with a convolutional stem: three 3x3 stride-2 convolutions turn the image,
    # resized to 32x32, into a 4x4 grid of tokens (and a CLS token), each seeing an overlapping
    # neighbourhood; small random rotations, shifts and zooms, label smoothing and a moving
    # average of the weights. 99.1 % test accuracy in 13 minutes of training on 2 cores.
    "mnist": {
        "task": "vision",
        "model": dict(n_layer=6, n_head=4, d_model=128, d_ff=256, positions="none",
                      norm="layernorm", mlp="gelu", bias=True, dropout=0.0),
        "train": dict(max_steps=3500, batch_size=128, lr=2e-3, min_lr=1e-5, warmup_steps=200,
                      beta2=0.99, weight_decay=0.05, grad_clip=1.0, eval_interval=700,
                      ema=0.999),
        "vision": dict(data="mnist", image_size=32, channels=1, patch_size=8, stem="conv",
                       rotate=10, shift=0.06, scale=0.1, label_smoothing=0.1),
    },
    # Character CTC on the Free Spoken Digit Dataset at its own 8 kHz: 40 log-mel bins every
    # 10 ms, one gain per utterance (per-bin CMVN erases a short word's spectrum), two frames
    # per token, a small bidirectional trunk with rotary positions, speed perturbation,
    # FilterAugment (another microphone's colour), stochastic depth and a moving average of
    # the weights. Beam search spells only the ten digit words (a closed vocabulary: the
    # command-and-control use).
    "fsdd": {
        "task": "speech",
        "model": dict(n_layer=4, n_head=4, d_model=128, d_ff=256, positions="rope",
                      norm="layernorm", mlp="gelu", bias=True, dropout=0.0, drop_path=0.3),
        "train": dict(max_steps=2000, batch_size=32, lr=1.5e-3, min_lr=1e-5, warmup_steps=200,
                      beta2=0.98, weight_decay=0.1, grad_clip=1.0, eval_interval=500,
                      ema=0.995),
        "speech": dict(data="fsdd", sample_rate=8000, n_fft=200, hop=80, n_mels=40,
                       subsample=2, max_seconds=10.0, normalize="gain", speed=0.1,
                       filter_db=12.0, decode="beam", beam_width=8, closed_vocabulary=True),
    },
    # PatchTST/42's ETTh1 recipe (Nie et al. 2023, scripts/PatchTST/etth1.sh): look-back 336,
    # patches of 16 every 8, 3 layers, 4 heads, width 16, MLP 128, dropout 0.3, learned
    # positions; channel independence. A batch is 256 (window, channel) pairs, 1500 steps at
    # lr 3e-4 (PatchTST: 896 pairs at 1e-4, early-stopped). Pre-norm LayerNorm blocks instead
    # of PatchTST's post-norm BatchNorm, and a quantile head trained with the pinball loss plus
    # half the MSE of the median (ETTh1 is scored by MSE; the pinball loss alone scores
    # 0.39-0.40, see docs/principles/forecasting.md).
    "etth1": {
        "task": "series",
        "model": dict(n_layer=3, n_head=4, d_model=16, d_ff=128, positions="none",
                      norm="layernorm", mlp="gelu", bias=True, dropout=0.3),
        "train": dict(max_steps=1500, batch_size=256, lr=3e-4, min_lr=3e-6, warmup_steps=100,
                      beta2=0.99, weight_decay=0.05, grad_clip=1.0, eval_interval=250),
        "series": dict(data="etth1", lookback=336, horizon=96, patch_len=16, stride=8,
                       season=24, head_dropout=0.0, mse_weight=0.5),
    },
    # One global model over M4's 359 weekly series (horizon 13): each window is normalised by
    # its own mean and std (RevIN), and so is its loss; no global scaling.
    "m4-weekly": _m4("weekly", lookback=52, patch_len=8, stride=4),
    # The other five M4 frequencies with the weekly recipe and the competition's horizon and
    # season: a look-back of two horizons for the short yearly, quarterly and monthly series
    # (quarterly, on bench/m4.py's 286 series: OWA 0.934 at 16 against 1.096 at 32), of 6-7
    # for the long daily and hourly ones, in patches of about a season. Their files
    # (m4/<Frequency>-train.csv and -test.csv) are not downloaded: put them under the data
    # root, or pass the -train.csv with --data.
    "m4-yearly": _m4("yearly", lookback=12, patch_len=4, stride=2),
    "m4-quarterly": _m4("quarterly", lookback=16, patch_len=4, stride=2),
    "m4-monthly": _m4("monthly", lookback=36, patch_len=12, stride=6),
    "m4-daily": _m4("daily", lookback=84, patch_len=14, stride=7),
    "m4-hourly": _m4("hourly", lookback=336, patch_len=24, stride=12),
    # statsmodels' bundled series, the last 20 % in time order for test and the 10 % before
    # it for validation; small models for small data (1,300 and 160 training windows).
    "co2": dict(_SMALL_SERIES, series=dict(data="co2", lookback=208, horizon=52, patch_len=16,
                                           stride=8, season=52, val_fraction=0.1,
                                           test_fraction=0.2)),
    "sunspots": dict(_SMALL_SERIES, series=dict(data="sunspots", lookback=44, horizon=11,
                                                patch_len=4, stride=2, season=11,
                                                val_fraction=0.1, test_fraction=0.2)),
}
