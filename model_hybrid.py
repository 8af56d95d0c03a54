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

from model import causal_mask, check_revision_span, lag_logits, pool_epochs, unpool_epochs


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
    max_len: int = 512      # positions whose encoding is precomputed (longer sequences compute theirs)
    causal: bool = False
    pool: int = 1           # offline: the Transformer sees means of `pool` epochs (a whole night is ~1,000 epochs)
    dilated: int = 0        # residual conv blocks after the first two, dilations 2, 4, 8, ...
    lookahead: int = 0      # the revision: position t also stages epochs t-1 .. t-lookahead (model.lag_logits)
    revision_span: int = 1  # the revision of epoch t: the mean over the windows t+lookahead-span+1 .. t+lookahead
    summary_epochs: int = 0  # causal: the pooled summary is the mean since the start (0), or a mean whose weights
                             # decay with a time constant of this many epochs (causal_summary)


def sinusoid(length: int, channels: int) -> torch.Tensor:
    """Sinusoidal positional encoding (length, channels)."""
    position = torch.arange(length).unsqueeze(1)
    freq = torch.exp(torch.arange(0, channels, 2) * (-math.log(10000.0) / channels))
    pe = torch.zeros(length, channels)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
    return pe


def causal_summary(h: torch.Tensor, summary_epochs: int = 0) -> torch.Tensor:
    """A causal model's pooled summary at every position of h (B, L, C): the mean of the outputs so far, or
    with summary_epochs N > 0 their mean weighted by d ** (t - s), d = 1 - 1 / N, so the summary follows
    the last hours rather than the whole night. (The same sums step_members carries one epoch at a time.)"""
    length = h.shape[1]
    if summary_epochs <= 0:
        return h.cumsum(dim=1) / torch.arange(1, length + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
    decay = 1.0 - 1.0 / summary_epochs
    sums, carry = [], h.new_zeros(h.shape[0], 1, h.shape[2], dtype=torch.float64)
    for start in range(0, length, 512):  # blocks keep decay ** -t finite in float64
        block = h[:, start:start + 512].double()
        t = torch.arange(block.shape[1], device=h.device, dtype=torch.float64).view(1, -1, 1)
        block_sums = (block * decay ** -t).cumsum(dim=1) * decay ** t + carry * decay ** (t + 1)
        carry = block_sums[:, -1:]
        sums.append(block_sums)
    t = torch.arange(1, length + 1, device=h.device, dtype=torch.float64).view(1, -1, 1)
    return (torch.cat(sums, dim=1) * (1 - decay) / (1 - decay ** t)).to(h.dtype)


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, causal: bool, dropout: float, dilation: int = 1):
        super().__init__()
        self.causal, self.kernel_size, self.dilation = causal, kernel_size, dilation
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation)
        self.norm = nn.LayerNorm(c_out)  # per epoch, so it cannot leak the future (BatchNorm/GroupNorm would)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        span = (self.kernel_size - 1) * self.dilation
        pad = (span, 0) if self.causal else (span // 2, span - span // 2)
        h = self.conv(F.pad(x, pad, mode="replicate"))
        return self.dropout(F.gelu(self.norm(h.transpose(1, 2)).transpose(1, 2)))

    def forward_channels_last(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """forward in eval mode on (B, L, C) as one matmul (im2col): no transposes, and cheaper than
        the convolution kernel at these sizes. pad=False: only the L - kernel_size + 1 positions
        whose inputs all lie in x (no padding), (B, L - (kernel_size - 1) * dilation, C)."""
        k, length, span = self.kernel_size, x.shape[1], (self.kernel_size - 1) * self.dilation
        taps = torch.arange(k) * self.dilation
        if pad:  # replicate padding, as forward: clamp the indices
            left = span if self.causal else span // 2
            index = (torch.arange(length).unsqueeze(1) + taps - left).clamp_(0, length - 1)
        else:
            index = torch.arange(length - span).unsqueeze(1) + taps
        out_len = index.shape[0]
        cols = x.index_select(1, index.flatten().to(x.device)).reshape(-1, k * x.shape[2])  # (B*out_len, k*C_in)
        weight = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, -1)     # same (tap, channel) order
        h = torch.addmm(self.conv.bias, cols, weight.t())
        return F.gelu(self.norm(h)).view(x.shape[0], out_len, -1)


class SleepHybrid(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.conv1 = ConvBlock(config.n_features, c, config.kernel_size, config.causal, config.dropout)
        self.conv2 = ConvBlock(c, c, config.kernel_size, config.causal, config.dropout)
        if config.causal and config.pool > 1:
            raise ValueError("pool > 1 mixes later epochs into each token: offline models only")
        if config.summary_epochs and (not config.causal or config.summary_epochs < 2):
            raise ValueError(f"summary_epochs {config.summary_epochs}: a causal model's decaying summary needs 2 or more "
                             "epochs (0: the mean since the start); an offline model's summary is the whole night's mean")
        check_revision_span(config.lookahead, config.revision_span)
        self.dilated = nn.ModuleList(ConvBlock(c, c, config.kernel_size, config.causal, config.dropout, 2 ** (i + 1))
                                     for i in range(config.dilated))
        self.register_buffer("positional", sinusoid(config.max_len, c), persistent=False)
        layer = nn.TransformerEncoderLayer(c, config.n_heads, c * config.ff_mult, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # n_layers 0: the convolutions alone (nn.TransformerEncoder needs a layer)
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False) if config.n_layers else None
        self.norm = nn.LayerNorm(c)
        self.head = nn.Sequential(nn.Linear(2 * c, c), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(c, config.n_classes * (1 + config.lookahead)))

    def position(self, length: int) -> torch.Tensor:
        return self.positional[:length] if length <= len(self.positional) else sinusoid(length, self.config.channels).to(self.positional)

    def encode(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.encoder is None:
            return h
        return self.encoder(h, mask=mask, is_causal=mask is not None)

    def forward(self, x: torch.Tensor, lags: bool = False) -> torch.Tensor:
        """(batch, seq_len, n_features) -> (batch, seq_len, n_classes) logits; with lags,
        (batch, seq_len, 1 + lookahead, n_classes): [:, t, j] stages epoch t - j from inputs up to t."""
        length, pool = x.shape[1], self.config.pool
        h = self.conv2(self.conv1(x.transpose(1, 2)))
        for block in self.dilated:
            h = h + block(h)
        h = h.transpose(1, 2)
        if pool > 1:  # tokens of `pool` epochs; each epoch then adds its token's output to its own features
            tokens = pool_epochs(h, pool)
            tokens = self.encode(tokens + self.position(tokens.shape[1]))
            h = self.norm(h + unpool_epochs(tokens, pool, length))
        else:
            h = h + self.position(length)
            mask = causal_mask(length, x.device) if self.config.causal else None
            h = self.norm(self.encode(h, mask))
        if self.config.causal:  # the pooled summary only covers the past
            pooled = causal_summary(h, self.config.summary_epochs)
        else:
            pooled = h.mean(dim=1, keepdim=True).expand_as(h)
        return lag_logits(self.head(torch.cat([h, pooled], dim=-1)), self.config.n_classes, lags)

    # ------------------------------------------------------------------ inference: the last position only
    # Real-time staging reads only the last epoch of each window. These methods compute forward(x)[:, -1]
    # (eval mode) with the same weights: every layer still runs on every position (the pooled summary
    # is a mean over the final layer's outputs), but the head runs once, attention uses batched
    # matmuls (the fused encoder kernel's masked softmax is slow on CPU), and the convolutions can be
    # split so that a caller keeping a window's conv outputs computes only what the new epoch changes.

    @property
    def receptive_field(self) -> int:
        """The conv output at window position j >= this depends on inputs j - receptive_field .. j only
        (not on the padding), so it is the same in every window that holds those epochs there."""
        return (self.config.kernel_size - 1) * (2 + sum(block.dilation for block in self.dilated))

    def embed(self, x: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """The conv blocks, channels last: (B, L, n_features) -> (B, L, channels); with pad=False only
        the L - receptive_field positions whose inputs all lie in x (no padding involved)."""
        h = self.conv2.forward_channels_last(self.conv1.forward_channels_last(x, pad), pad)
        for block in self.dilated:  # residual, as forward (without padding the input side is cropped to match)
            out = block.forward_channels_last(h, pad)
            h = h[:, h.shape[1] - out.shape[1]:] + out
        return h

    def encode_last(self, h: torch.Tensor, lags: bool = False) -> torch.Tensor:
        """Logits of the last position (B, n_classes) from the conv outputs h (B, L, channels)
        (with lags: (B, 1 + lookahead, n_classes)); pool 1 only, as the real-time models have."""
        length = h.shape[1]
        h = h + self.position(length)
        mask = None
        if self.config.causal:  # additive: -inf where position i may not look at j > i
            mask = torch.full((length, length), float("-inf"), device=h.device).triu_(1)
        for layer in (self.encoder.layers if self.encoder is not None else ()):
            h = _encoder_layer(layer, h, mask)
        h = self.norm(h)
        # the running mean at the last position (causal) and the window mean (offline) are the same mean
        pooled = causal_summary(h, self.config.summary_epochs)[:, -1] if self.config.summary_epochs > 0 else h.mean(dim=1)
        return lag_logits(self.head(torch.cat([h[:, -1], pooled], dim=-1)), self.config.n_classes, lags)

    def forward_last(self, x: torch.Tensor, lags: bool = False) -> torch.Tensor:
        """forward(x, lags)[:, -1] in eval mode: (batch, seq_len, n_features) -> (batch, n_classes) logits."""
        if self.config.pool > 1:
            return self.forward(x, lags)[:, -1]
        return self.encode_last(self.embed(x), lags)


    # ------------------------------------------------------------------ real time over whole nights: one epoch a step
    # A causal model trained on whole nights (seq_len 0, no Transformer) staged epoch by epoch: each conv
    # block keeps the inputs its kernel still reaches back to, so an epoch costs one position per block
    # however long the night is, and gives forward(night so far)[:, -1]. The formulas are step_members'
    # (below), which steps several models of one config at once; a model alone is one member.

    @property
    def conv_blocks(self) -> list[ConvBlock]:
        return [self.conv1, self.conv2, *self.dilated]

    def init_state(self, batch: int) -> list[torch.Tensor]:
        """Empty step state for `batch` nights (init_member_states with this model alone)."""
        return init_member_states([self], batch)

    def step(self, x: torch.Tensor, state: list[torch.Tensor], lags: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One epoch of each night (batch, n_features) -> (logits of that epoch (batch, n_classes), or with
        lags (batch, 1 + lookahead, n_classes); the state, updated in place). Eval mode (step_members)."""
        logits, state = step_members([self], x, state, lags)
        return logits[:, 0], state

    def _step_positions(self, length: int) -> torch.Tensor:
        """The positional encoding's first rows (at least length), kept between steps: the rows of sinusoid."""
        table = self.__dict__.get("_step_position_table")
        if (table is None or len(table) < length or table.device != self.positional.device
                or table.dtype != self.positional.dtype):
            table = sinusoid(max(length, 2048), self.config.channels).to(self.positional)
            self.__dict__["_step_position_table"] = table
        return table


# ------------------------------------------------------------------ models stepped one epoch at a time

def init_member_states(members: list[SleepHybrid], batch: int) -> list[torch.Tensor]:
    """Empty step state of `batch` nights for models of one config (an ensemble's members, or one model),
    rows first: per conv block a ring of its last (kernel_size - 1) * dilation inputs (batch, members, span,
    C_in), the input of epoch t at slot t % span; then the running (or, with summary_epochs, decayed) sum of
    the final outputs (batch, members, C) and the epochs so far (batch,)."""
    first = members[0]
    if not first.config.causal or first.encoder is not None or first.config.pool > 1:
        raise ValueError("step needs a causal model without a Transformer (n_layers 0, pool 1)")
    like = dict(device=first.positional.device, dtype=first.positional.dtype)
    m = len(members)
    state = [torch.zeros(batch, m, (b.kernel_size - 1) * b.dilation, b.conv.in_channels, **like) for b in first.conv_blocks]
    return state + [torch.zeros(batch, m, first.config.channels, **like), torch.zeros(batch, **like)]


@torch.inference_mode()  # the state is written in place, whichever mode made it
def step_members(members: list[SleepHybrid], x: torch.Tensor, state: list[torch.Tensor], lags: bool = False
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One epoch of each night through models of one config at once (eval mode), each matrix product
    batched over the members, so an ensemble costs about one model's operations: (batch, n_features) ->
    (each member's logits (batch, members, n_classes), or with lags (batch, members, 1 + lookahead,
    n_classes); the state, updated in place). A night's first step (0 epochs so far) fills its blocks'
    past with its own inputs: the replicate padding of forward."""
    first_model, w = members[0], _stacked_weights(members)
    *buffers, total, count = state
    steps = count.long()
    first = steps == 0
    any_first = bool(first.any())
    lockstep = len(steps) <= 1 or bool((steps == steps[0]).all())  # one ring slot for every row: plain slicing
    rows = None if lockstep else torch.arange(len(steps), device=steps.device)
    h = x.unsqueeze(1).expand(-1, len(members), -1)
    for i, (block, past) in enumerate(zip(first_model.conv_blocks, buffers)):
        span = past.shape[2]
        if any_first and span:
            past[first] = h[first].unsqueeze(2).expand(-1, -1, span, -1)
        # epoch t's taps: the inputs of t - span, t - span + dilation, ..., at slots (t + j * dilation) % span
        if lockstep:
            at = int(steps[0]) if len(steps) else 0
            taps = [past.select(2, (at + j * block.dilation) % span) for j in range(block.kernel_size - 1)]
        else:
            taps = [past[rows, :, (steps + j * block.dilation) % span] for j in range(block.kernel_size - 1)]
        out = torch.baddbmm(w["conv_bias"][i], torch.cat(taps + [h], dim=-1).transpose(0, 1), w["conv"][i])
        out = F.gelu(_member_norm(out.transpose(0, 1), w["norm"][i], block.norm.eps))
        if span:  # this input takes the slot of the one no tap reaches any more (a kernel of 1 keeps none)
            if lockstep:
                past.select(2, at % span).copy_(h)
            else:
                past[rows, :, steps % span] = h
        h = out if i < 2 else h + out  # the dilated blocks are residual
    positions = first_model._step_positions(int(steps.max()) + 1 if len(steps) else 1)
    h = _member_norm(h + positions[steps].unsqueeze(1), w["final_norm"], first_model.norm.eps)
    n = first_model.config.summary_epochs
    if n > 0:  # causal_summary's decayed sum and the sum of its weights
        decay = 1.0 - 1.0 / n
        total.mul_(decay).add_(h)
        count.add_(1)
        summary = total * ((1 - decay) / (1 - decay ** count.double())).to(h.dtype)[:, None, None]
    else:
        total.add_(h)
        count.add_(1)
        summary = total / count[:, None, None]
    joined = torch.cat([h, summary], dim=-1).transpose(0, 1)  # (members, batch, 2C)
    hidden = F.gelu(torch.baddbmm(w["head_bias"][0], joined, w["head"][0]))
    logits = torch.baddbmm(w["head_bias"][1], hidden, w["head"][1]).transpose(0, 1)
    return lag_logits(logits, first_model.config.n_classes, lags), state


def _member_norm(h: torch.Tensor, weight_bias: tuple[torch.Tensor, torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over channels with each member's own scale and shift: h (batch, members, C)."""
    return F.layer_norm(h, h.shape[-1:], eps=eps) * weight_bias[0] + weight_bias[1]


def _stacked_weights(members: list[SleepHybrid]) -> dict:
    """The members' weights stacked along a member axis as step_members multiplies by them, kept on the
    first member between steps and made again when a parameter is replaced or changed in place by an
    optimizer step (its storage or version; an edit through .data goes unseen: call after training)."""
    cached = members[0].__dict__.get("_member_weight_cache")
    # the parameter list is kept with the cache: walking the modules for it is too slow for every epoch
    if cached is not None and cached[0] == [id(m) for m in members] and cached[2] == _parameter_key(cached[1]):
        return cached[3]
    params = [p for m in members for p in m.parameters()]
    key = _parameter_key(params)
    head = [[m.head[0] for m in members], [m.head[-1] for m in members]]  # the head's two linear layers

    def stack(tensors) -> torch.Tensor:
        return torch.stack([t.detach() for t in tensors]).clone()

    with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the first step ran in
        n_blocks = len(members[0].conv_blocks)
        blocks = [m.conv_blocks for m in members]
        weights = {  # convolutions as matrices (members, kernel_size * C_in, C_out), (tap, channel) order
            "conv": [stack(b[i].conv.weight.permute(0, 2, 1).reshape(b[i].conv.out_channels, -1).t() for b in blocks)
                     for i in range(n_blocks)],
            "conv_bias": [stack(b[i].conv.bias for b in blocks).unsqueeze(1) for i in range(n_blocks)],
            "norm": [(stack(b[i].norm.weight for b in blocks), stack(b[i].norm.bias for b in blocks))
                     for i in range(n_blocks)],
            "final_norm": (stack(m.norm.weight for m in members), stack(m.norm.bias for m in members)),
            "head": [stack(layer.weight.t() for layer in layers) for layers in head],   # (members, in, out)
            "head_bias": [stack(layer.bias for layer in layers).unsqueeze(1) for layers in head],
        }
    members[0].__dict__["_member_weight_cache"] = ([id(m) for m in members], params, key, weights)
    return weights


def _parameter_key(params: list[torch.Tensor]) -> tuple:
    """What changes when a parameter's values do: its storage, and its version (inference tensors have none)."""
    return tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in params)


def _encoder_layer(layer: nn.TransformerEncoderLayer, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One pre-norm nn.TransformerEncoderLayer (GELU, eval mode: dropout is identity) on (B, L, C)."""
    batch, length, c = h.shape
    attn = layer.self_attn
    n_heads = attn.num_heads
    d = c // n_heads
    x = h.reshape(batch * length, c)
    a = F.layer_norm(x, (c,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    qkv = torch.addmm(attn.in_proj_bias, a, attn.in_proj_weight.t())
    q, k, v = qkv.view(batch, length, 3, n_heads, d).permute(2, 0, 3, 1, 4).reshape(3, batch * n_heads, length, d)
    if mask is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(d ** -0.5)
    else:  # the mask added inside the matmul
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=d ** -0.5)
    o = torch.bmm(torch.softmax(scores, dim=-1), v)
    o = o.view(batch, n_heads, length, d).transpose(1, 2).reshape(batch * length, c)
    x = torch.addmm(x, o, attn.out_proj.weight.t()).add_(attn.out_proj.bias)  # residual added by the matmul
    f = F.layer_norm(x, (c,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    f = F.gelu(torch.addmm(layer.linear1.bias, f, layer.linear1.weight.t()))
    x = torch.addmm(x, f, layer.linear2.weight.t()).add_(layer.linear2.bias)
    return x.view(batch, length, c)
