"""Bidirectional LSTM + attention over time, for sleep staging from per-epoch wearable features.

Input: a window of SEQ_LEN epochs x n_features (standardised). Output: stage logits for every
epoch of the window; the caller reads the stated target epoch (the window's centre offline,
its last epoch for real-time use). A causal model (config.causal) uses a one-directional LSTM
and masked attention, so each epoch's output depends only on that epoch and earlier ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LSTMConfig:
    n_features: int = 15
    n_classes: int = 4
    hidden: int = 256      # LSTM output width (both directions together when bidirectional)
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.25
    causal: bool = False   # True: one-directional LSTM and masked attention (real-time use)
    lookahead: int = 0     # the revision: position t also stages epochs t-1 .. t-lookahead (see forward)
    revision_span: int = 1  # the revision of epoch t: the mean over the windows t+lookahead-span+1 .. t+lookahead
    pool: int = 1          # offline: the LSTM and attention run on means of `pool` epochs (whole nights)


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """Boolean attention mask: True where position i may NOT look at position j (j > i)."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)


def check_revision_span(lookahead: int, span: int) -> None:
    """ValueError unless a revision can average `span` windows: 1 .. lookahead + 1 (lags lookahead - span + 1 .. lookahead)."""
    if not 1 <= span <= lookahead + 1:
        raise ValueError(f"revision_span must be 1 .. lookahead + 1 = {lookahead + 1}, got {span}")


def lag_logits(logits: torch.Tensor, n_classes: int, lags: bool) -> torch.Tensor:
    """A head's output (..., n_classes * (1 + lookahead)): lag 0 (the epoch itself), or every lag
    (..., 1 + lookahead, n_classes)."""
    return logits.unflatten(-1, (-1, n_classes)) if lags else logits[..., :n_classes]


def pool_epochs(h: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, L, C) -> (B, ceil(L / pool), C): means of `pool` epochs (the last group padded by repetition)."""
    return F.avg_pool1d(F.pad(h.transpose(1, 2), (0, -h.shape[1] % pool), mode="replicate"), pool).transpose(1, 2)


def unpool_epochs(tokens: torch.Tensor, pool: int, length: int) -> torch.Tensor:
    """pool_epochs' inverse in shape: each token's output back on each of its `length` epochs."""
    return tokens.repeat_interleave(pool, dim=1)[:, :length]


class SleepLSTM(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        h = config.hidden
        if config.causal and config.pool > 1:
            raise ValueError("pool > 1 mixes later epochs into each step: offline models only")
        check_revision_span(config.lookahead, config.revision_span)
        per_direction = h if config.causal else h // 2
        self.input_proj = nn.Linear(config.n_features, h)
        self.lstms = nn.ModuleList(
            nn.LSTM(h, per_direction, batch_first=True, bidirectional=not config.causal)
            for _ in range(config.n_layers))
        self.lstm_norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(config.n_layers))
        self.attention = nn.MultiheadAttention(h, config.n_heads, dropout=config.dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(h)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Sequential(nn.Linear(h, h // 2), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(h // 2, config.n_classes * (1 + config.lookahead)))

    def forward(self, x: torch.Tensor, lags: bool = False) -> torch.Tensor:
        """(batch, seq_len, n_features) -> (batch, seq_len, n_classes) logits; with lags,
        (batch, seq_len, 1 + lookahead, n_classes): [:, t, j] stages epoch t - j from inputs up to t."""
        h = self.input_proj(x)
        length, pool = x.shape[1], self.config.pool
        epochs = h
        if pool > 1:  # a night of ~1,000 epochs as ~250 steps: 4x fewer sequential LSTM steps
            h = pool_epochs(h, pool)
        for lstm, norm in zip(self.lstms, self.lstm_norms):
            out, _ = lstm(h)
            h = norm(h + self.dropout(out))  # residual keeps gradients flowing through depth
        mask = causal_mask(h.shape[1], x.device) if self.config.causal else None
        attended, _ = self.attention(h, h, h, attn_mask=mask, need_weights=False)
        h = self.attention_norm(h + self.dropout(attended))
        if pool > 1:  # back to epochs; each adds its own projected input
            h = unpool_epochs(h, pool, length) + epochs
        return lag_logits(self.head(h), self.config.n_classes, lags)

    def forward_last(self, x: torch.Tensor, lags: bool = False) -> torch.Tensor:
        """forward(x, lags)[:, -1] in eval mode: (batch, seq_len, n_features) -> (batch, n_classes) logits
        (with lags: (batch, 1 + lookahead, n_classes)).

        Only the last position's query is attended and classified (keys and values still come from
        every position). The last query may look at every position, causal or not: no mask.
        """
        if self.config.pool > 1:
            return self.forward(x, lags)[:, -1]
        h = self.input_proj(x)
        for lstm, norm in zip(self.lstms, self.lstm_norms):
            out, _ = lstm(h)
            h = norm(h + out)
        last = h[:, -1:]
        attended, _ = self.attention(last, h, h, need_weights=False)
        return lag_logits(self.head(self.attention_norm(last + attended))[:, 0], self.config.n_classes, lags)
