"""Load balancing: the global-batch balance loss and aux-loss-free expert bias.

The distributed test runs 2 gloo processes (EP=1 and EP=2, with and without gradient
accumulation, uneven token counts) against one process holding the concatenated batch: the
loss (mean over ranks) and the router gradient (averaged over ranks, as DeepSpeed reduces it)
must agree to 1e-6; per-rank statistics that claim to be global (the negative control) must not.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.config import ConfigError, load_config
from moetrain.moe import MoELayer, balance_loss, set_routing_step, update_selection_bias
from moetrain.moe.estimators import build_estimator
from moetrain.moe.noise import RoutingNoise
from moetrain.utils.net import free_port
from spawn_workers import run_workers

E, D, D_FF = 4, 6, 8
TIMEOUT_S = 240


def _layer(scope="micro_batch", aux_free=False, ep_size=1, ep_rank=0, estimator="switch", top_k=1):
    torch.manual_seed(0)
    layer = MoELayer(D, D_FF, E, estimator=estimator, top_k=top_k, capacity_factor=None, jitter_eps=0.1,
                     ep_size=ep_size, ep_rank=ep_rank, layer_id=1, noise_seed=5, init_seed=7,
                     balance_scope=scope, aux_free=aux_free, bias_update_rate=0.01)
    return layer.double()


def _batch(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- one process ------------------------------------------------------------------------------


def test_global_scope_alone_equals_the_micro_batch_loss():
    """One process, one micro-batch: the global form is the Switch loss, value and gradient."""
    x = _batch(1, 30)
    grads = []
    for scope in ("micro_batch", "global"):
        layer = _layer(scope)
        _, stats = layer(x)
        stats.balance_loss.backward()
        grads.append((float(stats.balance_loss.detach()), layer.router.classifier.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)
    assert grads[0][1].abs().sum() > 0


def test_micro_batch_loss_is_bit_identical_to_the_switch_formula():
    """The default scope must not change a single bit of the loss it had before balance_scope."""
    probs = torch.randn(37, E, generator=torch.Generator().manual_seed(3)).softmax(-1)
    ids = probs.argmax(-1)
    before = E * torch.sum(torch.bincount(ids, minlength=E).to(probs.dtype) / probs.shape[0] * probs.mean(dim=0))
    assert torch.equal(balance_loss(probs, ids, E), before)


def test_global_scope_accumulates_over_the_micro_batches_of_one_step():
    """Micro-batch 2 of a step uses the counts of micro-batches 1 and 2; a new step starts over."""
    layer = _layer("global")
    x1, x2 = _batch(1, 12), _batch(2, 20)
    set_routing_step(layer, 0, optimizer_step=7)
    _, s1 = layer(x1)
    set_routing_step(layer, 1, optimizer_step=7)
    _, s2 = layer(x2)
    set_routing_step(layer, 2, optimizer_step=8)
    _, s3 = layer(x2)

    def expected(parts, probs_of, step):
        ids = torch.cat([p.balance_ids for p in parts])
        fraction = torch.bincount(ids, minlength=E).double() / len(ids)
        probs = probs_of.probs
        return E * float((fraction * probs.detach().mean(0)).sum())

    # Recompute the routings the layer saw (same noise keys).
    routings = []
    for step, x in ((0, x1), (1, x2), (2, x2)):
        noise = RoutingNoise(5, step, 1, torch.arange(len(x)))
        logits = layer.router(x, noise, layer.estimator.input_jitter_eps)
        routings.append(layer.estimator(logits, noise, True))
    assert float(s1.balance_loss.detach()) == pytest.approx(expected(routings[:1], routings[0], 0), abs=1e-12)
    assert float(s2.balance_loss.detach()) == pytest.approx(expected(routings[:2], routings[1], 1), abs=1e-12)
    assert float(s3.balance_loss.detach()) == pytest.approx(expected(routings[2:], routings[2], 2), abs=1e-12)
    assert float(s2.balance_loss.detach()) != pytest.approx(expected(routings[1:2], routings[1], 1), abs=1e-6)


def test_selection_bias_moves_the_choice_not_the_weight():
    logits = torch.randn(50, E, dtype=torch.float64, requires_grad=True)
    noise = RoutingNoise(0, 0, 0, torch.arange(50))
    switch = build_estimator("switch", E, jitter_eps=0.0)
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=torch.float64)  # > any probability gap
    routing = switch(logits, noise, True, selection_bias=bias)
    probs = logits.softmax(-1)
    assert (routing.expert_ids == 3).all() and (routing.balance_ids == 3).all()
    assert torch.allclose(routing.weights[:, 0], probs[:, 3])  # the unbiased probability
    routing.weights.sum().backward()
    want = torch.autograd.grad(probs[:, 3].sum(), logits)[0]
    assert torch.allclose(logits.grad, want)

    topk = build_estimator("topk", E, top_k=2)
    plain = topk(logits.detach(), noise, True)
    shifted = topk(logits.detach(), noise, True, selection_bias=torch.tensor([-2.0, -2.0, 0.0, 0.0]).double())
    assert set(shifted.expert_ids.flatten().tolist()) == {2, 3} and not torch.equal(plain.expert_ids, shifted.expert_ids)
    chosen = probs.detach().gather(-1, shifted.expert_ids)
    assert torch.allclose(shifted.weights, chosen / chosen.sum(-1, keepdim=True))


def test_selection_bias_update_follows_the_sign_rule_over_micro_batches():
    """Loads summed over the step's micro-batches (weight-0 replays excluded), then
    b_i += rate * sign(mean - load_i); the counts restart after the update."""
    layer = _layer(aux_free=True)
    assert "selection_bias" in layer.state_dict() and "selection_bias" not in _layer().state_dict()
    assert "selection_counts" not in layer.state_dict()  # per-step scratch, not checkpointed
    x = _batch(3, 40)
    layer(x)
    set_routing_step(layer, 1, count_loads=False)
    layer(x)  # a replayed filler batch: routed, not counted
    set_routing_step(layer, 2)
    layer(x[:10])
    noise0, noise2 = (RoutingNoise(5, s, 1, torch.arange(n)) for s, n in ((0, 40), (2, 10)))
    ids = [layer.estimator(layer.router(xx, nz, 0.1), nz, True).expert_ids for xx, nz in ((x, noise0), (x[:10], noise2))]
    load = torch.bincount(torch.cat([i.flatten() for i in ids]), minlength=E)
    assert torch.equal(layer.selection_counts, load)
    update_selection_bias(layer)
    want = 0.01 * torch.sign(load.double().mean() - load.double())
    assert torch.allclose(layer.selection_bias, want) and layer.selection_bias.abs().sum() > 0
    assert int(layer.selection_counts.sum()) == 0
    layer.eval()
    layer(x)  # evaluation routes with the bias but never counts
    assert int(layer.selection_counts.sum()) == 0


def test_aux_free_reaches_balance_where_no_balancing_does_not():
    """A router that sends everything to one expert: the bias alone spreads the load."""
    layer = _layer(aux_free=True)
    with torch.no_grad():
        w = layer.router.classifier.weight
        w.copy_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        w[0] += 1.0  # expert 0 wins for every positive input
    x = _batch(4, 64).abs()
    layer.estimator.input_jitter_eps = 0.0
    history = []
    for step in range(300):
        set_routing_step(layer, step)
        layer(x)
        history.append(layer.selection_counts.clone())
        update_selection_bias(layer)
    assert history[0].max() == 64  # all on expert 0 at the start
    # The sign rule oscillates around balance with a fixed step: judge the average load.
    average = torch.stack(history[-100:]).double().mean(0)
    assert average.max() <= 64 / E * 1.25, average.tolist()


TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_config_refuses_aux_free_for_sampled_estimators_and_drops_the_loss():
    with pytest.raises(ConfigError, match="moe.balance.*sparsemixer"):
        load_config(TINY, ["moe.balance=aux_free", "moe.estimator=sparsemixer"])
    cfg = load_config(TINY, ["moe.balance=aux_free", "moe.balance_coef=0.05"])
    assert cfg.moe.balance_loss_weight == 0.0
    cfg = load_config(TINY, ["moe.balance=aux_loss+aux_free", "moe.balance_coef=0.05"])
    assert cfg.moe.balance_loss_weight == 0.05
    with pytest.raises(ConfigError, match="moe.balance_scope"):
        load_config(TINY, ["moe.balance_scope=per_rank"])


# -- two processes ------------------------------------------------------------------------------


def _step_losses(layer, parts, rank_slices, world, optimizer_step):
    """Run micro-batches ``parts`` (each the full batch; this rank takes its slice) as one
    optimizer step with gradient accumulation; returns the accumulated loss."""
    total = 0.0
    for k, (x_full, ids_full) in enumerate(parts):
        lo, hi = rank_slices[k]
        set_routing_step(layer, 10 + k, optimizer_step=optimizer_step)
        _, stats = layer(x_full[lo:hi], token_ids=ids_full[lo:hi])
        loss = stats.balance_loss / len(parts)  # DeepSpeed's 1/GA scaling
        loss.backward()
        total += float(loss)
    return total


CASES = [(ep_size, accumulation, scope, aux_free) for ep_size in (1, 2) for accumulation in (1, 2, 3)
         for scope, aux_free in (("global", False), ("global", True), ("micro_batch", False))]


def _parts(accumulation):
    splits = [(5, 13), (9, 9), (0, 11)][:accumulation]  # uneven, and one rank empty
    return splits, [(_batch(20 + k, sum(s)), torch.arange(sum(s)) + 100 * k) for k, s in enumerate(splits)]


def _reference(accumulation, aux_free):
    """One process, the concatenated batch (called before any process group exists)."""
    splits, parts = _parts(accumulation)
    ref = _layer("global", aux_free)
    loss = _step_losses(ref, parts, [(0, sum(s)) for s in splits], 1, optimizer_step=0)
    if aux_free:
        update_selection_bias(ref)
    return ref, loss


def _run_case(rank, world, ep_size, accumulation, scope, aux_free, ref, ref_loss):
    splits, parts = _parts(accumulation)
    layer = _layer(scope, aux_free, ep_size, rank if ep_size > 1 else 0)
    layer.router.load_state_dict(ref.router.state_dict())
    if ep_size > 1:
        layer.set_process_group(dist.group.WORLD)
    mine = [(0, s[0]) if rank == 0 else (s[0], sum(s)) for s in splits]
    loss = torch.tensor(_step_losses(layer, parts, mine, world, optimizer_step=0), dtype=torch.float64)
    dist.all_reduce(loss)
    grad = layer.router.classifier.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= world  # DeepSpeed averages dense gradients over the ranks
    out = {"loss": float(loss) / world, "ref_loss": ref_loss,
           "grad_err": float((grad - ref.router.classifier.weight.grad).abs().max()),
           "grad_scale": float(ref.router.classifier.weight.grad.abs().max())}
    if aux_free:
        update_selection_bias(layer)
        bias = layer.selection_bias.clone()
        other = bias.clone()
        dist.broadcast(other, src=0)
        out["bias_err"] = float((bias - ref.selection_bias).abs().max())
        out["bias_moved"] = float(ref.selection_bias.abs().max())
        out["bias_ranks_err"] = float((bias - other).abs().max())
    return out


def _worker(rank, world, port, queue):
    torch.set_num_threads(1)
    refs = {(a, f): _reference(a, f) for a in (1, 2, 3) for f in (False, True)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for ep_size, accumulation, scope, aux_free in CASES:
            key = f"ep{ep_size}_ga{accumulation}_{scope}{'_auxfree' if aux_free else ''}"
            results[key] = _run_case(rank, world, ep_size, accumulation, scope, aux_free,
                                     *refs[(accumulation, aux_free)])
        if rank == 0:
            queue.put(results)
        dist.barrier()
    except Exception:
        traceback.print_exc()
        if rank == 0:
            queue.put(None)
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    ctx_mp = mp.get_context("spawn")
    queue = ctx_mp.SimpleQueue()
    run_workers(_worker, (2, free_port(), queue), "balance workers", timeout_s=TIMEOUT_S)
    results = queue.get()
    assert results is not None, "a worker failed (traceback above)"
    return results


@pytest.mark.dist
@pytest.mark.parametrize("ep_size", [1, 2])
@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_global_balance_on_two_ranks_equals_one_process(two_rank_results, ep_size, accumulation):
    for aux_free in (False, True):
        r = two_rank_results[f"ep{ep_size}_ga{accumulation}_global{'_auxfree' if aux_free else ''}"]
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-6)
        assert r["grad_err"] < 1e-6 and r["grad_scale"] > 1e-3
        if aux_free:  # the bias: the same update as one process, identical on both ranks
            assert r["bias_err"] == 0.0 and r["bias_ranks_err"] == 0.0 and r["bias_moved"] > 0


@pytest.mark.dist
@pytest.mark.parametrize("ep_size", [1, 2])
def test_negative_control_per_rank_statistics_are_not_global(two_rank_results, ep_size):
    """Each rank's own micro-batch loss, compared as if it were the global one, must fail."""
    for accumulation in (1, 2, 3):
        r = two_rank_results[f"ep{ep_size}_ga{accumulation}_micro_batch"]
        assert r["grad_err"] > 1e-4 or abs(r["loss"] - r["ref_loss"]) > 1e-4, r
