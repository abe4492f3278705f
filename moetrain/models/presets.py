"""Named model sizes: ``model.preset: NAME`` in a recipe applies these dotted keys first.

Each preset maps dotted config keys (``section.field``) to values, exactly the shape of
``--set`` overrides, so the config loader applies them before the file's own keys and
anything written explicitly wins.

Sources:
    switch-base-N: Fedus et al. 2021, "Switch Transformers" (https://arxiv.org/abs/2101.03961),
        Switch-Base = T5-Base dims with every other FFN sparse (HF ``google/switch-base-N``).
    wmt14-6-6: Transformer-base dims (Vaswani et al. 2017) for WMT'14 En-De, in T5 layout.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

# T5-Base dims; HF's google/switch-base-N put experts in layers 1, 3, ..., 11 of both stacks.
_SWITCH_BASE: dict[str, Any] = {
    "model.vocab_size": 32128,
    "model.d_model": 768,
    "model.d_ff": 3072,
    "model.d_kv": 64,
    "model.num_heads": 12,
    "model.num_layers": 12,
    "model.num_decoder_layers": 12,
    "moe.sparse_step": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop CPU: tests and smoke runs. sparse_step 2 with 2 layers per stack
    # makes layer 1 of the encoder and of the decoder sparse (one MoE layer each side).
    "switch-tiny": {
        "model.d_model": 64,
        "model.d_ff": 128,
        "model.d_kv": 16,
        "model.num_heads": 4,
        "model.num_layers": 2,
        "model.num_decoder_layers": 2,
        "moe.num_experts": 4,
        "moe.sparse_step": 2,
    },
    **{f"switch-base-{n}": {**_SWITCH_BASE, "moe.num_experts": n} for n in (8, 16, 32, 64, 128)},
    # Transformer-base for WMT'14 En-De: 6+6 layers, layers 1, 3, 5 sparse on each side.
    "wmt14-6-6": {
        "model.d_model": 512,
        "model.d_ff": 2048,
        "model.d_kv": 64,
        "model.num_heads": 8,
        "model.num_layers": 6,
        "model.num_decoder_layers": 6,
        "moe.num_experts": 8,
        "moe.sparse_step": 2,
    },
}
