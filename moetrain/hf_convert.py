"""Name and config mapping between moetrain's Switch Transformer and HF SwitchTransformers.

This is the only module that knows HF's parameter names. The mapping is declarative: each
row pairs a moetrain template with an HF template (``{s}`` stack, ``{i}`` block, ``{f}``
the block's FFN sub-layer, ``{j}`` global expert id, ``{p}`` projection), expanded for one
config into a list of ``(ours, hf, shape)``. Every conversion asserts that each key is used
exactly once and that each tensor has the shape the config implies (nanoGPT's
``from_pretrained`` discipline): a checkpoint of another architecture fails loudly, naming
the keys, instead of loading half its weights.

Pure functions on state dicts and plain dicts; the file I/O lives in :mod:`moetrain.export`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from moetrain.models.switch import is_sparse_layer
from moetrain.utils.errors import UserError

__all__ = ["ConversionError", "MapEntry", "name_map", "to_hf", "from_hf", "hf_config_dict", "model_overrides_from_hf",
           "hf_num_sparse_layers", "hf_sparse_layers", "EXACT_ESTIMATORS", "APPROXIMATE_ESTIMATORS",
           "EXPORT_EXPERT_CAPACITY"]

#: HF's ``expert_capacity`` in exported configs. HF applies it per *sequence* (a cumulative
#: count along the sequence axis), so any value >= the longest sequence never drops a token.
#: 2**16 is beyond any sequence T5-style attention can hold: its [H, L, L] position bias alone
#: would take 16 GiB per head at that length. Exported models are therefore dropless at
#: inference, like moetrain's default ``moe.eval_capacity_factor: null``.
EXPORT_EXPERT_CAPACITY = 1 << 16

#: Estimators whose inference is argmax routing with the plain softmax probability as weight,
#: exactly what HF's top-1 router computes.
EXACT_ESTIMATORS = ("switch", "st", "stgs", "reinmax")

#: Exportable with a documented difference at inference.
APPROXIMATE_ESTIMATORS = {
    "sparsemixer": (
        "SparseMixer weights the chosen expert by the *masked* softmax (experts that jitter eps "
        "could never make win are removed before normalising); HF uses the plain softmax. The "
        "routing (argmax) is the same and omega is folded exactly into each expert's wo, but "
        "the gate value is smaller in HF wherever the mask removes experts"),
}


#: Aux-loss-free balancing (moe.balance: aux_free) cannot be expressed in HF's router.
AUX_FREE_NOTE = (
    "aux-loss-free balancing chooses experts by softmax + a per-expert selection bias that leaves "
    "the gate value unbiased; HF's router has no such term (router_bias would change the gate "
    "too), so the export routes by the plain argmax. `moetrain export --verify` reports how many "
    "tokens still go to the same expert")


class ConversionError(UserError, ValueError):
    """A state dict or config does not fit the mapping; the message names what is wrong."""


@dataclass(frozen=True)
class MapEntry:
    ours: str
    hf: str
    shape: tuple[int, ...]


_ATTN = ("q", "k", "v", "o")


def _stack_rows(stack: str, num_layers: int, sparse_step: int, cfg, moe) -> list[MapEntry]:
    d, inner, d_ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    attn_shapes = {"q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner)}
    ffn_shapes = {"wi": (d_ff, d), "wo": (d, d_ff)}
    is_decoder = stack == "decoder"
    f = 2 if is_decoder else 1  # HF sub-layer index of the FFN: [self-attn, (cross-attn), ffn]
    rows = [
        MapEntry(f"{stack}.rel_bias.weight",
                 f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 (cfg.relative_attention_num_buckets, cfg.num_heads)),
        MapEntry(f"{stack}.final_norm.weight", f"{stack}.final_layer_norm.weight", (d,)),
    ]
    for i in range(num_layers):
        ours, hf = f"{stack}.layers.{i}", f"{stack}.block.{i}"
        rows.append(MapEntry(f"{ours}.attn_norm.weight", f"{hf}.layer.0.layer_norm.weight", (d,)))
        rows += [MapEntry(f"{ours}.attn.{p}.weight", f"{hf}.layer.0.SelfAttention.{p}.weight", attn_shapes[p])
                 for p in _ATTN]
        if is_decoder:
            rows.append(MapEntry(f"{ours}.cross_norm.weight", f"{hf}.layer.1.layer_norm.weight", (d,)))
            rows += [MapEntry(f"{ours}.cross_attn.{p}.weight", f"{hf}.layer.1.EncDecAttention.{p}.weight",
                              attn_shapes[p]) for p in _ATTN]
        rows.append(MapEntry(f"{ours}.ffn_norm.weight", f"{hf}.layer.{f}.layer_norm.weight", (d,)))
        if not is_sparse_layer(i, sparse_step):
            rows += [MapEntry(f"{ours}.ffn.{w}.weight", f"{hf}.layer.{f}.mlp.{w}.weight", ffn_shapes[w])
                     for w in ("wi", "wo")]
            continue
        rows.append(MapEntry(f"{ours}.ffn.router.classifier.weight", f"{hf}.layer.{f}.mlp.router.classifier.weight",
                             (moe.num_experts, d)))
        for j in range(moe.num_experts):
            rows += [MapEntry(f"{ours}.ffn.deepspeed_moe.experts.deepspeed_experts.{j}.{w}.weight",
                              f"{hf}.layer.{f}.mlp.experts.expert_{j}.{w}.weight", ffn_shapes[w])
                     for w in ("wi", "wo")]
    return rows


def name_map(model_cfg, moe_cfg) -> list[MapEntry]:
    """Every parameter of the config's model: moetrain name, HF name, shape.

    ``estimator.omega`` (SparseMixer) has no HF counterpart; :func:`to_hf` folds it into ``wo``.
    """
    rows = [MapEntry("embed.weight", "shared.weight", (model_cfg.vocab_size, model_cfg.d_model))]
    rows += _stack_rows("encoder", model_cfg.num_layers, moe_cfg.sparse_step, model_cfg, moe_cfg)
    if model_cfg.arch == "encoder_decoder":
        rows += _stack_rows("decoder", model_cfg.num_decoder_layers, moe_cfg.sparse_step, model_cfg, moe_cfg)
        if not model_cfg.tie_word_embeddings:
            rows.append(MapEntry("lm_head.weight", "lm_head.weight", (model_cfg.vocab_size, model_cfg.d_model)))
    return rows


def _omega_keys(model_cfg, moe_cfg) -> dict[str, str]:
    """SparseMixer omega key of each sparse layer -> that layer's expert ``wo`` prefix."""
    out = {}
    stacks = [("encoder", model_cfg.num_layers)]
    if model_cfg.arch == "encoder_decoder":
        stacks.append(("decoder", model_cfg.num_decoder_layers))
    for stack, n in stacks:
        for i in range(n):
            if is_sparse_layer(i, moe_cfg.sparse_step):
                out[f"{stack}.layers.{i}.ffn.estimator.omega"] = f"{stack}.layers.{i}.ffn"
    return out


def _check_keys(have: set[str], want: set[str], what: str, hint: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
        raise ConversionError(f"{what} does not match the configured model: {'; '.join(parts)}. {hint}")


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ConversionError(f"{name}: shape {tuple(tensor.shape)} but the config implies {shape} "
                              "(vocab_size / d_model / d_ff / num_heads / d_kv / num_experts mismatch?)")


def to_hf(state_dict: dict[str, Tensor], model_cfg, moe_cfg) -> dict[str, Tensor]:
    """moetrain state dict (ep_size=1 names, global expert ids) -> HF SwitchTransformers names.

    Every key must be used (extra keys, e.g. task heads, must be split off by the caller).
    SparseMixer's ``omega`` is folded into each expert's ``wo`` rows: ``omega * (wo h) =
    (diag(omega) wo) h``.
    """
    rows = name_map(model_cfg, moe_cfg)
    # The aux-free selection bias: HF's router has no selection-only term (its router_bias would
    # shift the gate value too), so the export routes by the unbiased argmax (check_exportable).
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".selection_bias")}
    omegas = _omega_keys(model_cfg, moe_cfg) if moe_cfg.estimator == "sparsemixer" else {}
    stray = [k for k in state_dict if k.endswith(".estimator.omega")]
    if stray and not omegas:
        raise ConversionError(f"the checkpoint has SparseMixer omega parameters ({stray[0]}, ...) but "
                              f"moe.estimator is {moe_cfg.estimator!r}")
    _check_keys(set(state_dict), {r.ours for r in rows} | set(omegas), "checkpoint",
                "Is it a checkpoint of this model (same model.arch, layers, moe.sparse_step, "
                "moe.num_experts, tie_word_embeddings)?")
    scale = {}
    for key, prefix in omegas.items():
        _check_shape(key, state_dict[key], (model_cfg.d_model,))
        scale[prefix] = state_dict[key]
    out = {}
    for row in rows:
        tensor = state_dict[row.ours]
        _check_shape(row.ours, tensor, row.shape)
        prefix = row.ours.split(".deepspeed_moe.")[0]
        if prefix in scale and row.ours.endswith(".wo.weight"):
            tensor = tensor * scale[prefix].to(tensor.dtype)[:, None]
        out[row.hf] = tensor.detach().contiguous()
    for alias in _untied_embedding_keys(model_cfg):
        out[alias] = out["shared.weight"]
    return out


# HF keys that alias ``shared.weight`` when tied; present in some saved checkpoints.
_TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _untied_embedding_keys(model_cfg) -> list[str]:
    """Stack embeddings HF stores separately when ``tie_word_embeddings`` is false.

    transformers 5 ties ``{encoder,decoder}.embed_tokens`` to ``shared`` only for tied
    configs; untied, each stack reads its own copy (and ``shared`` is unused by the forward
    pass), so the export writes the one moetrain embedding under every name.
    """
    if model_cfg.tie_word_embeddings:
        return []
    stacks = ["encoder"] + (["decoder"] if model_cfg.arch == "encoder_decoder" else [])
    return [f"{s}.embed_tokens.weight" for s in stacks]


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def _merge_embeddings(hf: dict[str, Tensor], model_cfg) -> None:
    """Reduce HF's embedding copies to ``shared.weight`` (in place), checking they agree."""
    shared = hf.get("shared.weight")
    if model_cfg.tie_word_embeddings:
        for alias in list(_TIED_ALIASES) + ["lm_head.weight"]:
            if alias in hf and shared is not None:
                if not _same(hf[alias], shared):
                    raise ConversionError(f"{alias} differs from shared.weight although the embeddings are tied")
                del hf[alias]
        return
    copies = {k: hf.pop(k) for k in _untied_embedding_keys(model_cfg) if k in hf}
    used = next(iter(copies.values()), shared)
    for key, value in copies.items():
        if not _same(value, used):
            raise ConversionError(f"{key} differs from {next(iter(copies))}; moetrain's encoder and decoder share "
                                  "one embedding")
    if shared is not None and used is not None and not _same(shared, used):
        warnings.warn("shared.weight differs from the stacks' embed_tokens; HF does not use shared.weight in its "
                      "forward pass when tie_word_embeddings is false, so embed_tokens is imported", stacklevel=3)
    if used is not None:
        hf["shared.weight"] = used


def from_hf(hf_state_dict: dict[str, Tensor], model_cfg, moe_cfg) -> dict[str, Tensor]:
    """HF SwitchTransformers state dict -> moetrain names (the inverse of :func:`to_hf`).

    HF's copies of the embedding (tied aliases, or the untied stacks' ``embed_tokens``) are
    checked to agree and merged into one. SparseMixer's ``omega`` starts at ones.
    """
    hf = dict(hf_state_dict)
    _merge_embeddings(hf, model_cfg)
    rows = name_map(model_cfg, moe_cfg)
    _check_keys(set(hf), {r.hf for r in rows}, "HF checkpoint",
                "Only SwitchTransformersForConditionalGeneration / SwitchTransformersEncoderModel "
                "checkpoints with ReLU experts and no router bias are supported.")
    out = {}
    for row in rows:
        _check_shape(row.hf, hf[row.hf], row.shape)
        out[row.ours] = hf[row.hf]
    if moe_cfg.estimator == "sparsemixer":
        for key in _omega_keys(model_cfg, moe_cfg):
            out[key] = torch.ones(model_cfg.d_model, dtype=hf["shared.weight"].dtype)
    return out


# ---------------------------------------------------------------------------
# Sparse layer placement
# ---------------------------------------------------------------------------


def hf_sparse_layers(num_layers: int, num_sparse: int) -> set[int]:
    """Blocks HF makes sparse for ``num_sparse_*_layers`` (its step is ``num_layers // num_sparse``)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    if step <= 0:
        return set()
    return {i for i in range(num_layers) if i % step == 1 or step == 1}


def hf_num_sparse_layers(num_layers: int, sparse_step: int) -> int:
    """The ``num_sparse_*_layers`` value that makes HF place experts where moetrain does."""
    ours = {i for i in range(num_layers) if is_sparse_layer(i, sparse_step)}
    candidates = sorted(range(num_layers + 1), key=lambda n: (n != len(ours), n))
    for n in candidates:
        if hf_sparse_layers(num_layers, n) == ours:
            return n
    raise ConversionError(f"HF SwitchTransformers cannot place sparse layers at {sorted(ours)} in a "
                          f"{num_layers}-layer stack (moe.sparse_step={sparse_step})")


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def check_exportable(moe_cfg) -> str | None:
    """Raise if HF cannot run this routing at all; return a note if only approximately."""
    if moe_cfg.top_k != 1:
        raise ConversionError(f"HF SwitchTransformers routes each token to one expert; this model uses "
                              f"moe.top_k={moe_cfg.top_k} (estimator {moe_cfg.estimator!r})")
    if moe_cfg.aux_free:
        return AUX_FREE_NOTE
    if moe_cfg.estimator in EXACT_ESTIMATORS:
        return None
    if moe_cfg.estimator in APPROXIMATE_ESTIMATORS:
        return APPROXIMATE_ESTIMATORS[moe_cfg.estimator]
    raise ConversionError(f"estimator {moe_cfg.estimator!r} has no HF SwitchTransformers equivalent at inference "
                          f"(exportable: {', '.join(EXACT_ESTIMATORS + tuple(APPROXIMATE_ESTIMATORS))})")


def hf_config_dict(model_cfg, moe_cfg) -> dict:
    """Keyword arguments of ``transformers.SwitchTransformersConfig`` for this model."""
    encoder_only = model_cfg.arch == "encoder"
    jitter = moe_cfg.jitter_eps if (moe_cfg.estimator == "switch" and moe_cfg.jitter_mode == "input") else 0.0
    num_dec = 0 if encoder_only else model_cfg.num_decoder_layers
    return dict(
        architectures=["SwitchTransformersEncoderModel" if encoder_only else "SwitchTransformersForConditionalGeneration"],
        vocab_size=model_cfg.vocab_size, d_model=model_cfg.d_model, d_kv=model_cfg.d_kv, d_ff=model_cfg.d_ff,
        num_layers=model_cfg.num_layers, num_decoder_layers=num_dec, num_heads=model_cfg.num_heads,
        num_experts=moe_cfg.num_experts, expert_capacity=EXPORT_EXPERT_CAPACITY,
        num_sparse_encoder_layers=hf_num_sparse_layers(model_cfg.num_layers, moe_cfg.sparse_step),
        num_sparse_decoder_layers=0 if encoder_only else hf_num_sparse_layers(num_dec, moe_cfg.sparse_step),
        router_bias=False, router_jitter_noise=float(jitter), router_dtype="float32",
        router_ignore_padding_tokens=True,
        relative_attention_num_buckets=model_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=model_cfg.relative_attention_max_distance,
        dropout_rate=model_cfg.dropout_rate, layer_norm_epsilon=model_cfg.layer_norm_epsilon,
        router_z_loss_coef=moe_cfg.z_coef, router_aux_loss_coef=moe_cfg.balance_loss_weight,
        dense_act_fn="relu", is_encoder_decoder=not encoder_only, use_cache=not encoder_only,
        tie_word_embeddings=model_cfg.tie_word_embeddings, pad_token_id=model_cfg.pad_token_id,
        eos_token_id=model_cfg.eos_token_id, decoder_start_token_id=model_cfg.decoder_start_token_id,
    )


def model_overrides_from_hf(config: dict) -> dict:
    """Dotted ``model.*`` / ``moe.*`` overrides (the shape of a preset) for an HF config dict."""
    if config.get("model_type") != "switch_transformers":
        raise ConversionError(f"not a SwitchTransformers checkpoint (model_type={config.get('model_type')!r})")
    act = config.get("dense_act_fn", config.get("feed_forward_proj", "relu"))
    if act != "relu":
        raise ConversionError(f"dense_act_fn={act!r} is not supported (moetrain's experts are ReLU, "
                              "the original Switch Transformer)")
    if config.get("router_bias", False):
        raise ConversionError("router_bias=True is not supported (moetrain's router is bias-free)")
    archs = config.get("architectures") or ["SwitchTransformersForConditionalGeneration"]
    encoder_only = "SwitchTransformersEncoderModel" in archs
    num_layers = config.get("num_layers", 12)
    num_dec = config.get("num_decoder_layers") or num_layers
    enc = hf_sparse_layers(num_layers, config.get("num_sparse_encoder_layers", 3))
    dec = hf_sparse_layers(num_dec, config.get("num_sparse_decoder_layers", 3))
    for step in range(1, max(num_layers, num_dec) + 2):
        ok_enc = enc == {i for i in range(num_layers) if is_sparse_layer(i, step)}
        ok_dec = encoder_only or dec == {i for i in range(num_dec) if is_sparse_layer(i, step)}
        if ok_enc and ok_dec:
            break
    else:
        raise ConversionError(f"sparse layers encoder {sorted(enc)} / decoder {sorted(dec)} do not follow one "
                              "moe.sparse_step (i % step == 1) for both stacks")
    eos = config.get("eos_token_id", 1)
    out = {
        "model.arch": "encoder" if encoder_only else "encoder_decoder",
        "model.vocab_size": config.get("vocab_size", 32128),
        "model.d_model": config.get("d_model", 768),
        "model.d_kv": config.get("d_kv", 64),
        "model.d_ff": config.get("d_ff", 2048),
        "model.num_layers": num_layers,
        "model.num_heads": config.get("num_heads", 12),
        "model.relative_attention_num_buckets": config.get("relative_attention_num_buckets", 32),
        "model.relative_attention_max_distance": config.get("relative_attention_max_distance", 128),
        "model.layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-6),
        "model.tie_word_embeddings": config.get("tie_word_embeddings", True),
        "model.pad_token_id": config.get("pad_token_id", 0),
        "model.eos_token_id": eos[0] if isinstance(eos, list) else eos,
        "model.decoder_start_token_id": config.get("decoder_start_token_id", config.get("pad_token_id", 0)),
        "moe.num_experts": config.get("num_experts", 8),
        "moe.sparse_step": step,
    }
    if not encoder_only:
        out["model.num_decoder_layers"] = num_dec
    return out
