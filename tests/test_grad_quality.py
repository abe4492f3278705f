"""The gradient-quality diagnostic (moetrain/moe/grad_quality.py, docs/estimators.md "Gradient quality").

Float64 on a layer small enough to enumerate the sampled expert: the module's exact gradient is
autograd of the enumerated expected output, and the estimators that are unbiased for an objective
linear in the one-hot choice (ST and ReinMax at temperature 1, unmasked SparseMixer v1) average to
it exactly. Then the bench command on configs/tiny.yaml and the trainer's grad_quality records.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from moetrain.config import load_config
from moetrain.moe import FixedNoise, MoELayer
from moetrain.moe.grad_quality import (DEFAULT_ESTIMATORS, Capture, LayerCapture, build_top1_estimators,
                                       compare_estimators, estimator_gradient, exact_gradient, expert_scores)
from moetrain.moe.noise import STREAM_COIN, STREAM_SAMPLE

F64 = torch.float64
E, DIM, T = 4, 6, 7


def forced(D: int, T: int, E: int = E) -> torch.Tensor:
    """Uniforms that make Gumbel-max / exponential sampling pick expert D on every token."""
    u = torch.full((T, E), 1e-300, dtype=F64)
    u[:, D] = 1.0 - 2.0**-53
    return u


def problem(seed: int, T: int = T, scale: float = 2.0):
    torch.manual_seed(seed)
    layer = MoELayer(DIM, 8, E, estimator="switch", capacity_factor=None, layer_id=seed).double()
    x = scale * torch.randn(T, DIM, dtype=F64)
    g = torch.randn(T, DIM, dtype=F64)
    return layer, x, g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_gradient_is_autograd_of_the_enumerated_expectation(seed):
    """d/dtheta sum_t sum_i pi_ti <g_t, pi_ti f_i(x_t)>, every expert's output computed in full."""
    layer, x, g = problem(seed)
    with torch.no_grad():
        logits = layer.router(x)
    exact = exact_gradient(logits, expert_scores(layer, x, g))

    theta = logits.clone().requires_grad_(True)
    pi = theta.softmax(-1)
    with torch.no_grad():
        h = [expert(x) for expert in layer.experts.deepspeed_experts]
    objective = sum((pi[:, i : i + 1] * (g * (pi[:, i : i + 1] * h[i])).sum(-1, keepdim=True)).sum() for i in range(E))
    reference = torch.autograd.grad(objective, theta)[0]
    assert (exact - reference).abs().max() < 1e-10 * reference.abs().max()
    assert reference.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_unbiased_estimators_average_to_the_exact_gradient(seed):
    """The linearised objective is linear in the one-hot choice, so E_D[ST] and E_D[ReinMax] at
    temperature 1 and E_D[SparseMixer v1] without a mask (its x2 counts the sampling term, equal to
    the gate term here) are exact; ST at another temperature and the argmax Switch are not."""
    layer, x, g = problem(seed)
    with torch.no_grad():
        logits = layer.router(x)
    scores = expert_scores(layer, x, g)
    exact, pi = exact_gradient(logits, scores), logits.softmax(-1)
    built = build_top1_estimators(["st", "reinmax", "sparsemixer", "switch"], E, DIM, jitter_eps=1.0,
                                  jitter_mode="none", temperature=1.0)
    built["st_tau2"] = build_top1_estimators(["st"], E, DIM, temperature=2.0)["st"]
    coin = torch.full((T, 1), 0.1, dtype=F64)  # mid-point order where allowed: c does not enter the gradient

    def expectation(est):
        return sum(pi[:, D : D + 1] * estimator_gradient(est, logits, scores,
                                                         FixedNoise({STREAM_SAMPLE: forced(D, T), STREAM_COIN: coin}))
                   for D in range(E))

    def err(grad):
        return float((grad - exact).norm() / exact.norm())

    for name in ("st", "reinmax", "sparsemixer"):
        assert err(expectation(built[name])) < 1e-10, name
    assert err(expectation(built["st_tau2"])) > 1e-3
    # Switch: argmax D, gradient a_D p_D (e_D - p) only (no sampling term): biased.
    switch = estimator_gradient(built["switch"], logits, scores, FixedNoise({}))
    ids = logits.argmax(-1, keepdim=True)
    a_d, p_d = scores.gather(-1, ids), pi.gather(-1, ids)
    by_hand = a_d * p_d * (torch.zeros_like(pi).scatter(-1, ids, 1.0) - pi)
    assert (switch - by_hand).abs().max() < 1e-12 * by_hand.abs().max()
    assert err(switch) > 0.1


def test_sparsemixer_mask_leaves_single_candidate_tokens_without_gradient():
    """At eps = 0.1 most tokens keep one expert: their router gradient is exactly 0 (the main source
    of SparseMixer's distance from the unmasked target)."""
    layer, x, g = problem(0, T=64)
    with torch.no_grad():
        logits = layer.router(x)
    from moetrain.moe import sparsemixer_mask

    single = (~sparsemixer_mask(logits, 0.1)).sum(-1) == 1
    assert 0 < int(single.sum()) < 64
    est = build_top1_estimators(["sparsemixer"], E, DIM, jitter_eps=0.1)["sparsemixer"]
    noise = FixedNoise({STREAM_SAMPLE: torch.full((64, E), 0.5, dtype=F64),
                        STREAM_COIN: torch.full((64, 1), 0.9, dtype=F64)})
    grad = estimator_gradient(est, logits, expert_scores(layer, x, g), noise)
    assert grad[single].abs().max() == 0 and grad[~single].abs().max() > 0


@pytest.mark.parametrize("seed", range(4))
def test_table_ordering_with_many_draws(seed):
    """With 64 draws the mean ST / ReinMax gradient is close to the exact one (they are unbiased
    here); the deterministic Switch gradient stays far (no sampling term). Checked over seeds 0-5:
    ST/ReinMax <= 0.11, Switch >= 0.35."""
    layer, x, g = problem(seed, T=40)
    estimators = build_top1_estimators(DEFAULT_ESTIMATORS, E, DIM, jitter_eps=0.1, jitter_mode="none")
    table = compare_estimators(layer, Capture(x, torch.arange(40), g), estimators, draws=64)
    assert set(table) == set(DEFAULT_ESTIMATORS)
    for name in ("st", "reinmax"):
        assert table[name]["rel_error_of_mean"] < 0.5 * table["switch"]["rel_error_of_mean"], (name, table)
        assert table[name]["rel_error_of_mean"] < table[name]["rel_error"]  # averaging draws helps
    # No jitter: Switch is deterministic, every draw is the same gradient.
    assert table["switch"]["cosine"] == pytest.approx(table["switch"]["cosine_of_mean"], abs=1e-12)
    assert all(-1 <= row["cosine"] <= 1 for row in table.values())


def test_layer_capture_takes_valid_tokens_and_dl_dy():
    layer, x, g = problem(0)
    pad = torch.tensor([False, True, False, False, True, False, False])
    with LayerCapture(layer) as cap:
        y, _ = layer(x, padding_mask=pad, token_ids=torch.arange(10, 17))
        (y * g).sum().backward()
    (c,) = cap.captures
    assert torch.equal(c.x, x[~pad]) and torch.equal(c.grad, g[~pad])
    assert c.token_ids.tolist() == [10, 12, 13, 15, 16]
    y, _ = layer(x)  # the hook is gone
    assert len(cap.captures) == 1


def test_top2_and_topk_are_refused():
    with pytest.raises(ValueError, match="top-1"):
        build_top1_estimators(["sparsemixer_v2"], E, DIM)
    with pytest.raises(ValueError, match="topk"):
        build_top1_estimators(["topk"], E, DIM)


# -- the command and the trainer ------------------------------------------------------------


def test_bench_command_on_tiny(tmp_path, capsys, tiny_config_path):
    from moetrain.cli import main

    out = tmp_path / "quality.json"
    names = ["switch", "reinmax", "sparsemixer"]
    code = main(["bench", "estimator-quality", str(tiny_config_path), "--batches", "2", "--draws", "2",
                 "--estimators", *names, "--json", str(out), "--layer", "decoder.layers.1.ffn"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer decoder.layers.1.ffn" in printed
    rows = [line.split() for line in printed.splitlines() if line.split() and line.split()[0] in names]
    assert [r[0] for r in rows] == names
    for row in rows:
        cosine = float(row[1])
        assert -1 <= cosine <= 1 and row[2] == "±"
    result = json.loads(out.read_text())
    assert list(result["summary"]) == names and len(result["batches"]) == 2
    assert all(math.isfinite(result["summary"][n]["rel_error"]["mean"]) for n in names)


def test_bench_command_rejects_unknown_layer(tiny_config_path, capsys):
    from moetrain.cli import main

    code = main(["bench", "estimator-quality", str(tiny_config_path), "--layer", "nope", "--batches", "1"])
    err = capsys.readouterr().err
    assert code == 2  # a user error: one line, no traceback
    assert re.search("moetrain bench estimator-quality: --layer: no MoE layer named 'nope'.*encoder.layers.1.ffn", err)
    assert "Traceback" not in err


def test_trainer_logs_grad_quality_records(tmp_path, tiny_config_path):
    from moetrain.train.trainer import train

    cfg = load_config(tiny_config_path, ["train.max_steps=4", "train.grad_quality_every=2", "train.eval_every=0",
                                         "train.save_every=0", "train.plot=false", "train.log_every=2"])
    train(cfg, tmp_path / "run", save=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    quality = [r for r in records if r["type"] == "grad_quality"]
    assert [r["step"] for r in quality] == [2, 4]
    for r in quality:
        assert r["layer"] == "encoder.layers.1.ffn" and set(r["estimators"]) == set(DEFAULT_ESTIMATORS)
        assert all(-1 <= v["cosine"] <= 1 and v["rel_error"] >= 0 for v in r["estimators"].values())
    assert [r["step"] for r in records if r["type"] == "train"] == [2, 4]  # the usual records are unchanged


def test_grad_quality_every_is_validated(tiny_config_path):
    from moetrain.config import ConfigError

    with pytest.raises(ConfigError, match="train.grad_quality_every"):
        load_config(tiny_config_path, ["train.grad_quality_every=-1"])


def test_cosine_of_a_zero_estimate_is_zero_and_of_a_zero_exact_gradient_undefined():
    from moetrain.moe.grad_quality import _cosine

    exact = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert _cosine(torch.zeros_like(exact), exact) == 0.0
    assert _cosine(2 * exact, exact) == pytest.approx(1.0)
    assert _cosine(-exact, exact) == pytest.approx(-1.0)
    assert math.isnan(_cosine(exact, torch.zeros_like(exact)))


def test_summary_leaves_out_batches_without_an_exact_gradient():
    from moetrain.bench.estimator_quality import format_table, summarise

    row = {"cosine": 0.5, "rel_error": 1.0, "cosine_of_mean": 0.7, "rel_error_of_mean": 0.8}
    empty = {k: math.nan for k in row}
    summary = summarise([{"switch": row}, {"switch": empty}, {"switch": {**row, "cosine": 0.7}}])
    assert summary["switch"]["cosine"]["mean"] == pytest.approx(0.6) and summary["switch"]["cosine"]["n"] == 2
    only_empty = summarise([{"switch": empty}])
    assert only_empty["switch"]["cosine"]["n"] == 0 and math.isnan(only_empty["switch"]["cosine"]["mean"])
    assert "n/a (zero exact gradient)" in format_table(only_empty, draws=4)
