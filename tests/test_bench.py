"""`moetrain bench moe-layer` in --quick mode: it runs end to end and writes well-formed records.

No speed assertions: timings on a shared CPU are noise at these sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import sys

import pytest
import torch

from moetrain.bench import moe_layer

QUICK_EXPERTS = moe_layer.QUICK["experts"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``moetrain bench moe-layer --quick --threads 1`` run, in process (a few seconds)."""
    out = tmp_path_factory.mktemp("bench") / "moe_layer.json"
    parser = argparse.ArgumentParser()
    moe_layer.add_arguments(parser)
    # One thread: these tensors are tiny, and a second intra-op thread only adds
    # synchronisation (10-50x slower small ops on a busy 2-core machine).
    args = parser.parse_args(["--quick", "--threads", "1", "--json", str(out)])
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert moe_layer.main(args) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    return stdout.getvalue(), json.loads(out.read_text())


def test_json_has_one_record_per_implementation_and_expert_count(quick_run):
    _, records = quick_run
    assert isinstance(records, list)
    assert {(r["impl"], r["num_experts"], r["grads"]) for r in records} == {
        (impl, e, grads) for impl in moe_layer.IMPLS for e in QUICK_EXPERTS for grads in ("steady", "fresh")}
    assert len(records) == 2 * len(moe_layer.IMPLS) * len(QUICK_EXPERTS)
    assert set(moe_layer.IMPLS) == {"moetrain-switch", "moetrain-sparsemixer", "deepspeed", "hf", "dense",
                                    "experts-alone"}


def test_records_have_positive_numbers_and_ratios_to_the_same_runs_dense(quick_run):
    _, records = quick_run
    for r in records:
        assert set(r) == {"impl", "num_experts", "grads", "ms", "min_ms", "peak_mb", "ratio_to_dense"}, r
        assert isinstance(r["num_experts"], int)
        for key in ("ms", "min_ms", "peak_mb", "ratio_to_dense"):
            assert isinstance(r[key], float) and r[key] > 0, r
        assert r["min_ms"] <= r["ms"]
    dense = {(r["num_experts"], r["grads"]): r["ms"] for r in records if r["impl"] == "dense"}
    for r in records:
        assert r["ratio_to_dense"] == pytest.approx(r["ms"] / dense[r["num_experts"], r["grads"]], rel=1e-2)
        if r["impl"] == "dense":
            assert r["ratio_to_dense"] == 1.0


def test_prints_threads_the_table_and_the_memory_sweep(quick_run):
    stdout, _ = quick_run
    assert "1 intra-op threads" in stdout
    for impl in moe_layer.IMPLS:
        assert impl in stdout
    assert "peak extra memory" in stdout
    assert "load average at start" in stdout and "CPU used by other processes" in stdout
    tokens = moe_layer.QUICK["tokens"]
    assert all(str(t) in stdout for t in (tokens // 4, tokens // 2, tokens))


def test_steady_mode_accumulates_into_the_same_buffers_and_fresh_mode_reallocates():
    cases, _ = moe_layer.build_cases(4, tokens=64, d_model=16, d_ff=32)
    case = next(c for c in cases if c.impl == "moetrain-switch")
    weight = case.leaves[-1]
    for steady in (True, False):
        case.steady = steady
        case.run()
        first = weight.grad
        case.clear_grads()
        if steady:
            assert first is weight.grad and not first.any()  # zeroed in place, kept
            case.run()
            assert weight.grad is first and first.any()
        else:
            assert weight.grad is None


def test_prints_both_gradient_modes(quick_run):
    stdout, _ = quick_run
    assert "gradients steady" in stdout and "gradients fresh" in stdout


def test_cli_arguments_and_defaults():
    parser = argparse.ArgumentParser()
    moe_layer.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.experts, args.tokens, args.d_model, args.d_ff) == ([8, 32, 128], 4096, 512, 2048)
    assert args.json is None and args.quick is False and args.threads is None and args.grads == "both"
    args = parser.parse_args(["--experts", "4", "16", "--json", "out.json", "--quick", "--threads", "2"])
    assert args.experts == [4, 16] and args.json == "out.json" and args.quick and args.threads == 2
    # moetrain's CLI builds its own parser without --quick / --threads: main() must not need them.
    settings = moe_layer._settings(argparse.Namespace(experts=[8], tokens=64, d_model=16, d_ff=32, repeats=3,
                                                       json=None))
    assert settings == dict(experts=[8], tokens=64, d_model=16, d_ff=32, repeats=3)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy on an imported module
def test_runs_standalone(monkeypatch, capsys):
    """``python -m moetrain.bench.moe_layer`` has its own parser (run in process; --help exits
    before any work)."""
    monkeypatch.setattr(sys, "argv", ["moe_layer", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("moetrain.bench.moe_layer", run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--experts", "--tokens", "--d-model", "--d-ff", "--repeats", "--threads", "--quick", "--json"):
        assert option in help_text
