"""Expert parallelism over 2 processes (gloo, CPU) reproduces the single-process layer.

Each rank holds half of the experts and half of a global batch (uneven and empty halves
included), with global token ids so both runs draw the same routing noise. Outputs, input
gradients, router/omega gradients (summed over ranks) and every global expert's gradient
(gathered) must match a single-process ``ep_size=1`` layer on the whole batch. A hang fails the
test after a timeout instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist

from moetrain.utils.net import free_port
from spawn_workers import run_workers

pytestmark = pytest.mark.dist

E, D, D_FF = 4, 6, 8
# (estimator, top_k); capacity factor None (dropless) or 4.0 = E, i.e. capacity = local tokens (no drop).
ESTIMATORS = [("switch", 1), ("sparsemixer", 1), ("sparsemixer_v2", 2), ("st", 1)]
CAPACITY = [None, 4.0]
SPLITS = [(9, 9), (5, 13), (0, 18), (18, 0)]
TIMEOUT_S = 240


def _build(name, k, cf, ep_size, ep_rank):
    from moetrain.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(D, D_FF, E, estimator=name, top_k=k, capacity_factor=cf, min_capacity=0, jitter_eps=0.1,
                     jitter_mode="input", ep_size=ep_size, ep_rank=ep_rank, layer_id=1, noise_seed=5, init_seed=7)
    layer.routing_step = 3
    return layer.double()


def _check(what, got, want, atol=1e-6):
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if got.shape != want.shape or err > atol:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}, max error {err:.3e}")


def _run_case(rank, name, k, cf, split):
    T = sum(split)
    gen = torch.Generator().manual_seed(T + 31 * len(name))
    x_full = torch.randn(T, D, dtype=torch.float64, generator=gen)
    g_full = torch.randn(T, D, dtype=torch.float64, generator=gen)
    ids_full = torch.arange(T) + 1000

    ref = _build(name, k, cf, 1, 0)
    xr = x_full.clone().requires_grad_(True)
    y_ref, s_ref = ref(xr, token_ids=ids_full)
    (y_ref * g_full).sum().backward()

    layer = _build(name, k, cf, 2, rank)
    layer.router.load_state_dict(ref.router.state_dict())
    layer.estimator.load_state_dict(ref.estimator.state_dict())  # omega, if any
    layer.set_process_group(dist.group.WORLD)
    lo, hi = (0, split[0]) if rank == 0 else (split[0], T)
    x = x_full[lo:hi].clone().requires_grad_(True)
    y, s = layer(x, token_ids=ids_full[lo:hi])
    (y * g_full[lo:hi]).sum().backward()

    tag = f"{name} cf={cf} split={split} rank={rank}"
    _check(f"{tag} output", y.detach(), y_ref.detach()[lo:hi])
    _check(f"{tag} input grad", x.grad, xr.grad[lo:hi])
    for (pname, p), p_ref in zip(
        [(n, p) for n, p in layer.named_parameters() if "expert" not in n],
        [p for n, p in ref.named_parameters() if "expert" not in n],
    ):
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        _check(f"{tag} {pname} grad (sum over ranks)", grad, p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref))
    for local, expert in enumerate(layer.experts.deepspeed_experts):
        for wname in ("wi", "wo"):
            mine = getattr(expert, wname).weight.grad
            gathered = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(gathered, mine.contiguous())
            for r in range(2):
                ref_w = getattr(ref.experts.deepspeed_experts[2 * r + local], wname).weight.grad
                _check(f"{tag} expert {2 * r + local}.{wname} grad", gathered[r], ref_w)
    tpe = s.tokens_per_expert.clone()
    dist.all_reduce(tpe)
    if not torch.equal(tpe, s_ref.tokens_per_expert):
        raise AssertionError(f"{tag} tokens_per_expert {tpe.tolist()} vs {s_ref.tokens_per_expert.tolist()}")
    if s.dropped_fraction.item() != 0.0 or s_ref.dropped_fraction.item() != 0.0:
        raise AssertionError(f"{tag} dropped tokens")


def _deepspeed_groups(rank):
    """The DeepSpeed engine's path: set_deepspeed_parallelism creates group 'ep_size_2' and the
    layer shards over it, giving the same result as the explicit group."""
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend="gloo")
    ref = _build("sparsemixer", 1, None, 1, 0)
    layer = _build("sparsemixer", 1, None, 2, None)  # EP rank from torch.distributed
    if layer.ep_rank != rank:
        raise AssertionError(f"default ep_rank {layer.ep_rank} on rank {rank}")
    layer.router.load_state_dict(ref.router.state_dict())
    layer.set_deepspeed_parallelism()
    if "ep_size_2" not in groups._get_expert_parallel_group_dict():
        raise AssertionError("DeepSpeed expert-parallel group was not created")
    x = torch.randn(12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y_ref, _ = ref(x, token_ids=torch.arange(12))
    y, _ = layer(x[rank * 6 : rank * 6 + 6], token_ids=torch.arange(rank * 6, rank * 6 + 6))
    _check(f"deepspeed groups rank={rank}", y, y_ref[rank * 6 : rank * 6 + 6])


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # A layer built for a different EP size or rank refuses the group.
        for bad in (_build("switch", 1, None, 1, 0), _build("switch", 1, None, 2, 1 - rank)):
            try:
                bad.set_process_group(dist.group.WORLD)
            except ValueError:
                pass
            else:
                raise AssertionError("set_process_group accepted a mismatched layer")
        for split in SPLITS:
            for name, k in ESTIMATORS:
                for cf in CAPACITY:
                    _run_case(rank, name, k, cf, split)
        # Evaluation (no noise, dropless) through the all-to-all too.
        ref, layer = _build("sparsemixer", 1, None, 1, 0).eval(), _build("sparsemixer", 1, None, 2, rank).eval()
        layer.router.load_state_dict(ref.router.state_dict())
        layer.set_process_group(dist.group.WORLD)
        x = torch.randn(10, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y_ref, _ = ref(x)
        y, _ = layer(x[rank * 3 : rank * 3 + 3 + 4 * rank], token_ids=torch.arange(rank * 3, rank * 3 + 3 + 4 * rank))
        _check(f"eval rank={rank}", y, y_ref[rank * 3 : rank * 3 + 3 + 4 * rank])
        _deepspeed_groups(rank)
        dist.barrier()
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def test_expert_parallel_matches_single_process():
    run_workers(_worker, (2, free_port()), "expert-parallel workers", timeout_s=TIMEOUT_S)
