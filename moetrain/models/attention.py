"""T5-style attention pieces: RMS layer norm, relative position buckets, attention with a K/V cache.

The Switch Transformer (https://arxiv.org/abs/2101.03961) keeps T5's layout
(https://arxiv.org/abs/1910.10683): pre-norm residual blocks with a scale-only RMS norm,
bias-free projections, no 1/sqrt(d) scaling of the scores (T5 folds it into the
initialisation) and a learned scalar bias per (head, relative-distance bucket) added to
the scores of the *self*-attention. Only the first block of a stack owns the bias table;
the later blocks reuse the same bias (:class:`RelativePositionBias` lives on the stack).

Attention runs through ``F.scaled_dot_product_attention`` with the position bias and the
masks folded into one additive float ``attn_mask`` and ``scale=1.0``.

Shapes: B batch rows, L query positions, S key positions, H heads, K head width (d_kv),
D model width. Masks are additive: 0 where attention is allowed, ``finfo.min`` where not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe.experts import BiasFreeLinear

__all__ = ["RMSNorm", "relative_position_bucket", "RelativePositionBias", "Attention", "LayerCache",
           "DecoderCache", "padding_bias", "causal_bias"]


class RMSNorm(nn.Module):
    """T5 layer norm: ``w * x / rms(x)``; no mean subtraction, no bias, variance in float32."""

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Map ``key_pos - query_pos`` to a bucket in ``[0, num_buckets)`` (Mesh TensorFlow's rule).

    Half the buckets (per direction when bidirectional) hold exact small distances; the rest
    grow logarithmically up to ``max_distance``, beyond which everything shares the last
    bucket. A causal (unidirectional) stack only sees keys at or before the query, so
    positive offsets (the future) all fall into bucket 0.

    NOTE: the float32 ``log`` and the truncation below are kept in the published order:
    reordering them moves bucket boundaries by one position and breaks checkpoint parity.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned bias ``weight[bucket(k - q), h]`` added to the attention scores of every block.

    Args:
        num_buckets: rows of the table.
        max_distance: distance at which the last bucket starts.
        num_heads: columns (one scalar per head).
        bidirectional: True in the encoder, False (causal) in the decoder.
    """

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional

    def forward(self, query_len: int, key_len: int, offset: int = 0) -> Tensor:
        """Bias ``[1, H, L, S]`` for queries at ``offset + arange(L)`` against keys ``arange(S)``."""
        device = self.weight.device
        query_pos = torch.arange(query_len, device=device)[:, None] + offset
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)


def padding_bias(valid_BS: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[B, 1, 1, S]``: 0 at real keys, ``finfo.min`` at padding keys."""
    return (~valid_BS.bool())[:, None, None, :].to(dtype) * torch.finfo(dtype).min


def causal_bias(query_len: int, key_len: int, offset: int, dtype: torch.dtype, device) -> Tensor:
    """Additive mask ``[1, 1, L, S]`` hiding keys after each query (query i sits at offset + i)."""
    query_pos = torch.arange(query_len, device=device)[:, None] + offset
    key_pos = torch.arange(key_len, device=device)[None, :]
    return (key_pos > query_pos).to(dtype)[None, None] * torch.finfo(dtype).min


@dataclass
class LayerCache:
    """One decoder block's cached keys/values, each ``[rows, H, positions, K]``."""

    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None


class DecoderCache:
    """Key/value cache for incremental decoding.

    Self-attention K/V grow by one position per step and have one row per hypothesis.
    Cross-attention K/V are computed once from the encoder output and have one row per
    *sentence*: the ``group`` hypotheses (beams) of a sentence share them, and their queries
    are stacked along the query axis instead of copying the encoder states ``group`` times.

    Args:
        num_layers: decoder blocks.
        memory: ``[B, S, D]`` encoder output (one row per sentence); dropped once the
            cross-attention K/V are computed.
        cross_bias: ``[B, 1, 1, S]`` additive encoder padding mask.
        group: hypotheses per sentence (the beam size; 1 for greedy).
    """

    def __init__(self, num_layers: int, memory: Tensor, cross_bias: Tensor, group: int = 1):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.memory: Tensor | None = memory
        self.cross_bias = cross_bias
        self.group = group
        self.length = 0  # positions already decoded

    def select(self, rows: Tensor, sentences: Tensor | None = None) -> None:
        """Keep hypothesis ``rows`` (a reorder after a beam step) and sentence rows ``sentences``."""
        for layer in self.layers:
            if layer.self_k is not None:
                layer.self_k = layer.self_k.index_select(0, rows)
                layer.self_v = layer.self_v.index_select(0, rows)
            if sentences is not None and layer.cross_k is not None:
                layer.cross_k = layer.cross_k.index_select(0, sentences)
                layer.cross_v = layer.cross_v.index_select(0, sentences)
        if sentences is not None:
            self.cross_bias = self.cross_bias.index_select(0, sentences)
            if self.memory is not None:
                self.memory = self.memory.index_select(0, sentences)


class Attention(nn.Module):
    """Multi-head attention without score scaling, as in T5 (``inner = num_heads * d_kv``).

    Args:
        d_model: model width.
        d_kv: width of one head.
        num_heads: heads.
        dropout: dropout on the attention probabilities (training only).
        cross: attend over an encoder output (keys/values from ``memory_BSD``).
    """

    def __init__(self, d_model: int, d_kv: int, num_heads: int, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.cross = cross
        inner = num_heads * d_kv
        self.q = BiasFreeLinear(d_model, inner)
        self.k = BiasFreeLinear(d_model, inner)
        self.v = BiasFreeLinear(d_model, inner)
        self.o = BiasFreeLinear(inner, d_model)
        self.num_heads = num_heads
        self.d_kv = d_kv
        self.dropout = dropout

    def _split(self, x_BLD: Tensor) -> Tensor:
        b, length, _ = x_BLD.shape
        return x_BLD.view(b, length, self.num_heads, self.d_kv).transpose(1, 2)

    def forward(self, x_BLD: Tensor, bias: Tensor, memory_BSD: Tensor | None = None,
                cache: LayerCache | None = None) -> Tensor:
        """Self-attention, or cross-attention over ``memory_BSD`` when built with ``cross=True``.

        Args:
            x_BLD: queries' hidden states.
            bias: additive scores bias broadcastable to ``[B, H, L, S]`` (position bias + masks).
            memory_BSD: encoder output for cross-attention (unused once cached).
            cache: with self-attention, past K/V to extend (and store); with
                cross-attention, K/V computed on the first call and reused afterwards.
        """
        q = self._split(self.q(x_BLD))
        if not self.cross:
            k, v = self._split(self.k(x_BLD)), self._split(self.v(x_BLD))
            if cache is not None:
                if cache.self_k is not None:
                    k = torch.cat([cache.self_k, k], dim=2)
                    v = torch.cat([cache.self_v, v], dim=2)
                cache.self_k, cache.self_v = k, v
        elif cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            k, v = self._split(self.k(memory_BSD)), self._split(self.v(memory_BSD))
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
        out = self._attend(q, k, v, bias)
        b, _, length, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, length, self.num_heads * self.d_kv))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        rows, groups = q.shape[0], k.shape[0]
        if rows == groups or groups == 0:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)
        # Cross-attention from G hypotheses per sentence onto one shared copy of the encoder
        # states: stack the hypotheses' queries along the query axis ([B*G, H, L, K] ->
        # [B, H, G*L, K]). Queries do not interact, so this equals attending row by row.
        g = rows // groups
        _, h, length, kd = q.shape
        q = q.view(groups, g, h, length, kd).transpose(1, 2).reshape(groups, h, g * length, kd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=1.0)
        return out.view(groups, h, g, length, kd).transpose(1, 2).reshape(rows, h, length, kd)
