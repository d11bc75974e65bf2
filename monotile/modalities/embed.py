"""Sentence embeddings from a bidirectional text encoder (BERT, MiniLM), as sentence-transformers
computes them:

    h = Encoder(tokens)                          (B, T, d), padding masked out of attention
    e = sum_t m_t h_t / sum_t m_t                mean over the real tokens (m = 1, padding 0)
    e = e / ||e||_2                              unit length, so e . e' is the cosine

The encoder is the same trunk as every other model, bidirectional, with BERT's post-norm blocks
and the norm over the embeddings; token types (BERT's segment embedding) are added to the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.transformer import ModelConfig, Transformer


class TextEncoder(nn.Module):
    """Token (+ token type) embeddings -> bidirectional trunk -> hidden states (B, T, d)."""

    def __init__(self, cfg: ModelConfig, type_vocab: int = 0, pooler: bool = False):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.type_emb = nn.Embedding(type_vocab, cfg.d_model) if type_vocab else None
        self.trunk = Transformer(cfg)
        # BERT's pooler (tanh of a linear map of the first token) rides along for export only
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if pooler else None

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_emb(idx)
        if self.type_emb is not None:
            types = torch.zeros_like(idx) if token_types is None else token_types
            x = x + self.type_emb(types)
        padding = None if attention_mask is None else attention_mask.bool()
        return self.trunk(x, causal=False, key_padding=padding)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real tokens of each row, then unit length."""
    m = mask.to(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=-1)


@torch.no_grad()
def embed_texts(model: TextEncoder, tokenizer, texts: list[str], *, max_tokens: int,
                batch_size: int = 32, pad_id: int = 0, progress: bool = False) -> torch.Tensor:
    """(N, d) unit-length embeddings of `texts`, in batches of similar length; with
    `progress`, a bar over the texts on a terminal."""
    from tqdm.auto import tqdm
    tok = tokenizer.tok  # Hugging Face tokenizers: cut to max_tokens keeping [CLS] and [SEP]
    tok.enable_truncation(max_tokens)
    try:
        ids = [e.ids for e in tok.encode_batch(list(texts))]
    finally:
        tok.no_truncation()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding per batch
    out = torch.empty(len(ids), model.tok_emb.embedding_dim)
    if model.training:  # eval() walks every module: ~0.9 ms, an eighth of a sentence's time
        model.eval()
    bar = tqdm(total=len(order), desc="embed", unit="text",
               disable=None if progress and len(order) > batch_size else True)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        batch, mask = batch.to(device), mask.to(device)
        padded = any(len(ids[i]) < width for i in rows)  # none: attention needs no mask
        out[rows] = mean_pool(model(batch, mask if padded else None), mask).float().cpu()
        bar.update(len(rows))
    bar.close()
    return out
