"""ELECTRA on the Switch encoder: a small MLM generator, an MoE discriminator, task heads.

Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
Generators" (https://arxiv.org/abs/2003.10555)::

    masked  = mask 15% of the tokens (85% of those become [MASK])          (data, not here)
    g_BLd   = Generator(proj(embed(masked)))                                 small encoder
    logits  = (norm(gelu(dense(g[picked]))) * D**-0.5) @ embed.T + bias     MLM over picked positions
    sampled ~ softmax(logits / T)               no gradient flows through the sample
    corrupt = masked with picked positions := sampled
    h_BLD   = Discriminator(corrupt)            the Switch encoder with MoE layers (any estimator)
    rtd_BL  = RTDHead(h)                        "was this token replaced?" (1 = replaced)

Generator and discriminator share the token embedding (the discriminator's ``embed``, width
D); a generator narrower than D reads it through a projection and scores the vocabulary
against the same matrix, as in ELECTRA's tied embeddings with a small generator. The
discriminator is a plain :class:`SwitchEncoderModel`, so it exports to HF's
``SwitchTransformersEncoderModel`` unchanged; the heads go to a separate file.

The losses are computed by the task (``moetrain.tasks.electra``) from :class:`ElectraOutput`,
in one visible line. Sampling is keyed by ``(noise_seed, sample ids)`` rather than by the
global RNG, so a resumed run draws the same replacements.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe import MoEStats
from moetrain.moe.experts import BiasFreeLinear

from .attention import RMSNorm
from .export_layout import ExportLayout
from .switch import Stack, SwitchEncoderModel, ffn_factory, global_token_ids, init_t5

__all__ = ["GENERATOR_LAYER_ID_BASE", "generator_model_config", "ElectraGenerator", "RTDHead", "ElectraOutput",
           "ElectraModel", "ClassificationHead", "SequenceClassifier"]

#: MoE ``layer_id`` of the generator's first sparse layer: keeps its routing noise and expert
#: initialisation apart from the discriminator's (ids 0, 1, ...).
GENERATOR_LAYER_ID_BASE = 1000


def generator_model_config(model_cfg, width_fraction: float, num_layers: int | None = None):
    """The generator's ``ModelConfig``: width, FFN and heads scaled by ``width_fraction``.

    Head width (``d_kv``) stays; ELECTRA scales hidden size, FFN size and head count together.
    """
    if not 0 < width_fraction <= 1:
        raise ValueError(f"generator width fraction must be in (0, 1], got {width_fraction}")
    return dataclasses.replace(
        model_cfg,
        d_model=max(1, round(model_cfg.d_model * width_fraction)),
        d_ff=max(1, round(model_cfg.d_ff * width_fraction)),
        num_heads=max(1, round(model_cfg.num_heads * width_fraction)),
        num_layers=num_layers or model_cfg.num_layers,
    )


class ElectraGenerator(nn.Module):
    """The small MLM encoder. It owns no embedding: the shared one is passed to ``forward``.

    Args:
        cfg: its ``ModelConfig`` (:func:`generator_model_config`).
        d_embed: width of the shared embedding (the discriminator's ``d_model``).
        moe_cfg: ``MoEConfig`` for Switch layers at the usual placement, or None (dense).
        ep_size / noise_seed / init_seed: as for :class:`SwitchEncoderModel`.
    """

    def __init__(self, cfg, d_embed: int, moe_cfg=None, *, ep_size: int = 1, noise_seed: int = 0,
                 init_seed: int = 0):
        super().__init__()
        self.cfg, self.d_embed = cfg, d_embed
        self.moe_layer_names: list[str] = []
        self.input_proj = BiasFreeLinear(d_embed, cfg.d_model) if cfg.d_model != d_embed else None
        make_ffn = ffn_factory(cfg, moe_cfg, self.moe_layer_names, "generator.encoder", ep_size=ep_size,
                               noise_seed=noise_seed, init_seed=init_seed, first_layer_id=GENERATOR_LAYER_ID_BASE)
        self.encoder = Stack(cfg, cfg.num_layers, False, make_ffn)
        self.head_dense = BiasFreeLinear(cfg.d_model, d_embed)
        self.head_norm = RMSNorm(d_embed, cfg.layer_norm_epsilon)
        self.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        init_t5(self, cfg)
        with torch.no_grad():
            if self.input_proj is not None:
                nn.init.normal_(self.input_proj.weight, std=d_embed**-0.5)
            nn.init.normal_(self.head_dense.weight, std=cfg.d_model**-0.5)

    def forward(self, embed: nn.Embedding, input_ids: Tensor, attention_mask: Tensor | None,
                token_ids: Tensor) -> tuple[Tensor, list[MoEStats]]:
        """Hidden states ``[B, L, d_gen]`` and MoE stats for (masked) ``input_ids``."""
        x = embed(input_ids)
        if self.input_proj is not None:
            x = self.input_proj(x)
        valid = None if attention_mask is None else attention_mask.bool()
        return self.encoder(x, valid, token_ids)

    def mlm_logits(self, hidden_MD: Tensor, embed_weight: Tensor) -> Tensor:
        """Float32 vocabulary logits ``[M, V]`` for the hidden states of M picked positions."""
        h = self.head_norm(F.gelu(self.head_dense(hidden_MD)))
        return (F.linear(h * self.d_embed**-0.5, embed_weight) + self.output_bias).float()


class RTDHead(nn.Module):
    """ELECTRA's discriminator head: ``dense -> gelu -> dense(1)``, one logit per token."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, 1)
        for layer in (self.dense, self.out):
            nn.init.normal_(layer.weight, std=d_model**-0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, h_BLD: Tensor) -> Tensor:
        return self.out(F.gelu(self.dense(h_BLD))).squeeze(-1).float()


@dataclass
class ElectraOutput:
    """What :meth:`ElectraModel.forward` returns (losses are the task's business).

    Attributes:
        mlm_logits: ``[M, V]`` float32 generator logits at the M picked positions.
        mlm_labels: ``[M]`` original tokens at those positions.
        sampled: ``[M]`` the generator's samples (no gradient).
        rtd_logits: ``[B, L]`` float32 discriminator logits (positive = replaced).
        rtd_labels: ``[B, L]`` float 1 where the discriminator's input differs from the original.
        moe_stats: discriminator MoE layers, then generator MoE layers (``model.moe_layer_names``).
    """

    mlm_logits: Tensor
    mlm_labels: Tensor
    sampled: Tensor
    rtd_logits: Tensor
    rtd_labels: Tensor
    moe_stats: list[MoEStats]


class ElectraModel(nn.Module):
    """Generator + Switch discriminator with shared embeddings (see the module docstring).

    Args:
        model_cfg: the discriminator's ``ModelConfig`` (``arch: encoder``).
        moe_cfg: ``MoEConfig`` of the discriminator (and of the generator when ``generator_moe``).
        generator_width_fraction: generator width / discriminator width (ELECTRA: 1/4 to 1/2).
        generator_layers: generator depth; None = the discriminator's.
        generator_moe: Switch layers in the generator too (else it is dense).
        sampling_temperature: temperature of the generator's softmax when sampling.
        ep_size / noise_seed / init_seed: as for :class:`SwitchEncoderModel`.
    """

    #: HF export writes the discriminator, keeps the RTD head beside it, and leaves the generator out.
    export_layout = ExportLayout(
        prefix="discriminator.", heads=("rtd_head.",), label="the ELECTRA discriminator",
        summary="SwitchTransformersEncoderModel; RTD head in moetrain_heads.safetensors; generator left out")

    def __init__(self, model_cfg, moe_cfg, *, generator_width_fraction: float = 0.25,
                 generator_layers: int | None = None, generator_moe: bool = False, sampling_temperature: float = 1.0,
                 ep_size: int = 1, noise_seed: int = 0, init_seed: int = 0):
        super().__init__()
        self.noise_seed = noise_seed
        self.sampling_temperature = sampling_temperature
        self.discriminator = SwitchEncoderModel(model_cfg, moe_cfg, ep_size=ep_size, noise_seed=noise_seed,
                                                init_seed=init_seed)
        gen_cfg = generator_model_config(model_cfg, generator_width_fraction, generator_layers)
        self.generator = ElectraGenerator(gen_cfg, model_cfg.d_model, moe_cfg if generator_moe else None,
                                          ep_size=ep_size, noise_seed=noise_seed, init_seed=init_seed)
        self.rtd_head = RTDHead(model_cfg.d_model)
        self.moe_layer_names = ([f"discriminator.{n}" for n in self.discriminator.moe_layer_names]
                                + self.generator.moe_layer_names)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, mlm_labels: Tensor,
                sample_ids: Tensor | None = None) -> ElectraOutput:
        """One ELECTRA step's forward pass.

        Args:
            input_ids: ``[B, L]`` masked tokens (see ``moetrain.data.text.mask_tokens``).
            attention_mask: ``[B, L]`` 1 = token, 0 = padding.
            mlm_labels: ``[B, L]`` original token at picked positions, -100 elsewhere.
            sample_ids: ``[B]`` global sample ids (routing noise, sampling); default ``arange(B)``.
        """
        b, length = input_ids.shape
        if sample_ids is None:
            sample_ids = torch.arange(b, device=input_ids.device)
        token_ids = global_token_ids(sample_ids, length)
        embed = self.discriminator.embed
        picked = mlm_labels >= 0

        g_hidden, gen_stats = self.generator(embed, input_ids, attention_mask, token_ids)
        mlm_logits = self.generator.mlm_logits(g_hidden[picked], embed.weight)
        labels = mlm_labels[picked]
        sampled = self._sample(mlm_logits.detach(), sample_ids)
        corrupted = input_ids.masked_scatter(picked, sampled)  # no graph: ids are integers
        original = torch.where(picked, mlm_labels, input_ids)

        hidden, disc_stats = self.discriminator(corrupted, attention_mask, sample_ids)
        rtd_logits = self.rtd_head(hidden)
        rtd_labels = (corrupted != original).float()
        return ElectraOutput(mlm_logits, labels, sampled, rtd_logits, rtd_labels, disc_stats + gen_stats)

    @torch.no_grad()
    def _sample(self, logits_MV: Tensor, sample_ids: Tensor) -> Tensor:
        """One draw per row from ``softmax(logits / T)``, seeded by the batch's sample ids."""
        if logits_MV.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=logits_MV.device)
        ids = sample_ids.detach().long().cpu()
        seed = (self.noise_seed * 1_000_003 + int(ids[0]) * 7_919 + int(ids.sum()) * 104_729 + len(ids)) % (2**63 - 1)
        gen = torch.Generator(device=logits_MV.device)
        gen.manual_seed(seed)
        probs = torch.softmax(logits_MV.float() / self.sampling_temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)


class ClassificationHead(nn.Module):
    """Sentence(-pair) classifier on pooled encoder states: ``dropout -> dense -> gelu -> dropout -> dense``."""

    def __init__(self, d_model: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, num_labels)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.dense, self.out):
            nn.init.normal_(layer.weight, std=d_model**-0.5)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled_BD: Tensor) -> Tensor:
        return self.out(self.dropout(F.gelu(self.dense(self.dropout(pooled_BD))))).float()


class SequenceClassifier(nn.Module):
    """A Switch encoder (``backbone``, e.g. a pretrained discriminator) with a classification head.

    Args:
        backbone: a :class:`SwitchEncoderModel`.
        num_labels: classes.
        pooling: ``first`` (the ``[CLS]`` position) or ``mean`` (over non-padding tokens).
        dropout: dropout of the head.
    """

    #: HF export writes the backbone and keeps the classification head beside it.
    export_layout = ExportLayout(prefix="backbone.", heads=("head.",))

    def __init__(self, backbone: SwitchEncoderModel, num_labels: int, pooling: str = "first", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("first", "mean"):
            raise ValueError(f"pooling must be 'first' or 'mean', got '{pooling}'")
        self.backbone = backbone
        self.pooling = pooling
        self.head = ClassificationHead(backbone.model_cfg.d_model, num_labels, dropout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                sample_ids: Tensor | None = None) -> tuple[Tensor, list[MoEStats]]:
        """``(logits [B, C] float32, moe_stats)``."""
        hidden, stats = self.backbone(input_ids, attention_mask, sample_ids)
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled), stats
