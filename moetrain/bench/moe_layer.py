"""``moetrain bench moe-layer``: one sparse MoE FFN layer against DeepSpeed, Hugging Face and the ideal.

For each expert count E, in one process and side by side, it times forward + backward and measures the
peak extra memory of::

    moetrain-switch       MoELayer, estimator "switch", input jitter eps 0.01 (Switch paper / HF default)
    moetrain-sparsemixer  MoELayer, estimator "sparsemixer", jitter_eps 0.1 (no input jitter)
    deepspeed             deepspeed.moe.layer.MoE, k=1, noisy_gate_policy "Jitter" (its input jitter)
    hf                    transformers SwitchTransformersSparseMLP, expert_capacity = ceil(T / E * 1.25)
    dense                 the ideal: one dense FFN d -> d_ff -> d (the active size) over the same tokens
    experts-alone         the experts' matmuls alone: a loop over experts on contiguous, pre-grouped
                          slices with moetrain-switch's per-expert counts; the bound at large E

All are top-1, capacity factor 1.25, float32, in training mode, with bias-free ReLU experts. They share
the same expert weights and router weight (the same tensors), so they route alike and touch the same
memory. Ratios are ``ms / dense ms`` from the same run.

One *step* is the forward pass and the backward of the layer's output against a fixed random upstream
gradient, plus the auxiliary losses the layer itself returns (moetrain: balance and z loss; DeepSpeed:
``l_aux``; HF's layer returns none). Two gradient modes (``--grads``, default both):

    steady   the gradients stay allocated and are zeroed in place after each step, so the next backward
             accumulates into existing buffers, as a trainer's steady state does (DeepSpeed keeps
             contiguous gradient buffers). This is what the layer itself costs.
    fresh    the gradients are dropped (``zero_grad(set_to_none=True)``), so every step allocates its
             weight gradients anew. At E=128 that is 1 GB per step, and the time then measures the
             allocator and the kernel's page faults as much as the layer, which makes it swing with
             whatever else the machine is doing.

Timing: a warm-up step each, then ``repeats`` rounds; in each round every implementation runs once, in
an order rotated by one per round, so that drifting machine load hits all of them alike. The median is
reported. Python's garbage collector is paused inside the timed region.

Peak memory: one more step per implementation under ``torch.profiler`` with ``profile_memory=True``.
PyTorch's CPU allocator reports every allocation and free to the profiler; replaying them in time
order, the peak of the running total is the extra memory the step needs on top of what existed before
it (activations, temporaries and the weight gradients) -- the CPU analogue of
``torch.cuda.max_memory_allocated`` minus its starting value. It counts tensor memory, not the process
RSS, which glibc's heap caching and the OS make unreliable to attribute.

Run it as ``moetrain bench moe-layer`` or ``python -m moetrain.bench.moe_layer`` (``--help``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.bench.moe_layer_options import add_arguments  # noqa: F401  (re-exported)
from moetrain.moe import MoELayer
from moetrain.utils import cpu_share

IMPLS = ("moetrain-switch", "moetrain-sparsemixer", "deepspeed", "hf", "dense", "experts-alone")
CAPACITY_FACTOR = 1.25
SWITCH_JITTER = 0.01  # Switch paper / HF router_jitter_noise / DeepSpeed's multiplicative jitter
SPARSEMIXER_EPS = 0.1
# Auxiliary loss coefficients of a typical Switch recipe (they only scale the extra backward).
BALANCE_COEF = 0.01
Z_COEF = 0.001
# --quick: tiny sizes for a smoke test (the test suite runs it).
QUICK = dict(experts=[4, 8], tokens=256, d_model=32, d_ff=64, repeats=1)


# ---------------------------------------------------------------------------
# The implementations: each becomes a Case whose run() is one forward + backward
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One implementation at one size.

    Attributes:
        impl: name (one of :data:`IMPLS`).
        run: forward + backward of one step.
        leaves: tensors whose ``.grad`` is dropped after each step.
    """

    impl: str
    run: Callable[[], None]
    leaves: list[Tensor]
    steady: bool = True

    def clear_grads(self) -> None:
        """Zero the gradients in place (steady) or drop them (fresh)."""
        for leaf in self.leaves:
            if self.steady and leaf.grad is not None:
                leaf.grad.zero_()
            else:
                leaf.grad = None


class ReluFFN(nn.Module):
    """The expert given to DeepSpeed: bias-free ``wo(relu(wi(x)))``, as moetrain's and HF's experts."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.relu(self.wi(x)))


def _share(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """Make ``module.<name>`` the very tensor ``param`` (so all layers hold one copy of the weights)."""
    setattr(module, name, param)


def _moetrain_case(impl: str, layer: MoELayer, x: Tensor, grad_out: Tensor) -> Case:
    coefs = (torch.tensor(BALANCE_COEF), torch.tensor(Z_COEF))

    def run() -> None:
        y, stats = layer(x)
        torch.autograd.backward([y, stats.balance_loss, stats.z_loss], [grad_out, *coefs])

    return Case(impl, run, [x, *layer.parameters()])


def _deepspeed_case(num_experts: int, d_model: int, d_ff: int, switch: MoELayer, x: Tensor, grad_out: Tensor) -> Case:
    from deepspeed.moe.layer import MoE

    # No process group is needed: with ep_size=1 DeepSpeed's MoE skips its all-to-all and never asks
    # for its expert-parallel group. Built on the meta device (DeepSpeed deep-copies the expert E
    # times), then given the shared weights.
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # "Creating MoE layer ..." on every build
    try:
        with torch.device("meta"):
            moe = MoE(d_model, ReluFFN(d_model, d_ff), num_experts=num_experts, ep_size=1, k=1,
                      capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR, min_capacity=4,
                      noisy_gate_policy="Jitter", drop_tokens=True)
    finally:
        ds_logger.setLevel(level)
    _share(moe.deepspeed_moe.gate.wg, "weight", switch.router.classifier.weight)
    for ours, theirs in zip(switch.experts.deepspeed_experts, moe.deepspeed_moe.experts.deepspeed_experts):
        _share(theirs.wi, "weight", ours.wi.weight)
        _share(theirs.wo, "weight", ours.wo.weight)
    moe.train()
    coef = torch.tensor(BALANCE_COEF)

    def run() -> None:
        y, l_aux, _ = moe(x)
        torch.autograd.backward([y, l_aux], [grad_out, coef])

    return Case("deepspeed", run, [x, *moe.parameters()])


def _hf_case(num_experts: int, d_model: int, d_ff: int, switch: MoELayer, x: Tensor, grad_out: Tensor) -> Case:
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    tokens = x.shape[0]
    config = SwitchTransformersConfig(
        d_model=d_model, d_ff=d_ff, num_experts=num_experts,
        expert_capacity=math.ceil(tokens / num_experts * CAPACITY_FACTOR),
        router_jitter_noise=SWITCH_JITTER, router_dtype="float32", router_bias=False,
        dense_act_fn="relu", dropout_rate=0.0)
    with torch.device("meta"):
        mlp = SwitchTransformersSparseMLP(config)
    _share(mlp.router.classifier, "weight", switch.router.classifier.weight)
    for j, ours in enumerate(switch.experts.deepspeed_experts):
        _share(mlp.experts[f"expert_{j}"].wi, "weight", ours.wi.weight)
        _share(mlp.experts[f"expert_{j}"].wo, "weight", ours.wo.weight)
    mlp.train()
    grad_out_3d = grad_out.view(1, tokens, d_model)

    def run() -> None:
        # HF's router applies its jitter in place to its input, which autograd forbids on a leaf:
        # it gets a copy (one [T, D] copy, about 1% of its step). Capacity counts per sequence, so the
        # batch is one sequence of all T tokens.
        y = mlp(x.clone().view(1, tokens, d_model))
        y.backward(grad_out_3d)

    return Case("hf", run, [x, *mlp.parameters()])


def _dense_case(wi: Tensor, wo: Tensor, x: Tensor, grad_out: Tensor) -> Case:
    def run() -> None:
        F.linear(F.relu(F.linear(x, wi)), wo).backward(grad_out)

    return Case("dense", run, [x, wi, wo])


def _experts_alone_case(switch: MoELayer, counts: list[int], d_model: int) -> Case:
    rows = torch.randn(sum(counts), d_model).requires_grad_()
    grad_rows = torch.randn(sum(counts), d_model)
    experts = list(switch.experts.deepspeed_experts)

    def run() -> None:
        outs = [F.linear(F.relu(F.linear(chunk, e.wi.weight)), e.wo.weight)
                for e, chunk in zip(experts, rows.split(counts))]
        torch.cat(outs).backward(grad_rows)

    return Case("experts-alone", run, [rows, *switch.experts.parameters()])


def build_cases(num_experts: int, tokens: int, d_model: int, d_ff: int, seed: int = 0) -> tuple[list[Case], MoELayer]:
    """All implementations at one size, sharing weights; also returns the moetrain-switch layer."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, d_model).requires_grad_()
    grad_out = torch.randn(tokens, d_model)

    switch = MoELayer(d_model, d_ff, num_experts, estimator="switch", top_k=1, capacity_factor=CAPACITY_FACTOR,
                      jitter_eps=SWITCH_JITTER, jitter_mode="input", init_seed=seed).train()
    sparsemixer = MoELayer(d_model, d_ff, num_experts, estimator="sparsemixer", top_k=1,
                           capacity_factor=CAPACITY_FACTOR, jitter_eps=SPARSEMIXER_EPS, init_seed=seed).train()
    _share(sparsemixer.router.classifier, "weight", switch.router.classifier.weight)
    for ours, theirs in zip(switch.experts.deepspeed_experts, sparsemixer.experts.deepspeed_experts):
        _share(theirs.wi, "weight", ours.wi.weight)
        _share(theirs.wo, "weight", ours.wo.weight)

    # The bound runs on the per-expert counts moetrain-switch keeps (routing is a pure function of
    # the input, weights and step, so every step routes the same way).
    with torch.no_grad():
        counts = switch(x)[1].tokens_per_expert.tolist()
    first = switch.experts.deepspeed_experts[0]
    cases = [
        _moetrain_case("moetrain-switch", switch, x, grad_out),
        _moetrain_case("moetrain-sparsemixer", sparsemixer, x, grad_out),
        _deepspeed_case(num_experts, d_model, d_ff, switch, x, grad_out),
        _hf_case(num_experts, d_model, d_ff, switch, x, grad_out),
        _dense_case(first.wi.weight, first.wo.weight, x, grad_out),
        _experts_alone_case(switch, counts, d_model),
    ]
    return cases, switch


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def time_step(case: Case) -> float:
    """Seconds of one forward + backward (gradients dropped afterwards, outside the timing)."""
    gc.disable()  # no collection pause inside the timed region (gc.collect() itself costs ~0.3 s here)
    try:
        start = time.perf_counter()
        case.run()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
        case.clear_grads()
    return elapsed


def peak_extra_bytes(run: Callable[[], None]) -> int:
    """Peak of the tensor memory allocated (net of frees) while ``run()`` executes.

    Replays the allocator events torch.profiler records with ``profile_memory=True`` in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()  # negative for frees
        peak = max(peak, current)
    return peak


@dataclass
class Result:
    """One implementation at one expert count: median and fastest step (ms), peak extra MB."""

    impl: str
    num_experts: int
    ms: float
    min_ms: float
    peak_mb: float
    ratio_to_dense: float = 0.0
    grads: str = "steady"

    def record(self) -> dict:
        """The JSON record (the median is *the* time; the minimum is only printed)."""
        return dict(impl=self.impl, num_experts=self.num_experts, grads=self.grads, ms=round(self.ms, 3),
                    min_ms=round(self.min_ms, 3), peak_mb=round(self.peak_mb, 3),
                    ratio_to_dense=round(self.ratio_to_dense, 4))


def measure(cases: list[Case], num_experts: int, repeats: int, progress, grads: str = "steady") -> list[Result]:
    """Time and memory of cases measured side by side, in :data:`IMPLS` order, in one gradient mode."""
    for case in cases:
        case.steady = grads == "steady"
        case.clear_grads()
    for case in cases:  # warm-up: first-touch of weights, allocator and kernel caches
        time_step(case)
        progress.update()
    times: dict[str, list[float]] = {case.impl: [] for case in cases}
    for round_ in range(repeats):
        shift = round_ % len(cases)
        for case in cases[shift:] + cases[:shift]:
            times[case.impl].append(1e3 * time_step(case))
            progress.update()
    results = {}
    for case in cases:
        peak = peak_extra_bytes(case.run)
        case.clear_grads()
        progress.update()
        results[case.impl] = Result(case.impl, num_experts, statistics.median(times[case.impl]),
                                    min(times[case.impl]), peak / 2**20, grads=grads)
    for case in cases:  # the next mode (or E) starts from no gradients
        for leaf in case.leaves:
            leaf.grad = None
    for result in results.values():
        result.ratio_to_dense = result.ms / results["dense"].ms
    return [results[impl] for impl in IMPLS]


def memory_sweep(layer: MoELayer, token_counts: list[int], d_model: int, progress) -> dict[int, float]:
    """Peak extra MB of moetrain-switch's step at several token counts (should grow linearly)."""
    peaks = {}
    for tokens in token_counts:
        x = torch.randn(tokens, d_model).requires_grad_()
        case = _moetrain_case("moetrain-switch", layer, x, torch.randn(tokens, d_model))
        case.steady = False  # the peak includes allocating the weight gradients
        case.run()  # warm-up at this size
        case.clear_grads()
        peaks[tokens] = peak_extra_bytes(case.run) / 2**20
        case.clear_grads()
        progress.update()
    return peaks


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> dict:
    """Sizes from ``args`` (as built by :func:`add_arguments` or moetrain's CLI), ``--quick`` applied."""
    settings = dict(experts=list(args.experts), tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff,
                    repeats=getattr(args, "repeats", 5) or 1)
    if getattr(args, "quick", False):
        settings.update(QUICK)
    return settings


def _load_note() -> str:
    """The 1-minute load average before the benchmark starts: a busy minute before it often means a
    job still running. (During the run the load average counts the benchmark's own threads; the
    end-of-run line measures the other processes instead, :mod:`moetrain.utils.cpu_share`.)"""
    return f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count() or 1} CPUs"


def print_tables(results: list[Result], sweep: dict[int, dict[int, float]], out=None) -> None:
    out = out or sys.stdout
    for grads in dict.fromkeys(r.grads for r in results):
        _print_times([r for r in results if r.grads == grads], grads, out)
    _print_sweep(sweep, out)


def _print_times(results: list[Result], grads: str, out) -> None:
    bound = {r.num_experts: r for r in results if r.impl == "experts-alone"}
    how = ("accumulated into existing buffers, zeroed in place" if grads == "steady"
           else "dropped after each step, allocated anew by the next")
    print(f"\ngradients {grads} ({how}); peak MB counts the memory a step adds to what exists before it", file=out)
    print(f"{'E':>5}  {'implementation':<22}{'ms':>9}{'x dense':>9}{'x experts-alone':>17}"
          f"{'min ms':>9}{'min x alone':>13}{'peak MB':>10}", file=out)
    last_e = None
    for r in results:
        if last_e is not None and r.num_experts != last_e:
            print(file=out)
        last_e = r.num_experts
        alone = bound[r.num_experts]
        print(f"{r.num_experts:>5}  {r.impl:<22}{r.ms:>9.1f}{r.ratio_to_dense:>8.2f}x{r.ms / alone.ms:>16.2f}x"
              f"{r.min_ms:>9.1f}{r.min_ms / alone.min_ms:>12.2f}x{r.peak_mb:>10.1f}", file=out)
    print("(ms: median step; ratios from medians of the same run; min: the fastest step, least disturbed "
          "by other processes)", file=out)


def _print_sweep(sweep: dict[int, dict[int, float]], out) -> None:
    token_counts = sorted(next(iter(sweep.values()))) if sweep else []
    if token_counts:
        print("\nmoetrain-switch peak extra memory (MB; includes the experts' weight gradients) by tokens:", file=out)
        print(f"{'E':>5}" + "".join(f"{t:>10}" for t in token_counts) + f"{'MB per 1k tokens':>19}", file=out)
        for num_experts, peaks in sweep.items():
            lo, hi = token_counts[0], token_counts[-1]
            slope = (peaks[hi] - peaks[lo]) / (hi - lo) * 1000
            print(f"{num_experts:>5}" + "".join(f"{peaks[t]:>10.1f}" for t in token_counts) + f"{slope:>19.2f}", file=out)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    settings = _settings(args)
    threads = getattr(args, "threads", None) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    experts, tokens, d_model, d_ff, repeats = (settings[k] for k in ("experts", "tokens", "d_model", "d_ff", "repeats"))
    sweep_tokens = sorted({max(tokens // 4, 1), max(tokens // 2, 1), tokens})
    print(f"moe-layer bench: torch {torch.__version__}, {torch.get_num_threads()} intra-op threads "
          f"({torch.get_num_interop_threads()} inter-op); T={tokens} tokens, d_model={d_model}, d_ff={d_ff}, "
          f"top-1, capacity factor {CAPACITY_FACTOR}, float32, training; forward+backward, "
          f"median of {repeats} round(s)")
    print(_load_note())
    cpu_start = cpu_share.sample()

    modes = ["steady", "fresh"] if getattr(args, "grads", "both") == "both" else [args.grads]
    per_e = len(modes) * len(IMPLS) * (1 + repeats + 1) + len(sweep_tokens)
    results: list[Result] = []
    sweep: dict[int, dict[int, float]] = {}
    with tqdm(total=per_e * len(experts), desc="moe-layer", unit="step", file=sys.stderr, mininterval=1.0) as progress:
        for num_experts in experts:
            progress.set_postfix_str(f"E={num_experts}")
            cases, switch = build_cases(num_experts, tokens, d_model, d_ff)
            for grads in modes:
                results += measure(cases, num_experts, repeats, progress, grads)
            sweep[num_experts] = memory_sweep(switch, sweep_tokens, d_model, progress)
            del cases, switch  # free this E's layers before building the next (1 GB of weights at E=128)

    print_tables(sorted(results, key=lambda r: modes.index(r.grads)), sweep)
    cpu_end = cpu_share.sample()
    print("\n" + cpu_share.describe(cpu_share.others_share(cpu_start, cpu_end), cpu_end and cpu_end.cpus))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.record() for r in results], f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m moetrain.bench.moe_layer", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
