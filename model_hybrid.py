"""CNN front-end + Transformer encoder, for sleep staging from per-epoch wearable features.

Two 1-D convolutions pick up local patterns across neighbouring epochs, a Transformer encoder
with sinusoidal positional encoding relates epochs across the window, and a pooled summary of
the window is joined to every epoch before the classifier. Output: logits for every epoch of
the window. A causal model (config.causal) pads the convolutions on the left only, masks
attention to the past and pools a running mean, so no output depends on a later epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import causal_mask


@dataclass
class HybridConfig:
    n_features: int = 15
    n_classes: int = 4
    channels: int = 64      # CNN width and Transformer model width
    kernel_size: int = 5
    n_layers: int = 3
    n_heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.2
    max_len: int = 512      # longest window the positional encoding covers
    causal: bool = False


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, causal: bool, dropout: float):
        super().__init__()
        self.causal, self.kernel_size = causal, kernel_size
        self.conv = nn.Conv1d(c_in, c_out, kernel_size)
        self.norm = nn.LayerNorm(c_out)  # per epoch, so it cannot leak the future (BatchNorm/GroupNorm would)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        pad = (self.kernel_size - 1, 0) if self.causal else ((self.kernel_size - 1) // 2, self.kernel_size // 2)
        h = self.conv(F.pad(x, pad, mode="replicate"))
        return self.dropout(F.gelu(self.norm(h.transpose(1, 2)).transpose(1, 2)))


class SleepHybrid(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.conv1 = ConvBlock(config.n_features, c, config.kernel_size, config.causal, config.dropout)
        self.conv2 = ConvBlock(c, c, config.kernel_size, config.causal, config.dropout)
        position = torch.arange(config.max_len).unsqueeze(1)
        freq = torch.exp(torch.arange(0, c, 2) * (-math.log(10000.0) / c))
        pe = torch.zeros(config.max_len, c)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("positional", pe, persistent=False)
        layer = nn.TransformerEncoderLayer(c, config.n_heads, c * config.ff_mult, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c)
        self.head = nn.Sequential(nn.Linear(2 * c, c), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(c, config.n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, n_features) -> (batch, seq_len, n_classes) logits."""
        length = x.shape[1]
        h = self.conv2(self.conv1(x.transpose(1, 2))).transpose(1, 2)
        h = h + self.positional[:length]
        mask = causal_mask(length, x.device) if self.config.causal else None
        h = self.norm(self.encoder(h, mask=mask, is_causal=self.config.causal))
        if self.config.causal:  # running mean: the pooled summary only covers the past
            steps = torch.arange(1, length + 1, device=x.device, dtype=h.dtype).view(1, -1, 1)
            pooled = h.cumsum(dim=1) / steps
        else:
            pooled = h.mean(dim=1, keepdim=True).expand_as(h)
        return self.head(torch.cat([h, pooled], dim=-1))
