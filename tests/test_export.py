"""Export to / import from stock HF SwitchTransformers: loading, logit parity, round trips, errors.

HF's classes are the oracle: exported directories are loaded with ``from_pretrained`` and run
side by side with moetrain's model on the same batch (with padding).
"""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from moetrain.checkpoint_format import read_portable, resolve_portable, save_portable
from moetrain.config import load_config
from moetrain.commands.export import add_export_arguments, main_export
from moetrain.export import ExportError, export_to_hf, import_from_hf, load_hf_state_dict, verify_export
from moetrain.hf_convert import EXPORT_EXPERT_CAPACITY, ConversionError, hf_num_sparse_layers, hf_sparse_layers
from moetrain.models import build_model, is_sparse_layer
from moetrain.moe import MoELayer

from test_models import build, padded_batch, tiny_cfgs

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")
TOL = 1e-4


def make_tokenizer(path, size: int = 24):
    """A word-level PreTrainedTokenizerFast with T5's special ids (0 pad, 1 eos, 2 unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


def load_hf(path, cls=None):
    cls = cls or transformers.SwitchTransformersForConditionalGeneration
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model.eval()


def compare_logits(model, hf, with_padding: bool = True) -> float:
    src, mask, tgt = padded_batch()
    if not with_padding:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        ours = model.eval()(src, mask, tgt).logits
        theirs = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    return float((ours - theirs).abs().max())


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def test_export_loads_cleanly_and_logits_match(tmp_path):
    model, model_cfg, moe_cfg = build()
    out = tmp_path / "hf"
    export_to_hf(model.state_dict(), model_cfg, moe_cfg, out, tokenizer_dir=make_tokenizer(tmp_path / "tok"),
                 generation=dict(num_beams=4, length_penalty=0.6, max_length=33))
    hf = load_hf(out)
    gap = compare_logits(model, hf)
    print(f"switch enc-dec max |logit gap| = {gap:.2e}")
    assert gap < TOL
    assert verify_export(out, model.state_dict(), model_cfg, moe_cfg) < TOL
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SwitchTransformersForConditionalGeneration"]
    assert (config["decoder_start_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 0, 1)
    assert config["expert_capacity"] == EXPORT_EXPERT_CAPACITY and config["num_experts"] == 4
    assert (config["num_sparse_encoder_layers"], config["num_sparse_decoder_layers"]) == (1, 1)
    assert config["router_jitter_noise"] == pytest.approx(moe_cfg.jitter_eps)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["num_beams"], gen["length_penalty"], gen["max_length"], gen["early_stopping"]) == (4, 0.6, 33, True)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (len(tok), tok.pad_token_id, tok.eos_token_id) == (24, 0, 1)
    assert json.loads((out / "moetrain_export.json").read_text())["inference_parity"] == "exact"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


@pytest.mark.parametrize("estimator", ["st", "reinmax"])
def test_dense_estimator_models_export_exactly(tmp_path, estimator):
    model, model_cfg, moe_cfg = build(moe__estimator=estimator, model__tie_word_embeddings=False,
                                      model__num_layers=4, moe__sparse_step=3)
    export_to_hf(model.state_dict(), model_cfg, moe_cfg, tmp_path / "hf")
    assert compare_logits(model, load_hf(tmp_path / "hf")) < TOL


def test_sharded_export(tmp_path):
    model, model_cfg, moe_cfg = build(moe__sparse_step=1)
    export_to_hf(model.state_dict(), model_cfg, moe_cfg, tmp_path / "hf", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert compare_logits(model, load_hf(tmp_path / "hf")) < TOL


def _router_argmax(model, hf, src, mask, tgt):
    """Chosen expert per real token in every MoE layer, for moetrain and HF."""
    logits = []
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: logits.append(out.argmax(-1)))
             for m in model.modules() if isinstance(m, MoELayer)]
    with torch.no_grad():
        model(src, mask, tgt)
        hf_out = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_router_logits=True)
    for h in hooks:
        h.remove()
    valid = mask.bool()
    logits[0] = logits[0][valid.flatten()]  # the encoder layer; the router sees padding rows too
    theirs = [r.argmax(-1)[valid].flatten() for r in hf_out.encoder_router_logits]
    theirs += [r.argmax(-1).flatten() for r in hf_out.decoder_router_logits]
    return logits, theirs


@pytest.mark.parametrize("eps,exact", [(0.99, True), (0.05, False)])
def test_sparsemixer_export(tmp_path, eps, exact):
    """omega is folded exactly; the masked-softmax gate is not HF's plain softmax."""
    model, model_cfg, moe_cfg = build(moe__estimator="sparsemixer", moe__jitter_eps=eps)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("estimator.omega"):
                p.uniform_(0.5, 1.5)  # a trained omega is not all ones
    with pytest.warns(UserWarning, match="approximate"):
        export_to_hf(model.state_dict(), model_cfg, moe_cfg, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    src, mask, tgt = padded_batch()
    ours, theirs = _router_argmax(model.eval(), hf, src, mask, tgt)
    # The first MoE layer sees identical inputs, so it routes identically; later layers see
    # states that moved with the gate difference and may flip near-ties.
    assert torch.equal(ours[0], theirs[0])
    agree = float(torch.cat(ours).eq(torch.cat(theirs)).float().mean())
    gap = compare_logits(model, hf)
    print(f"sparsemixer eps={eps}: routing agreement {agree:.3f}, max |logit gap| = {gap:.2e}")
    # eps=0.99 masks no expert here, so the gate equals the softmax and only omega matters.
    assert (gap < TOL) == exact and (agree == 1.0 or not exact) and agree > 0.9


def test_encoder_only_export_with_heads(tmp_path):
    model, model_cfg, moe_cfg = build(model__arch="encoder")
    state = {f"disc.{k}": v for k, v in model.state_dict().items()}
    state["disc_head.weight"] = torch.randn(2, 32)
    export_to_hf(state, model_cfg, moe_cfg, tmp_path / "hf", tokenizer_dir=make_tokenizer(tmp_path / "tok"))
    hf = load_hf(tmp_path / "hf", transformers.SwitchTransformersEncoderModel)
    src, mask, _ = padded_batch()
    with torch.no_grad():
        ours, _ = model.eval()(src, mask)
        theirs = hf(input_ids=src, attention_mask=mask).last_hidden_state
    valid = mask.bool()  # padding positions: HF routes them, moetrain does not
    assert float((ours - theirs).abs()[valid].max()) < TOL
    heads = load_file(str(tmp_path / "hf" / "moetrain_heads.safetensors"))
    assert list(heads) == ["disc_head.weight"]
    assert verify_export(tmp_path / "hf", state, model_cfg, moe_cfg) < TOL


def test_sparse_layer_counts_reproduce_our_placement():
    """HF derives its step as num_layers // num_sparse; some (layers, step) pairs have no match."""
    unsupported = []
    for layers in range(1, 13):
        for step in range(1, 6):
            ours = {i for i in range(layers) if is_sparse_layer(i, step)}
            try:
                n = hf_num_sparse_layers(layers, step)
            except ConversionError:
                unsupported.append((layers, step))
                continue
            assert hf_sparse_layers(layers, n) == ours
    # Every step that divides the layer count, and steps 1 and 2 always, can be exported; a
    # 1-layer stack cannot be dense in HF (num_sparse 0 still makes block 0 sparse there).
    assert all((layers % step and step > 2) or layers == 1 for layers, step in unsupported), unsupported
    assert (5, 3) in unsupported  # layers 1 and 4: HF can only make {1}, {1, 3} or all sparse


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------


def _random_hf(tmp_path, **kwargs):
    config = transformers.SwitchTransformersConfig(
        vocab_size=30, d_model=16, d_kv=4, d_ff=24, num_layers=4, num_decoder_layers=2, num_heads=2,
        num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, expert_capacity=64,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, **kwargs)
    torch.manual_seed(0)
    hf = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    if not config.tie_word_embeddings:
        # Untied, HF keeps separate stack embeddings (shared.weight is unused); a T5-style
        # checkpoint has them equal, which is what moetrain's single embedding can hold.
        with torch.no_grad():
            hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
            hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    hf.save_pretrained(str(tmp_path / "orig"))
    return hf, tmp_path / "orig"


@pytest.mark.parametrize("tied", [True, False])
def test_import_export_round_trip_is_bit_exact(tmp_path, tied):
    hf, orig = _random_hf(tmp_path, tie_word_embeddings=tied)
    for estimator in ("switch", "sparsemixer"):
        state, overrides = import_from_hf(orig, estimator=estimator)
        assert overrides["moe.sparse_step"] == 2 and overrides["model.num_layers"] == 4
        model_cfg, moe_cfg = tiny_cfgs()
        model_cfg = type(model_cfg)(**{k[6:]: v for k, v in overrides.items() if k.startswith("model.")})
        moe_cfg = type(moe_cfg)(**{k[4:]: v for k, v in overrides.items() if k.startswith("moe.")},
                                estimator=estimator)
        # The imported weights run in moetrain as they ran in HF (SparseMixer's masked gate differs).
        torch.manual_seed(0)
        model = build_model(model_cfg, moe_cfg)
        model.load_state_dict(state)
        if estimator == "switch":
            assert compare_logits(model, hf) < TOL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_to_hf(state, model_cfg, moe_cfg, tmp_path / estimator)
        original, again = load_hf_state_dict(orig), load_hf_state_dict(tmp_path / estimator)
        assert set(again) <= set(original)
        for key, value in original.items():
            if key in again:
                assert torch.equal(value, again[key]) and value.dtype == again[key].dtype, key
            else:  # a tied alias HF may have written
                assert key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def test_import_rejects_other_architectures(tmp_path):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConversionError, match="model_type='t5'"):
        import_from_hf(t5)
    _, orig = _random_hf(tmp_path, dense_act_fn="gelu")
    with pytest.raises(ConversionError, match="dense_act_fn"):
        import_from_hf(orig)
    with pytest.raises(ExportError, match="config.json"):
        import_from_hf(tmp_path / "nowhere")


# ---------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ---------------------------------------------------------------------------


def test_bad_inputs_write_nothing(tmp_path):
    model, model_cfg, moe_cfg = build()
    state = model.state_dict()
    out = tmp_path / "hf"
    # A checkpoint of another architecture (encoder-only weights, or other layer counts).
    enc_model, _, _ = build(model__arch="encoder")
    with pytest.raises(ConversionError, match="missing .* key"):
        export_to_hf(enc_model.state_dict(), model_cfg, moe_cfg, out)
    deeper, _, _ = build(model__num_layers=5)
    with pytest.raises(ConversionError, match="unexpected .* key"):
        export_to_hf(deeper.state_dict(), model_cfg, moe_cfg, out)
    # A vocabulary size that does not fit.
    wide, _, _ = build(model__vocab_size=40)
    with pytest.raises(ConversionError, match="embed.weight: shape"):
        export_to_hf(wide.state_dict(), model_cfg, moe_cfg, out)
    with pytest.raises(ExportError, match="vocab size mismatch: the tokenizer has 50 tokens"):
        export_to_hf(state, model_cfg, moe_cfg, out, tokenizer_dir=make_tokenizer(tmp_path / "big", 50))
    with pytest.raises(ExportError, match="missing tokenizer"):
        export_to_hf(state, model_cfg, moe_cfg, out, tokenizer_dir=tmp_path / "no-tokenizer")
    (tmp_path / "big" / "junk").mkdir()
    with pytest.raises(ExportError, match="cannot load the tokenizer"):
        export_to_hf(state, model_cfg, moe_cfg, out, tokenizer_dir=tmp_path / "big" / "junk")
    # Routing HF cannot run.
    with pytest.raises(ConversionError, match="top_k=2"):
        export_to_hf(state, model_cfg, tiny_cfgs(moe__estimator="topk", moe__top_k=2)[1], out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]
    # A failed re-export leaves the earlier export intact.
    export_to_hf(state, model_cfg, moe_cfg, out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ExportError, match="missing tokenizer"):
        export_to_hf(state, model_cfg, moe_cfg, out, tokenizer_dir=tmp_path / "no-tokenizer", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    # Never replace a directory that is not an export.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_to_hf(state, model_cfg, moe_cfg, tmp_path / "precious")


# ---------------------------------------------------------------------------
# Portable checkpoints and the command line
# ---------------------------------------------------------------------------


def _run_cfg(repo_root):
    overrides = ["model.vocab_size=24", "data.vocab_size=24", "model.d_model=32", "model.d_ff=40", "model.d_kv=8",
                 "model.num_heads=4", "moe.num_experts=4", "model.dropout_rate=0.0"]
    return load_config(repo_root / "configs" / "tiny.yaml", overrides)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    return parser.parse_args(argv)


def test_portable_and_cli_export(tmp_path, repo_root, capsys):
    cfg = _run_cfg(repo_root)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    step = tmp_path / "run" / "checkpoints" / "step_000020"
    save_portable(model.state_dict(), cfg, make_tokenizer(tmp_path / "tok"), step / "portable")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000020\n")
    for where in (step / "portable", step, tmp_path / "run", tmp_path / "run" / "checkpoints"):
        assert resolve_portable(where) == step / "portable"
    ckpt = read_portable(tmp_path / "run")
    state, loaded = ckpt.weights, ckpt.cfg
    assert loaded == cfg and all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    assert main_export(_parse([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--verify"])) == 0
    printed = capsys.readouterr().out
    assert "max |moetrain - HF|" in printed
    assert float(printed.rsplit("=", 1)[1]) < TOL
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["num_beams"], gen["max_length"]) == (cfg.train.beam_size, cfg.train.max_decode_length + 1)
    load_hf(tmp_path / "hf")


def test_bare_tokenizer_file_is_wrapped(tmp_path):
    """A tokenizer directory holding only tokenizer.json still exports (special tokens named)."""
    make_tokenizer(tmp_path / "full")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_bytes((tmp_path / "full" / "tokenizer.json").read_bytes())
    model, model_cfg, moe_cfg = build()
    export_to_hf(model.state_dict(), model_cfg, moe_cfg, tmp_path / "hf", tokenizer_dir=tmp_path / "bare")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (len(tok), tok.pad_token_id, tok.eos_token_id) == (24, 0, 1)


def test_through_the_cli_parser(tmp_path, repo_root, monkeypatch):
    """How ``moetrain export`` is meant to be registered: these arguments, this function."""
    from moetrain import cli

    monkeypatch.setitem(cli.COMMANDS, "export", cli.Command("export", "export", add_export_arguments, main_export))
    cfg = _run_cfg(repo_root)
    torch.manual_seed(0)
    save_portable(build_model(cfg.model, cfg.moe).state_dict(), cfg, make_tokenizer(tmp_path / "tok"),
                  tmp_path / "ckpt" / "portable")
    assert cli.main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--max-shard-size", "50KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    load_hf(tmp_path / "hf")


def test_cli_errors_are_one_line(tmp_path, repo_root, capsys):
    assert main_export(_parse([str(tmp_path / "nothing"), "--out", str(tmp_path / "hf")])) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main_export(_parse([str(tmp_path / "empty"), "--out", str(tmp_path / "hf")])) == 2
    assert "no portable checkpoint" in capsys.readouterr().err
    cfg = _run_cfg(repo_root)
    torch.manual_seed(0)
    save_portable(build_model(cfg.model, cfg.moe).state_dict(), cfg, None, tmp_path / "p")
    assert main_export(_parse([str(tmp_path / "p"), "--out", str(tmp_path / "hf")])) == 2
    assert "missing tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_aux_free_bias_is_dropped_with_a_warning_and_its_agreement(tmp_path):
    """HF's router cannot take a selection-only bias: a zero bias exports exactly, a trained one
    is dropped with a warning that says how many tokens still route alike."""
    model, model_cfg, moe_cfg = build(moe__balance="aux_free")
    assert any(k.endswith(".selection_bias") for k in model.state_dict())
    with pytest.warns(UserWarning, match="aux-loss-free"):
        export_to_hf(model.state_dict(), model_cfg, moe_cfg, tmp_path / "zero")
    assert json.loads((tmp_path / "zero" / "moetrain_export.json").read_text())["inference_parity"] == "approximate"
    with pytest.warns(UserWarning, match=r"top-1 agreement .* min 100\.0%"):
        assert verify_export(tmp_path / "zero", model.state_dict(), model_cfg, moe_cfg) < TOL

    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("selection_bias"):
                buf.copy_(torch.linspace(-0.3, 0.3, buf.numel()))
    with pytest.warns(UserWarning, match="aux-loss-free"):
        export_to_hf(model.state_dict(), model_cfg, moe_cfg, tmp_path / "biased")
    with pytest.warns(UserWarning, match=r"top-1 agreement .* min (?!100\.0%)\d+\.\d%") as record:
        gap = verify_export(tmp_path / "biased", model.state_dict(), model_cfg, moe_cfg)
    assert gap > TOL, [str(w.message) for w in record]
