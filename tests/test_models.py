"""Switch Transformer models: layout, masks, stats, cache, presets (HF's code as an oracle only).

The helpers at the top (tiny configs, a briefly trained model) are shared with
test_generation.py and test_export.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ModelConfig, MoEConfig
from moetrain.models import (
    PRESETS,
    SwitchEncoderModel,
    SwitchTransformer,
    build_model,
    is_sparse_layer,
    moe_aux_loss,
    router_stats,
)
from moetrain.models.attention import relative_position_bucket
from moetrain.moe import MoELayer


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def tiny_cfgs(**overrides) -> tuple[ModelConfig, MoEConfig]:
    """Odd sizes on purpose (d_kv != d_model / heads, 3 encoder vs 2 decoder blocks)."""
    model = dict(vocab_size=24, d_model=32, d_kv=6, d_ff=40, num_layers=3, num_decoder_layers=2, num_heads=4,
                 dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    moe = dict(num_experts=4, estimator="switch", sparse_step=2, eval_capacity_factor=None)
    for key, value in overrides.items():
        section, name = key.split("__")
        (model if section == "model" else moe)[name] = value
    return ModelConfig(**model), MoEConfig(**moe)


def build(seed: int = 0, **overrides):
    model_cfg, moe_cfg = tiny_cfgs(**overrides)
    torch.manual_seed(seed)
    return build_model(model_cfg, moe_cfg), model_cfg, moe_cfg


def reverse_batch(gen: torch.Generator, n: int, vocab: int = 24, max_len: int = 8):
    """Toy translation: the target is the source reversed. Returns (src, src_mask, tgt_in, tgt_mask, labels)."""
    lens = torch.randint(1, max_len + 1, (n,), generator=gen)
    src = torch.zeros(n, max_len + 1, dtype=torch.long)
    tgt = torch.zeros(n, max_len + 2, dtype=torch.long)
    for i, length in enumerate(lens.tolist()):
        s = torch.randint(2, vocab, (length,), generator=gen)
        src[i, :length], src[i, length] = s, 1
        tgt[i, 1 : length + 1], tgt[i, length + 1] = s.flip(0), 1
    tgt_in, labels = tgt[:, :-1], tgt[:, 1:]
    tgt_mask = (tgt_in != 0) | (torch.arange(tgt_in.shape[1]) == 0)
    return src, (src != 0).long(), tgt_in, tgt_mask.long(), labels


def train_reverse(steps: int = 60, seed: int = 0, **overrides):
    """A tiny model trained briefly on reversal: its outputs vary and end in EOS at many lengths."""
    model, model_cfg, moe_cfg = build(seed, model__vocab_size=24, **overrides)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        src, src_mask, tgt_in, tgt_mask, labels = reverse_batch(gen, 32)
        out = model(src, src_mask, tgt_in, tgt_mask)
        ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=0)
        aux, _ = moe_aux_loss(out.moe_stats, moe_cfg.balance_coef, moe_cfg.z_coef)
        (ce + aux).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), model_cfg, moe_cfg


def padded_batch(seed: int = 1, batch: int = 3, src_len: int = 9, tgt_len: int = 6, vocab: int = 24):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(2, vocab, (batch, src_len), generator=gen)
    mask = torch.ones_like(src)
    mask[1, src_len - 3 :] = 0
    mask[2, 2:] = 0
    src = src * mask  # padding id 0 where masked
    tgt = torch.randint(2, vocab, (batch, tgt_len), generator=gen)
    tgt[:, 0] = 0
    return src, mask, tgt


# ---------------------------------------------------------------------------
# Layout and presets
# ---------------------------------------------------------------------------


def test_sparse_placement_follows_hf():
    model, _, _ = build()
    assert model.moe_layer_names == ["encoder.1", "decoder.1"]
    assert [m.layer_id for m in model.modules() if isinstance(m, MoELayer)] == [0, 1]
    assert [i for i in range(12) if is_sparse_layer(i, 2)] == [1, 3, 5, 7, 9, 11]
    assert [i for i in range(5) if is_sparse_layer(i, 1)] == [0, 1, 2, 3, 4]
    every, _, _ = build(moe__sparse_step=1)
    assert len(every.moe_layer_names) == 5
    # Only the first block owns the position bias; no other key says "expert".
    keys = list(model.state_dict())
    assert sum("rel_bias" in k for k in keys) == 2
    assert all("deepspeed_experts" in k for k in keys if "expert" in k)


def test_presets_shape_and_placement():
    fields = {"model": {f.name for f in dataclasses.fields(ModelConfig)},
              "moe": {f.name for f in dataclasses.fields(MoEConfig)}}
    for name, preset in PRESETS.items():
        for key in preset:
            section, field = key.split(".")
            assert field in fields[section], f"{name}: {key}"
        sparse = [i for i in range(preset["model.num_layers"]) if is_sparse_layer(i, preset["moe.sparse_step"])]
        assert sparse, name
    assert PRESETS["switch-tiny"]["model.d_model"] == 64 and PRESETS["switch-tiny"]["moe.num_experts"] == 4
    for n in (8, 16, 32, 64, 128):
        p = PRESETS[f"switch-base-{n}"]
        assert (p["model.d_model"], p["model.d_ff"], p["model.num_heads"], p["model.num_layers"]) == (768, 3072, 12, 12)
        assert p["moe.num_experts"] == n and p["model.vocab_size"] == 32128
    wmt = PRESETS["wmt14-6-6"]
    assert [i for i in range(6) if is_sparse_layer(i, wmt["moe.sparse_step"])] == [1, 3, 5]


def test_relative_position_buckets_match_hf():
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

    rel = torch.arange(-400, 401)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 16), (7, 20)):
            ours = relative_position_bucket(rel, bidirectional, buckets, distance)
            hf = SwitchTransformersAttention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(ours, hf), (bidirectional, buckets, distance)


# ---------------------------------------------------------------------------
# Forward, padding, stats
# ---------------------------------------------------------------------------


def test_forward_shapes_stats_and_aux_loss():
    model, model_cfg, moe_cfg = build()
    src, mask, tgt = padded_batch()
    out = model(src, mask, tgt)
    assert out.logits.shape == (3, 6, 24) and out.logits.dtype == torch.float32
    assert out.encoder_hidden_states.shape == (3, 9, 32)
    assert len(out.moe_stats) == len(model.moe_layer_names) == 2
    # Padding never reaches the router: the encoder layer routes exactly the real tokens.
    assert out.moe_stats[0].num_tokens == int(mask.sum())
    kept = int(out.moe_stats[0].tokens_per_expert.sum())  # training capacity 1.25 may drop some
    assert kept == round((1 - float(out.moe_stats[0].dropped_fraction)) * int(mask.sum()))
    aux, logs = moe_aux_loss(out.moe_stats, 0.01, 0.001)
    balance = sum(float(s.balance_loss.detach()) for s in out.moe_stats)
    z = sum(float(s.z_loss.detach()) for s in out.moe_stats)
    assert logs["balance_loss"] == pytest.approx(balance) and logs["z_loss"] == pytest.approx(z)
    assert float(aux.detach()) == pytest.approx(0.01 * balance + 0.001 * z)
    stats = router_stats(out.moe_stats, model.moe_layer_names)
    for layer in model.moe_layer_names:
        loads = [stats[f"moe/{layer}/load_{j}"] for j in range(4)]
        assert sum(loads) == pytest.approx(1.0)
        for key in ("dropped", "entropy", "balance", "z", "max_load", "tokens"):
            assert f"moe/{layer}/{key}" in stats
    with pytest.raises(ValueError):
        router_stats(out.moe_stats, ["only-one"])


def test_padding_content_does_not_matter():
    model, _, _ = build()
    model.eval()
    src, mask, tgt = padded_batch()
    other = torch.where(mask.bool(), src, torch.randint(2, 24, src.shape))
    a, b = model(src, mask, tgt), model(other, mask, tgt)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    dec_mask = torch.ones_like(tgt)
    dec_mask[0, 4:] = 0
    c = model(src, mask, tgt, dec_mask)
    tgt2 = tgt.clone()
    tgt2[0, 4:] = 5
    d = model(src, mask, tgt2, dec_mask)
    torch.testing.assert_close(c.logits[0, :4], d.logits[0, :4], rtol=0, atol=1e-6)
    assert c.moe_stats[1].num_tokens == int(dec_mask.sum())


def test_backward_reaches_every_parameter_kind():
    model, _, _ = build(model__dropout_rate=0.1)
    model.train()
    src, mask, tgt = padded_batch()
    out = model(src, mask, tgt)
    aux, _ = moe_aux_loss(out.moe_stats, 0.01, 0.001)
    (out.logits.logsumexp(-1).mean() + aux).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("embed.weight", "encoder.rel_bias.weight", "decoder.layers.0.cross_attn.k.weight",
                 "encoder.layers.1.ffn.router.classifier.weight", "decoder.layers.1.ffn_norm.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "deepspeed_experts" in n)


def test_init_is_seeded_and_untied_head():
    a, _, _ = build(seed=3)
    b, _, _ = build(seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    untied, model_cfg, _ = build(model__tie_word_embeddings=False)
    assert "lm_head.weight" in untied.state_dict()
    assert float(untied.lm_head.weight.detach().std()) == pytest.approx(model_cfg.d_model**-0.5, rel=0.2)
    tied, _, _ = build()
    assert "lm_head.weight" not in tied.state_dict()


def test_encoder_model_and_empty_batch():
    model, model_cfg, _ = build(model__arch="encoder")
    assert isinstance(model, SwitchEncoderModel) and model.moe_layer_names == ["encoder.1"]
    src, mask, _ = padded_batch()
    hidden, stats = model(src, mask)
    assert hidden.shape == (3, 9, 32) and len(stats) == 1
    empty, _ = model(src[:0], mask[:0])
    assert empty.shape == (0, 9, 32)
    with pytest.raises(ValueError, match="arch"):
        build_model(dataclasses.replace(model_cfg, arch="decoder"), tiny_cfgs()[1])


# ---------------------------------------------------------------------------
# Incremental decoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3])
def test_cached_decoding_equals_full_decoding(group):
    model, _, _ = build()
    model.eval()
    assert isinstance(model, SwitchTransformer)
    src, mask, tgt = padded_batch()
    with torch.no_grad():
        memory, _ = model.encode(src, mask)
        # Full pass on every hypothesis row (G copies of each sentence, distinct targets).
        rows_tgt = torch.randint(2, 24, (3 * group, tgt.shape[1]), generator=torch.Generator().manual_seed(2))
        rows_tgt[:, 0] = 0
        rep = torch.arange(3).repeat_interleave(group)
        full, _ = model.decode(rows_tgt, memory[rep], mask[rep])
        cache = model.new_cache(memory, mask, group=group)
        steps = [model.decode_step(rows_tgt[:, t], cache, rep) for t in range(rows_tgt.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == rows_tgt.shape[1]
