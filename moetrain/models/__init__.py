"""Switch Transformer models in T5 layout (encoder-decoder and encoder-only).

    from moetrain.models import build_model, moe_aux_loss
    model = build_model(cfg.model, cfg.moe)                  # SwitchTransformer or SwitchEncoderModel
    out = model(src, src_mask, tgt_in, tgt_mask)             # SwitchOutput(logits, moe_stats, ...)
    aux, logs = moe_aux_loss(out.moe_stats, cfg.moe.balance_loss_weight, cfg.moe.z_coef)
    hyps = model.generate(src, src_mask, num_beams=4, length_penalty=0.6, max_length=128)

Everything but :data:`PRESETS` is imported on first use (PEP 562), so the config loader can
read ``moetrain.models.presets`` without importing torch and DeepSpeed.
"""

from __future__ import annotations

import importlib

from .presets import PRESETS

__all__ = ["ARCHS", "MAX_POSITIONS", "PRESETS", "SwitchEncoderModel", "SwitchOutput", "SwitchTransformer",
           "build_model", "generate", "global_token_ids", "is_sparse_layer", "moe_aux_loss", "router_stats"]

# name -> submodule that defines it
_LAZY = {
    "MAX_POSITIONS": "switch", "SwitchEncoderModel": "switch", "SwitchOutput": "switch",
    "SwitchTransformer": "switch", "global_token_ids": "switch", "is_sparse_layer": "switch",
    "generate": "generation", "moe_aux_loss": "moe_stats", "router_stats": "moe_stats",
}

#: ``model.arch`` -> model class name in :mod:`moetrain.models.switch`.
ARCHS = {"encoder_decoder": "SwitchTransformer", "encoder": "SwitchEncoderModel"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(model_cfg, moe_cfg, *, ep_size: int = 1, noise_seed: int = 0, init_seed: int = 0):
    """The model named by ``model_cfg.arch``, initialised from the global torch RNG.

    Seed the global RNG identically on every rank before calling: non-expert parameters
    (embeddings, attention, dense FFNs, routers) come from it, experts from their own
    generators keyed by ``(init_seed, layer_id, global expert id)``, so every ``ep_size``
    holds the same experts. MoE layers get ``layer_id`` 0, 1, ... (encoder, then decoder).

    Args:
        model_cfg: ``ModelConfig``.
        moe_cfg: ``MoEConfig``.
        ep_size: expert-parallel group size (build after creating the process groups).
        noise_seed: seed of the routing noise.
        init_seed: seed of the expert initialisation.

    Returns:
        ``SwitchTransformer`` (arch ``encoder_decoder``) or ``SwitchEncoderModel`` (``encoder``).
    """
    if model_cfg.arch not in ARCHS:
        raise ValueError(f"unknown model.arch {model_cfg.arch!r}; expected one of {sorted(ARCHS)}")
    from . import switch

    cls = getattr(switch, ARCHS[model_cfg.arch])
    return cls(model_cfg, moe_cfg, ep_size=ep_size, noise_seed=noise_seed, init_seed=init_seed)
