"""The text tower: token + positional embedding -> causal transformer -> ln_final -> the end-of-text
token's feature -> projection.

Batches are trimmed to their longest text before the transformer. This changes no feature: with the
causal mask a token only sees tokens before it, the pooled end-of-text token is at or before the last
non-zero token of its row, and padding (id 0) comes only after it. Captions average 15-20 of 77
tokens, so this saves most of the text tower's work.

For the same reason nothing after a caption's end-of-text token is computed at all: the tokens up to
each end-of-text token are packed into one [T, W] tensor that every projection, MLP and LayerNorm runs
on, and the attention (which takes the [B, S] layout back) ends each row at its own end-of-text token,
skipping every tile past it. Captions average ~18 of 77 tokens, so most of the tower's work goes.
`trim=False` runs every position instead, with the same features.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip.model.config import TextConfig
from fastclip.model.transformer import LayerNorm, Transformer, pack_tokens


def _batch_stats(text: torch.Tensor, lengths: torch.Tensor) -> tuple[int, int, int, int]:
    """(1 + the position of the last non-zero token over the batch, min id, max id, the sum of `lengths`):
    all that the host needs to know of a batch, in one device sync."""
    positions = torch.arange(1, text.shape[1] + 1, device=text.device)  # (S,)
    last = ((text != 0) * positions).amax()
    stats = torch.stack([last, text.amin().long(), text.amax().long(), lengths.sum().long()]).tolist()
    length, low, high, kept = stats
    return max(length, 1), low, high, kept


def end_of_text_lengths(text: torch.Tensor) -> torch.Tensor:
    """Each row's end-of-text position + 1 (the end-of-text token has the highest id), as int32: the
    attention kernels' index type, converted once rather than in every layer."""
    return (text.argmax(dim=-1) + 1).to(torch.int32)


def trimmed_length(text: torch.Tensor) -> int:
    """1 + the position of the last non-zero token over the batch (at least 1). Syncs with the device."""
    return _batch_stats(text, end_of_text_lengths(text))[0]


class TextTransformer(nn.Module):
    """The text tower, with OpenAI's flat parameter names (`token_embedding`, `positional_embedding`,
    `transformer`, `ln_final`, `text_projection`). `CLIP` extends this class rather than holding it as
    a submodule, so that those names sit at the top level of its state dict, as in OpenAI's checkpoints.
    """

    def __init__(self, cfg: TextConfig, embed_dim: int, *, act: str = "quick_gelu", backend: str = "auto") -> None:
        super().__init__()
        self.context_length, self.vocab_size = cfg.context_length, cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=act, causal=True, backend=backend
        )
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        # OpenAI's init
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_weights()

    def encode_text(self, text: torch.Tensor, normalize: bool = True, trim: bool = True) -> torch.Tensor:
        """token ids (B, S <= context_length), 0-padded after the end-of-text token -> (B, embed_dim).

        L2-normalised unless `normalize=False`. `trim=False` runs all S positions (same result, slower).
        """
        self._check_text(text)
        lengths = end_of_text_lengths(text)  # (B,)
        length, low, high, kept = _batch_stats(text, lengths)
        if low < 0 or high >= self.vocab_size:  # checked here: on a GPU the embedding would assert
            raise ValueError(f"text token ids must lie in [0, {self.vocab_size}), got ids from {low} to {high}")
        pooled = self._packed(text[:, :length], lengths, kept) if trim else self._dense(text, lengths)
        x = self.ln_final(pooled) @ self.text_projection  # (B, embed_dim)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def _packed(self, text: torch.Tensor, lengths: torch.Tensor, kept: int) -> torch.Tensor:
        """Each caption's end-of-text feature (B, W), from its `kept` tokens up to it only."""
        tokens = pack_tokens(lengths, text.shape[1], kept)
        positions = tokens.index % text.shape[1]
        x = self.token_embedding(text.flatten().index_select(0, tokens.index)) + self.positional_embedding[positions]
        x = self.transformer.forward_packed(x.to(self.text_projection.dtype), tokens)  # (T, W)
        return x.index_select(0, lengths.cumsum(0) - 1)  # a caption's end-of-text token is its last kept one

    def _dense(self, text: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each caption's end-of-text feature (B, W), running every position of the [B, S] batch."""
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]  # (B, S, W)
        x = self.transformer(x.to(self.text_projection.dtype), lengths=lengths)
        return x[torch.arange(x.shape[0], device=x.device), lengths.long() - 1]

    def _check_text(self, text: torch.Tensor) -> None:
        if not isinstance(text, torch.Tensor):
            raise TypeError(f"text must be a tensor of token ids, got {type(text).__name__}")
        if text.dim() != 2 or text.shape[0] == 0 or text.shape[1] == 0:
            raise ValueError(
                f"text must be a non-empty [batch, seq] tensor of token ids, got shape {tuple(text.shape)}"
            )
        if text.dtype.is_floating_point or text.dtype.is_complex or text.dtype == torch.bool:
            raise TypeError(f"text must hold integer token ids, got {text.dtype}")
        if text.shape[1] > self.context_length:
            raise ValueError(
                f"text has {text.shape[1]} tokens per row, more than this model's context_length "
                f"{self.context_length}; tokenize with context_length={self.context_length}"
            )
