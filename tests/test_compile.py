"""train.compile: compiled blocks compute what eager blocks compute, and fall back cleanly.

Compilation costs tens of seconds per block type on a 2-core CPU, so the model tests share one
compiled model (module fixture) and the trainer test is the acceptance check: the first 20 demo
steps with compile on and off.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from moetrain.config import load_config
from moetrain.models.compile import compile_blocks
from moetrain.models.generation import generate
from moetrain.models.switch import SwitchTransformer

OVERRIDES = ["model.dropout_rate=0.1"]  # dropout on: compiled masks must match eager ones


def _batch():
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(3, 200, (4, 12), generator=g), torch.randint(3, 200, (4, 9), generator=g)
    mask = torch.ones_like(src)
    mask[0, -4:] = 0
    return src, mask, tgt


@pytest.fixture(scope="module")
def pair():
    cfg = load_config("configs/tiny.yaml", OVERRIDES)
    torch.manual_seed(0)
    eager = SwitchTransformer(cfg.model, cfg.moe)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == cfg.model.num_layers + cfg.model.num_decoder_layers
    return eager, compiled


def _loss_and_grads(model, seed: int):
    model.zero_grad(set_to_none=True)
    src, mask, tgt = _batch()
    torch.manual_seed(seed)
    out = model(src, mask, tgt)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), torch.roll(tgt, -1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_match_eager_with_dropout(pair):
    eager, compiled = pair
    eager.train(), compiled.train()
    for seed in (1, 2):
        loss_e, grads_e = _loss_and_grads(eager, seed)
        loss_c, grads_c = _loss_and_grads(compiled, seed)
        assert torch.allclose(loss_e, loss_c, rtol=1e-5, atol=1e-6), (loss_e, loss_c)
        assert grads_e.keys() == grads_c.keys()
        for name in grads_e:
            assert torch.allclose(grads_e[name], grads_c[name], rtol=1e-4, atol=1e-6), name
    # Another dropout seed gives another loss: the comparison above could fail.
    assert not torch.allclose(_loss_and_grads(eager, 1)[0], _loss_and_grads(eager, 9)[0])


def test_incremental_decoding_runs_eagerly_and_agrees(pair):
    eager, compiled = pair
    eager.eval(), compiled.eval()
    src, mask, _ = _batch()
    with torch.no_grad():
        want = generate(eager, src, mask, num_beams=2, max_length=8)
        got = generate(compiled, src, mask, num_beams=2, max_length=8)
    assert torch.equal(want, got)


def test_a_failed_compilation_warns_and_runs_eagerly(monkeypatch):
    def broken(fn, **_):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    cfg = load_config("configs/tiny.yaml", [])
    torch.manual_seed(0)
    eager = SwitchTransformer(cfg.model, cfg.moe).eval()
    fallback = copy.deepcopy(eager)
    compile_blocks(fallback)
    src, mask, tgt = _batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fallback(src, mask, tgt).logits
    assert any("torch.compile failed" in str(w.message) and "no C++ compiler" in str(w.message) for w in caught)
    assert torch.equal(out, eager(src, mask, tgt).logits)


def test_an_error_of_the_code_itself_is_raised_not_hidden(monkeypatch):
    from moetrain.models.compile import _CompiledOrEager

    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)  # "compiled" = the eager code

    def wrong(x, cache=None):
        raise ValueError("shapes do not match")

    region = _CompiledOrEager(wrong, "block")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compile failed" warning either
        with pytest.raises(ValueError, match="shapes do not match"):
            region(torch.zeros(1))
    assert region.compiled is not None  # not mistaken for a compiler failure


def test_demo_losses_with_compile_on_and_off_agree(tmp_path):
    """The issue's check: the first 20 steps of the demo recipe, compiled vs eager, to 1e-5."""
    from moetrain.train.trainer import train

    losses = {}
    for compiled in (False, True):
        cfg = load_config("configs/demo.yaml", [f"train.compile={str(compiled).lower()}", "train.max_steps=20",
                                                "train.log_every=1", "train.eval_every=0", "train.save_every=0",
                                                "train.plot=false", "export.after_train=false",
                                                "data.synthetic_num_train=2000", "model.dropout_rate=0.1"])
        out = tmp_path / f"compile-{compiled}"
        train(cfg, out, save=False)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses[True]) == 20
    for step, (a, b) in enumerate(zip(losses[False], losses[True]), 1):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, a, b)
