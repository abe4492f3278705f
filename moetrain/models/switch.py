"""The Switch Transformer in T5 layout: encoder-decoder and encoder-only models.

Fedus, Zoph & Shazeer 2021, "Switch Transformers" (https://arxiv.org/abs/2101.03961),
built on T5 (https://arxiv.org/abs/1910.10683)::

    x = dropout(embed(ids))
    for each block:  x = x + dropout(SelfAttn(norm(x)))          (relative position bias)
                     x = x + dropout(CrossAttn(norm(x), enc))     (decoder only)
                     x = x + dropout(FFN(norm(x)))                (MoELayer in sparse blocks)
    h = dropout(final_norm(x))
    logits = (h * d_model**-0.5) @ embed.T                        (tied embeddings)

Block i of a stack is sparse when ``i % sparse_step == 1`` (every block when the step is 1),
the placement HF's SwitchTransformers uses, so export is a renaming (see moetrain/export.py,
the only place that knows HF's parameter names). Padding never reaches the router: it is
passed to the MoE layer as ``padding_mask``. Routing noise is keyed by global token ids
``sample_id * MAX_POSITIONS + position``, so a sample gets the same noise on any rank.

This file knows nothing about distribution; expert parallelism lives inside ``MoELayer``
(and beam search's cross-rank stepping in :mod:`moetrain.models.generation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe import MoELayer, MoEStats
from moetrain.moe.experts import BiasFreeLinear, FeedForward

from .attention import Attention, DecoderCache, RelativePositionBias, RMSNorm, causal_bias, padding_bias
from .export_layout import ExportLayout

__all__ = ["MAX_POSITIONS", "SwitchOutput", "Block", "Stack", "SwitchTransformer", "SwitchEncoderModel",
           "is_sparse_layer", "global_token_ids", "ffn_factory", "init_t5"]

#: Positions per sample in the global token id space of the routing noise (sequences are
#: far shorter: T5-style attention materialises [L, S] biases).
MAX_POSITIONS = 1 << 16


def is_sparse_layer(index: int, sparse_step: int) -> bool:
    """HF placement: block ``index`` holds experts when ``index % step == 1`` or step is 1."""
    return sparse_step == 1 or index % sparse_step == 1


def global_token_ids(sample_ids_B: Tensor, length: int, offset: int = 0) -> Tensor:
    """``[B, length]`` ids ``sample_id * MAX_POSITIONS + position`` for the routing noise."""
    positions = torch.arange(offset, offset + length, device=sample_ids_B.device)
    return sample_ids_B.long()[:, None] * MAX_POSITIONS + positions[None, :]


@dataclass
class SwitchOutput:
    """What :meth:`SwitchTransformer.forward` returns.

    Attributes:
        logits: ``[B, L, V]`` float32 next-token logits.
        moe_stats: one :class:`MoEStats` per MoE layer, encoder blocks then decoder blocks
            (names in ``model.moe_layer_names``).
        encoder_hidden_states: ``[B, S, D]`` encoder output.
    """

    logits: Tensor
    moe_stats: list[MoEStats]
    encoder_hidden_states: Tensor


def ffn_factory(model_cfg, moe_cfg, layer_names: list[str], stack_name: str, *, ep_size: int = 1,
                noise_seed: int = 0, init_seed: int = 0, first_layer_id: int = 0):
    """``make(i)`` -> the FFN of block ``i`` of a stack: an :class:`MoELayer` where
    :func:`is_sparse_layer` says so (never when ``moe_cfg`` is None), else a dense
    :class:`FeedForward`.

    Each MoE layer made gets the next ``layer_id`` from ``first_layer_id`` (it keys the routing
    noise and the expert initialisation) and its path ``<stack_name>.<i>`` is appended to
    ``layer_names``, in the order the stats come out of the forward pass.
    """

    def make(i: int) -> nn.Module:
        if moe_cfg is None or not is_sparse_layer(i, moe_cfg.sparse_step):
            return FeedForward(model_cfg.d_model, model_cfg.d_ff, model_cfg.dropout_rate)
        layer_id = first_layer_id + len(layer_names)
        layer_names.append(f"{stack_name}.{i}")
        return MoELayer.from_config(moe_cfg, model_cfg.d_model, model_cfg.d_ff, dropout=model_cfg.dropout_rate,
                                    ep_size=ep_size, layer_id=layer_id, noise_seed=noise_seed, init_seed=init_seed)

    return make


@torch.no_grad()
def init_t5(module: nn.Module, cfg) -> None:
    """T5/HF initialisation, from the global RNG, of everything in ``module`` outside MoE layers
    (experts and routers initialise themselves inside :class:`MoELayer`).

    q N(0, 1/(d*d_kv)) so the unscaled scores start at unit size; k, v N(0, 1/d); o
    N(0, 1/(h*d_kv)); dense FFN wi N(0, 1/d), wo N(0, 1/d_ff); relative bias N(0, 1/d); norms 1.
    Modules are visited in ``module.modules()`` order, so the draws (and every model's
    initial weights) do not depend on who calls this.
    """
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    inside_moe = {id(m) for layer in module.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
    for m in module.modules():
        if id(m) in inside_moe:
            continue
        if isinstance(m, Attention):
            nn.init.normal_(m.q.weight, std=(d * cfg.d_kv) ** -0.5)
            nn.init.normal_(m.k.weight, std=d**-0.5)
            nn.init.normal_(m.v.weight, std=d**-0.5)
            nn.init.normal_(m.o.weight, std=inner**-0.5)
        elif isinstance(m, FeedForward):
            nn.init.normal_(m.wi.weight, std=d**-0.5)
            nn.init.normal_(m.wo.weight, std=cfg.d_ff**-0.5)
        elif isinstance(m, RelativePositionBias):
            nn.init.normal_(m.weight, std=d**-0.5)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, then a dense or MoE FFN."""

    def __init__(self, d_model: int, d_kv: int, num_heads: int, ffn: nn.Module, dropout: float,
                 eps: float, cross: bool):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, d_kv, num_heads, dropout)
        if cross:
            self.cross_norm = RMSNorm(d_model, eps)
            self.cross_attn = Attention(d_model, d_kv, num_heads, dropout, cross=True)
        self.ffn_norm = RMSNorm(d_model, eps)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: Tensor, self_bias: Tensor, pad_mask: Tensor | None, token_ids: Tensor,
                memory: Tensor | None = None, cross_bias: Tensor | None = None, cache=None):
        """Returns ``(x, stats)``; ``stats`` is None for a dense block. ``pad_mask``: True = padding."""
        return self.run(x, self_bias, pad_mask, token_ids, memory, cross_bias, cache=cache)

    # ``run`` (dense blocks) or ``pre_ffn`` (sparse blocks) may be replaced on the instance by a
    # compiled version (:func:`moetrain.models.compile.compile_blocks`); the MoE layer stays eager.

    def run(self, x: Tensor, self_bias: Tensor, pad_mask: Tensor | None, token_ids: Tensor,
            memory: Tensor | None = None, cross_bias: Tensor | None = None, cache=None):
        x, h = self.pre_ffn(x, self_bias, memory, cross_bias, cache=cache)
        if not self.is_sparse:
            return x + self.dropout(self.ffn(h)), None
        h, stats = self.ffn(h, padding_mask=pad_mask, token_ids=token_ids)
        return x + self.dropout(h), stats

    def pre_ffn(self, x: Tensor, self_bias: Tensor, memory: Tensor | None = None, cross_bias: Tensor | None = None,
                cache=None) -> tuple[Tensor, Tensor]:
        """Self-attention (and cross-attention) with their residuals, then the FFN's norm:
        ``(residual stream, FFN input)``."""
        x = x + self.dropout(self.attn(self.attn_norm(x), self_bias, cache=cache))
        if hasattr(self, "cross_attn"):
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_bias, memory, cache=cache))
        return x, self.ffn_norm(x)


class Stack(nn.Module):
    """A stack of blocks sharing one relative position bias (owned here, used by every block)."""

    def __init__(self, cfg, num_layers: int, is_decoder: bool, make_ffn):
        super().__init__()
        self.is_decoder = is_decoder
        self.rel_bias = RelativePositionBias(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                             cfg.num_heads, bidirectional=not is_decoder)
        self.layers = nn.ModuleList(
            Block(cfg.d_model, cfg.d_kv, cfg.num_heads, make_ffn(i), cfg.dropout_rate, cfg.layer_norm_epsilon,
                  cross=is_decoder)
            for i in range(num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x_BLD: Tensor, valid_BL: Tensor | None, token_ids_BL: Tensor,
                memory: Tensor | None = None, cross_bias: Tensor | None = None,
                cache: DecoderCache | None = None) -> tuple[Tensor, list[MoEStats]]:
        """Run the blocks on embedded inputs.

        Args:
            x_BLD: token embeddings.
            valid_BL: bool, True at real tokens; None = no padding.
            token_ids_BL: global token ids for the routing noise.
            memory: encoder output (decoder only).
            cross_bias: ``[B, 1, 1, S]`` additive encoder padding mask (decoder only).
            cache: incremental decoding state (decoder only); then ``x_BLD`` holds new positions.
        """
        length = x_BLD.shape[1]
        offset = cache.length if cache is not None else 0
        bias = self.rel_bias(length, offset + length, offset).to(x_BLD.dtype)
        if self.is_decoder and length > 1:
            bias = bias + causal_bias(length, offset + length, offset, x_BLD.dtype, x_BLD.device)
        if valid_BL is not None:
            if cache is not None and offset > 0:
                raise ValueError("padding masks are not supported with a non-empty decoder cache")
            bias = bias + padding_bias(valid_BL, x_BLD.dtype)
        # Rows that mask everything (a fully padded sequence) stay finite instead of NaN.
        bias = bias.clamp(min=torch.finfo(x_BLD.dtype).min)
        pad_mask = None if valid_BL is None else ~valid_BL.bool()
        if cache is not None:
            memory, cross_bias = cache.memory, cache.cross_bias
        x = self.dropout(x_BLD)
        all_stats = []
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x, stats = block(x, bias, pad_mask, token_ids_BL, memory, cross_bias, layer_cache)
            if stats is not None:
                all_stats.append(stats)
        if cache is not None:
            cache.length = offset + length
            cache.memory = None  # the cross K/V are cached now
        return self.dropout(self.final_norm(x)), all_stats


class _SwitchBase(nn.Module):
    """Embedding, MoE layer construction and T5 initialisation shared by both models."""

    #: The whole model is what HF export writes.
    export_layout = ExportLayout()

    def __init__(self, model_cfg, moe_cfg, ep_size: int, noise_seed: int, init_seed: int):
        super().__init__()
        self.model_cfg, self.moe_cfg = model_cfg, moe_cfg
        self.ep_size, self.noise_seed, self.init_seed = ep_size, noise_seed, init_seed
        self.embed = nn.Embedding(model_cfg.vocab_size, model_cfg.d_model)
        self.moe_layer_names: list[str] = []

    def _ffn_factory(self, stack_name: str):
        return ffn_factory(self.model_cfg, self.moe_cfg, self.moe_layer_names, stack_name, ep_size=self.ep_size,
                           noise_seed=self.noise_seed, init_seed=self.init_seed)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Embedding N(0, 1) (the tied output is scaled by d_model**-0.5), then :func:`init_t5`."""
        nn.init.normal_(self.embed.weight, std=1.0)
        init_t5(self, self.model_cfg)

    def _encode(self, input_ids: Tensor, attention_mask: Tensor | None, sample_ids: Tensor | None):
        b, s = input_ids.shape
        if sample_ids is None:
            sample_ids = torch.arange(b, device=input_ids.device)
        valid = None if attention_mask is None else attention_mask.bool()
        return self.encoder(self.embed(input_ids), valid, global_token_ids(sample_ids, s))


class SwitchEncoderModel(_SwitchBase):
    """Encoder-only Switch Transformer (ELECTRA generator/discriminator body, GLUE encoder).

    Exported as HF ``SwitchTransformersEncoderModel``; task heads live with the task.
    """

    def __init__(self, model_cfg, moe_cfg, *, ep_size: int = 1, noise_seed: int = 0, init_seed: int = 0):
        super().__init__(model_cfg, moe_cfg, ep_size, noise_seed, init_seed)
        self.encoder = Stack(model_cfg, model_cfg.num_layers, False, self._ffn_factory("encoder"))
        self._init_weights()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                sample_ids: Tensor | None = None) -> tuple[Tensor, list[MoEStats]]:
        """Returns ``(hidden [B, S, D], moe_stats)``; ``attention_mask`` 1 = token, 0 = pad."""
        return self._encode(input_ids, attention_mask, sample_ids)


class SwitchTransformer(_SwitchBase):
    """Encoder-decoder Switch Transformer (translation); exported as HF
    ``SwitchTransformersForConditionalGeneration``.

    Args:
        model_cfg: ``ModelConfig`` (dims, ids, dropout).
        moe_cfg: ``MoEConfig`` (experts, estimator, capacity, ``sparse_step``).
        ep_size: expert-parallel size (each MoE layer holds ``num_experts / ep_size`` experts).
        noise_seed: seed of the counter-based routing noise.
        init_seed: seed of the expert initialisation (keyed by global expert id).
    """

    def __init__(self, model_cfg, moe_cfg, *, ep_size: int = 1, noise_seed: int = 0, init_seed: int = 0):
        super().__init__(model_cfg, moe_cfg, ep_size, noise_seed, init_seed)
        self.encoder = Stack(model_cfg, model_cfg.num_layers, False, self._ffn_factory("encoder"))
        self.decoder = Stack(model_cfg, model_cfg.num_decoder_layers, True, self._ffn_factory("decoder"))
        self.tied = model_cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = BiasFreeLinear(model_cfg.d_model, model_cfg.vocab_size)
        self._init_weights()
        if not self.tied:
            # NOTE: HF draws an untied head from N(0, 1), which makes the initial logits
            # ~sqrt(d_model) wide; N(0, 1/d) starts them at the tied model's scale.
            nn.init.normal_(self.lm_head.weight, std=model_cfg.d_model**-0.5)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               sample_ids: Tensor | None = None) -> tuple[Tensor, list[MoEStats]]:
        """Encoder output ``[B, S, D]`` and its MoE stats."""
        return self._encode(input_ids, attention_mask, sample_ids)

    def project(self, h: Tensor) -> Tensor:
        """Decoder states to float32 logits (tied: T5's d_model**-0.5 rescale first)."""
        if self.tied:
            return F.linear(h * self.model_cfg.d_model**-0.5, self.embed.weight).float()
        return self.lm_head(h).float()

    def decode(self, decoder_input_ids: Tensor, memory: Tensor, attention_mask: Tensor | None,
               decoder_attention_mask: Tensor | None = None, sample_ids: Tensor | None = None):
        """Teacher-forced decoder pass: ``(logits [B, L, V], moe_stats)``."""
        b, length = decoder_input_ids.shape
        if sample_ids is None:
            sample_ids = torch.arange(b, device=decoder_input_ids.device)
        cross_bias = None
        if attention_mask is not None:
            cross_bias = padding_bias(attention_mask, memory.dtype)
        valid = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        h, stats = self.decoder(self.embed(decoder_input_ids), valid, global_token_ids(sample_ids, length),
                                memory, cross_bias)
        return self.project(h), stats

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor | None = None, sample_ids: Tensor | None = None) -> SwitchOutput:
        """Teacher-forced forward pass.

        Args:
            input_ids: ``[B, S]`` source tokens.
            attention_mask: ``[B, S]`` 1 = token, 0 = padding (None = no padding).
            decoder_input_ids: ``[B, L]`` target tokens shifted right (start token first).
            decoder_attention_mask: ``[B, L]`` 1 = token, 0 = padding (None = no padding).
            sample_ids: ``[B]`` int64 global sample indices (routing noise); default ``arange(B)``.
        """
        memory, enc_stats = self.encode(input_ids, attention_mask, sample_ids)
        logits, dec_stats = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask, sample_ids)
        return SwitchOutput(logits, enc_stats + dec_stats, memory)

    # -- incremental decoding -------------------------------------------------------------

    def new_cache(self, memory: Tensor, attention_mask: Tensor | None, group: int = 1) -> DecoderCache:
        """An empty decoder cache over ``memory`` ([B, S, D], one row per sentence)."""
        if attention_mask is None:
            attention_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        cross_bias = padding_bias(attention_mask, memory.dtype)
        return DecoderCache(len(self.decoder.layers), memory, cross_bias, group)

    def decode_step(self, tokens_N: Tensor, cache: DecoderCache, sample_ids_N: Tensor) -> Tensor:
        """Logits ``[N, V]`` (float32) for one new token per hypothesis row, extending ``cache``.

        The first call computes and caches the cross-attention K/V from ``cache.memory``;
        later calls reuse them.
        """
        x = self.embed(tokens_N.view(-1, 1))
        token_ids = global_token_ids(sample_ids_N, 1, cache.length)
        h, _ = self.decoder(x, None, token_ids, cache=cache)
        return self.project(h[:, -1])

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, num_beams: int = 4,
                 length_penalty: float = 0.6, max_length: int = 128, early_stopping: bool = True,
                 sample_ids: Tensor | None = None, dist_group=None) -> Tensor:
        """Beam search (greedy when ``num_beams == 1``) with HF ``generate`` semantics.

        Returns ``[B, T_out]`` int64 in HF's format: each row starts with
        ``decoder_start_token_id``, ``T_out <= max_length``. See
        :func:`moetrain.models.generation.generate`.
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask, num_beams=num_beams, length_penalty=length_penalty,
                        max_length=max_length, early_stopping=early_stopping, sample_ids=sample_ids,
                        dist_group=dist_group)
