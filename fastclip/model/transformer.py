"""The residual attention block and transformer stack shared by the image (ViT) and text towers.

Parameter names are OpenAI CLIP's (`attn.in_proj_weight`, `attn.out_proj.*`, `ln_1`, `mlp.c_fc`,
`mlp.c_proj`, `ln_2`), so its checkpoints and open_clip's load without renaming. Activations are
batch-first, (B, S, W), unlike OpenAI's (S, B, W): the attention op wants [B, H, S, Dh] views, and
those are free from a batch-first fused qkv projection.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastclip.backends import check_attention_backend
from fastclip.ops.attention import attention_packed


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input dtype (under autocast F.layer_norm returns fp32).

    PyTorch's kernels accumulate low-precision inputs in fp32 already, so no explicit upcast is needed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {name!r}")


class PackedTokens(NamedTuple):
    """Which tokens of a [batch, seq] layout a forward keeps, as the rows [T] of a packed tensor."""

    index: torch.Tensor  # (T,) each packed row's position in the flattened (batch * seq) layout
    lengths: torch.Tensor  # (batch,) int32: sequence b keeps its first lengths[b] positions
    batch: int
    seq: int


def pack_tokens(lengths: torch.Tensor, seq: int, total: int) -> PackedTokens:
    """The first lengths[b] positions of each of the len(lengths) sequences, in order. `total` is
    lengths.sum(), which the caller has read already: no device sync here."""
    batch = lengths.shape[0]
    owner = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths, output_size=total)  # (T,)
    first = lengths.cumsum(0) - lengths  # (B,) each sequence's first packed row
    position = torch.arange(total, device=lengths.device) - first[owner]
    return PackedTokens(owner * seq + position, lengths, batch, seq)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameters, computed by `fastclip.ops.attention_packed`."""

    def __init__(self, width: int, heads: int, *, causal: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads, self.causal, self.backend = heads, causal, check_attention_backend(backend)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's default init
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3W)
        return self.out_proj(self._attend(qkv, key_padding_mask, lengths))

    def forward_packed(self, x: torch.Tensor, tokens: PackedTokens) -> torch.Tensor:
        """x (T, W), the kept tokens only -> (T, W): no projection runs for a position past its sequence."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (T, 3W)
        # The attention takes the [B, S] layout; the zeros past each length are never attended to.
        padded = qkv.new_zeros(tokens.batch * tokens.seq, qkv.shape[1]).index_copy(0, tokens.index, qkv)
        out = self._attend(padded.view(tokens.batch, tokens.seq, -1), None, tokens.lengths)  # (B, S, W)
        return self.out_proj(out.flatten(0, 1).index_select(0, tokens.index))

    def _attend(
        self, qkv: torch.Tensor, key_padding_mask: torch.Tensor | None, lengths: torch.Tensor | None
    ) -> torch.Tensor:
        """qkv (B, S, 3W) -> the heads' outputs (B, S, W), before the output projection."""
        batch, seq, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        qkv = qkv.view(batch, seq, 3, self.heads, width // self.heads)  # (B, S, 3, H, Dh)
        # The packed entry point: on Triton its gradient is one (B, S, 3, H, Dh) tensor the kernels write,
        # not three that autograd stacks; SDPA gets the q, k, v views as before.
        out = attention_packed(
            qkv, causal=self.causal, key_padding_mask=key_padding_mask, lengths=lengths, backend=self.backend
        )  # (B, H, S, Dh)
        return out.transpose(1, 2).reshape(batch, seq, width)  # free for the Triton output layout


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "quick_gelu",
        causal: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads, causal=causal, backend=backend)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", make_activation(act)),  # named "gelu" in OpenAI's code whichever it is (no parameters)
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_padding_mask, lengths)
        return x + self.mlp(self.ln_2(x))

    def forward_packed(self, x: torch.Tensor, tokens: PackedTokens) -> torch.Tensor:
        """x (T, W), the kept tokens only -> (T, W)."""
        x = x + self.attn.forward_packed(self.ln_1(x), tokens)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks, optionally gradient-checkpointed block by block."""

    def __init__(self, width: int, layers: int, heads: int, **block_options: Any) -> None:
        """`block_options`: each ResidualAttentionBlock's keywords (mlp_ratio, act, causal, backend)."""
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, **block_options) for _ in range(layers))

    def init_weights(self) -> None:
        """OpenAI's init: std width^-0.5 for q/k/v, scaled down by depth for the residual projections."""
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, S, W) -> (B, S, W). `lengths` [B] ends each sequence: attention skips the positions past
        it, whose outputs are then not those of the full sequence (see `fastclip.ops.attention`)."""
        return self._run(list(self.resblocks), x, key_padding_mask, lengths)

    def forward_packed(self, x: torch.Tensor, tokens: PackedTokens) -> torch.Tensor:
        """x (T, W), the tokens `tokens` keeps of a [B, S] batch -> (T, W): every block runs on the kept
        tokens only, and the attention of each sequence ends at its length."""
        return self._run([block.forward_packed for block in self.resblocks], x, tokens)

    def _run(self, blocks: list, x: torch.Tensor, *args: Any) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations in the backward.
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x
