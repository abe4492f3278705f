"""Multi-rank trainer tests on CPU/gloo, through DeepSpeed's real launcher.

Scenarios are grouped into three launches (each pays ~20 s of imports once), run by
``tests/dist_scripts/run_scenarios.py`` on the toy task of ``tests/dist_scripts/toy_task.py``:

* ``two_ranks``   (2 ranks): EP=2 parity runs (switch / sparsemixer x ZeRO-1 / ZeRO-2, GAS 2),
  the negative control (experts not marked for DeepSpeed), uneven batches, a clean 8-step run
  whose step-4 checkpoint feeds the portable tests, and last a run killed by SIGKILL while
  saving step 8;
* ``resumed``     (2 ranks): exact resume of the killed run; portable resume at EP=1;
* ``single_rank`` (1 rank): the references, portable resume at world size 1, mismatch refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_env import child_env

from moetrain.utils.net import free_port

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_scripts" / "run_scenarios.py"
PARITY = [("switch", 1), ("switch", 2), ("sparsemixer", 1), ("sparsemixer", 2)]
#: The optimizer settings compared across topologies: Adafactor (ZeRO-0 only) and AdamW with a
#: per-group rate, both with a clipping threshold low enough to clip every step (the stage-0
#: norm under EP is moetrain's own; DeepSpeed's is wrong there).
OPTIM = {
    "adafactor_z0": {"train.optimizer": "adafactor", "train.lr": 1e-2, "parallel.zero_stage": 0,
                     "train.grad_clip": 0.05, "train.lr_scale": {"embed": 3.0}},
    "adamw_scaled_z0": {"train.lr_scale": {"embed": 10.0, "head": 0.5}, "parallel.zero_stage": 0,
                        "train.grad_clip": 0.05},
    "adamw_scaled_z1": {"train.lr_scale": {"embed": 10.0, "head": 0.5}, "parallel.zero_stage": 1,
                        "train.grad_clip": 0.05},
}
OPTIM_REF = {"adafactor_z0": "adafactor", "adamw_scaled_z0": "adamw_scaled", "adamw_scaled_z1": "adamw_scaled"}
CLEAN = {"train.max_steps": 8, "train.save_every": 4, "train.keep_last": 2, "train.eval_every": 4,
         "train.grad_clip": 0.5, "train.weight_decay": 0.01, "moe.estimator": "sparsemixer"}


CLEAN_ADAFACTOR = {**CLEAN, **OPTIM["adafactor_z0"]}
#: Load balancing on the real Switch model, EP=2 on 2 ranks vs 1 rank (GAS 2): the global-batch
#: loss and the aux-free bias are defined over all ranks, so they must match; the micro-batch
#: loss (per-rank statistics) with the same weight must not (negative control).
BALANCE = {
    "global": {"moe.balance_scope": "global", "moe.balance_coef": 0.5},
    "aux_free": {"moe.balance": "aux_free", "moe.bias_update_rate": 0.01, "train.max_steps": 6,
                 "train.save_every": 4},
    "micro_batch": {"moe.balance_scope": "micro_batch", "moe.balance_coef": 0.5},
}


def launch(spec: list[dict], tmp: Path, ranks: int, timeout: int = 420) -> subprocess.CompletedProcess:
    """Run the scenarios under the deepspeed launcher (ranks > 1) or as one plain process."""
    spec_file = tmp / f"spec-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    if ranks == 1:
        cmd = [sys.executable, str(SCRIPT), str(spec_file)]
    else:
        port = str(free_port())
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", port, str(SCRIPT), str(spec_file)]
    env = child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(["timeout", "-s", "KILL", str(timeout), *cmd], cwd=REPO, env=env,
                          capture_output=True, text=True)
    (tmp / f"log-{spec_file.stem}.txt").write_text(proc.stdout + proc.stderr)
    return proc


def result(out_dir: Path, proc: subprocess.CompletedProcess) -> dict:
    path = out_dir / "result.json"
    assert path.exists(), f"scenario {out_dir.name} did not finish:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads(path.read_text())


def train_records(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


def portable(out_dir: Path, step: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    ckpt = out_dir / "checkpoints" / f"step_{step:08d}" / "portable"
    return load_file(str(ckpt / "model.safetensors")), torch.load(ckpt / "optimizer.pt")["moments"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def two_ranks(tmp):
    spec = [{"name": f"ep2_{est}_z{z}", "out_dir": str(tmp / f"ep2_{est}_z{z}"),
             "set": {"moe.estimator": est, "parallel.zero_stage": z}} for est, z in PARITY]
    spec += [{"name": f"ep2_{name}", "out_dir": str(tmp / f"ep2_{name}"), "set": opts} for name, opts in OPTIM.items()]
    spec += [
        {"name": "switch_model_ep2", "out_dir": str(tmp / "switch_model_ep2"), "task": "seq2seq",
         "set": {"moe.estimator": "sparsemixer", "parallel.zero_stage": 2}},
        {"name": "empty_batches", "out_dir": str(tmp / "empty_batches"), "task": "seq2seq",
         "toy": {"empty_after": 3}, "set": {"train.max_steps": 4}},
        {"name": "bf16_ep2", "out_dir": str(tmp / "bf16_ep2"), "set": {"train.precision": "bf16"}},
        {"name": "negative_unmarked", "out_dir": str(tmp / "negative"), "validate": False,
         "set": {"parallel.zero_stage": 0}, "toy": {"unmark_experts": True}},
        {"name": "uneven", "out_dir": str(tmp / "uneven"), "toy": {"uneven": True},
         "set": {"train.max_steps": 5, "moe.capacity_factor": 1.0, "train.eval_every": 2}},
        {"name": "clean", "out_dir": str(tmp / "clean"), "set": CLEAN},
        {"name": "clean_adafactor", "out_dir": str(tmp / "clean_adafactor"), "set": CLEAN_ADAFACTOR},
        {"name": "bf16_autocast_ep2", "out_dir": str(tmp / "bf16_autocast_ep2"),
         "set": {**OPTIM["adafactor_z0"], "train.precision": "bf16"}},
        *[{"name": f"{name}_ep2", "out_dir": str(tmp / f"{name}_ep2"), "task": "seq2seq", "set": opts}
          for name, opts in BALANCE.items()],
        {"name": "budget", "out_dir": str(tmp / "budget"),
         "set": {"train.max_minutes": 1e-4, "train.max_steps": 100, "train.eval_every": 50}},
        # What config validation refuses, measured: Adafactor on ZeRO-1's flat shards.
        {"name": "adafactor_z1_unvalidated", "out_dir": str(tmp / "adafactor_z1"), "validate": False,
         "set": {**OPTIM["adafactor_z0"], "parallel.zero_stage": 1}},
        {"name": "sigterm", "out_dir": str(tmp / "sigterm"), "toy": {"sigterm_at": 5},
         "set": {"train.max_steps": 100, "train.eval_every": 2}},
        {"name": "killed", "out_dir": str(tmp / "killed"), "kill_in_save_at": 8,
         "set": {**CLEAN, "model.dropout_rate": 0.1}},  # dropout: resume must restore each rank's RNG
    ]
    return launch(spec, tmp, ranks=2)


@pytest.fixture(scope="module")
def single_rank(tmp, two_ranks):
    src = tmp / "clean" / "checkpoints" / "step_00000004"
    src_adafactor = tmp / "clean_adafactor" / "checkpoints" / "step_00000004"
    spec = [{"name": f"ref_{est}", "out_dir": str(tmp / f"ref_{est}"),
             "set": {"moe.estimator": est, "parallel.ep_size": 1}} for est in ("switch", "sparsemixer")]
    spec += [{"name": f"ref_{ref}", "out_dir": str(tmp / f"ref_{ref}"),
              "set": {**OPTIM[name], "parallel.ep_size": 1, "parallel.zero_stage": 0}}
             for name, ref in OPTIM_REF.items() if name.endswith("z0")]
    spec += [
        {"name": "portable_adafactor_w1", "out_dir": str(tmp / "portable_adafactor_w1"),
         "set": {**CLEAN_ADAFACTOR, "parallel.ep_size": 1, "train.resume": str(src_adafactor)}},
        {"name": "adafactor_to_adamw", "out_dir": str(tmp / "adafactor_to_adamw"), "expect_error": True,
         "set": {**CLEAN_ADAFACTOR, "train.optimizer": "adamw", "parallel.ep_size": 1,
                 "train.resume": str(src_adafactor)}},
        *[{"name": f"{name}_ref", "out_dir": str(tmp / f"{name}_ref"), "task": "seq2seq",
           "set": {**opts, "parallel.ep_size": 1}} for name, opts in BALANCE.items() if name != "micro_batch"],
        {"name": "switch_model_ref", "out_dir": str(tmp / "switch_model_ref"), "task": "seq2seq",
         "set": {"moe.estimator": "sparsemixer", "parallel.ep_size": 1}},
        {"name": "portable_w1", "out_dir": str(tmp / "portable_w1"),
         "set": {**CLEAN, "parallel.ep_size": 1, "parallel.zero_stage": 0, "train.resume": str(src)}},
        {"name": "mismatch_experts", "out_dir": str(tmp / "mismatch_experts"), "expect_error": True,
         "set": {**CLEAN, "parallel.ep_size": 1, "moe.num_experts": 8, "train.resume": str(src)}},
        {"name": "mismatch_vocab", "out_dir": str(tmp / "mismatch_vocab"), "expect_error": True,
         "set": {**CLEAN, "parallel.ep_size": 1, "model.vocab_size": 80, "data.vocab_size": 80,
                 "train.resume": str(src)}},
    ]
    snapshot = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    return launch(spec, tmp, ranks=1), snapshot


@pytest.fixture(scope="module")
def resumed(tmp, two_ranks):
    killed = tmp / "killed" / "checkpoints"
    state_after_kill = {"latest": (killed / "latest").read_text(), "tmp": sorted(p.name for p in killed.glob(".tmp-*")),
                        "records": train_records(tmp / "killed")}
    spec = [
        {"name": "portable_ep1_w2", "out_dir": str(tmp / "portable_ep1_w2"),
         "set": {**CLEAN, "parallel.ep_size": 1, "train.resume": str(tmp / "clean" / "checkpoints" / "step_00000004")}},
        {"name": "portable_adafactor_ep1_w2", "out_dir": str(tmp / "portable_adafactor_ep1_w2"),
         "set": {**CLEAN_ADAFACTOR, "parallel.ep_size": 1,
                 "train.resume": str(tmp / "clean_adafactor" / "checkpoints" / "step_00000004")}},
        {"name": "exact_adafactor", "out_dir": str(tmp / "exact_adafactor"),
         "set": {**CLEAN_ADAFACTOR, "train.resume": str(tmp / "clean_adafactor" / "checkpoints" / "step_00000004")}},
        # The aux-free bias through both checkpoint kinds: exact (engine, EP=2) and portable at EP=1.
        *[{"name": f"aux_free_resume_{kind}", "out_dir": str(tmp / f"aux_free_resume_{kind}"), "task": "seq2seq",
           "set": {**BALANCE["aux_free"], "parallel.ep_size": ep,
                   "train.resume": str(tmp / "aux_free_ep2" / "checkpoints" / "step_00000004")}}
          for kind, ep in (("exact", 2), ("portable_ep1", 1))],
        {"name": "resume_exact", "out_dir": str(tmp / "killed"),
         "set": {**CLEAN, "model.dropout_rate": 0.1, "train.resume": "latest"}},
    ]
    return launch(spec, tmp, ranks=2), state_after_kill


@pytest.mark.parametrize("estimator,zero", PARITY)
def test_ep2_on_two_ranks_matches_one_rank(tmp, two_ranks, single_rank, estimator, zero):
    ep2, ref = tmp / f"ep2_{estimator}_z{zero}", tmp / f"ref_{estimator}"
    assert result(ep2, two_ranks)["ok"] and result(ref, single_rank[0])["ok"]
    losses = [r["loss"] for r in train_records(ep2)]
    ref_losses = [r["loss"] for r in train_records(ref)]
    assert len(losses) == 4 and losses == pytest.approx(ref_losses, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # it trains
    (w, m), (rw, rm) = portable(ep2, 4), portable(ref, 4)
    assert max_diff(w, rw) < 1e-5
    assert max(max_diff(m[k], rm[k]) for k in rm) < 1e-5  # Adam moments too, per global expert
    assert any(".deepspeed_experts.3." in k for k in w)  # global ids: rank 1's experts are 2 and 3


def test_real_switch_model_ep2_matches_one_rank(tmp, two_ranks, single_rank):
    """The encoder-decoder from moetrain.models, EP=2 ZeRO-2 vs one rank."""
    ep2, ref = tmp / "switch_model_ep2", tmp / "switch_model_ref"
    assert result(ep2, two_ranks)["ok"] and result(ref, single_rank[0])["ok"]
    losses, ref_losses = ([r["loss"] for r in train_records(d)] for d in (ep2, ref))
    assert losses == pytest.approx(ref_losses, abs=1e-5) and ref_losses[-1] < ref_losses[0]
    assert max_diff(portable(ep2, 4)[0], portable(ref, 4)[0]) < 1e-5


@pytest.mark.parametrize("name", ["global", "aux_free"])
def test_global_balance_and_aux_free_bias_match_one_rank(tmp, two_ranks, single_rank, name):
    ep2, ref = tmp / f"{name}_ep2", tmp / f"{name}_ref"
    assert result(ep2, two_ranks)["ok"] and result(ref, single_rank[0])["ok"]
    losses, ref_losses = ([r["loss"] for r in train_records(d)] for d in (ep2, ref))
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    # The auxiliary part of the loss: 0.5 * the balance of 2 layers (~1 each) + 1e-3 * z (~4 each)
    # with the loss on; only the z-loss under aux_free alone.
    aux = [r["loss"] - r["ce"] for r in train_records(ref)]
    weights, ref_weights = portable(ep2, 4)[0], portable(ref, 4)[0]
    assert max_diff(weights, ref_weights) < 1e-5
    biases = {k: v for k, v in weights.items() if k.endswith("selection_bias")}
    if name == "aux_free":  # saved in the portable checkpoint, moved by the updates, same as 1 rank
        assert biases and all(float(v.abs().max()) > 0 for v in biases.values())
        assert max(aux) < 0.02
    else:
        assert not biases and min(aux) > 0.9


@pytest.mark.parametrize("kind", ["exact", "portable_ep1"])
def test_aux_free_bias_survives_resume(tmp, two_ranks, resumed, kind):
    """Steps 5-6 after a resume from step 4 (same EP, or EP=1 from the portable files) equal the
    uninterrupted run: the bias came back from the checkpoint (a zero bias would route differently)."""
    out = tmp / f"aux_free_resume_{kind}"
    assert result(out, resumed[0])["ok"]
    full = {r["step"]: r["loss"] for r in train_records(tmp / "aux_free_ep2")}
    got = {r["step"]: r["loss"] for r in train_records(out)}
    assert sorted(got) == [5, 6] and [got[5], got[6]] == pytest.approx([full[5], full[6]], abs=1e-5)
    assert max_diff(portable(out, 6)[0], portable(tmp / "aux_free_ep2", 6)[0]) < 1e-5


def test_micro_batch_balance_differs_across_data_parallel_sizes(tmp, two_ranks, single_rank):
    """Negative control: the per-rank loss with the same weight does not match the global reference."""
    assert result(tmp / "micro_batch_ep2", two_ranks)["ok"]
    losses, ref_losses = ([r["loss"] for r in train_records(d)] for d in (tmp / "micro_batch_ep2", tmp / "global_ref"))
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) > 1e-4


def test_bf16_ep2_runs_close_to_fp32(tmp, two_ranks, single_rank):
    assert result(tmp / "bf16_ep2", two_ranks)["ok"]
    bf16 = [r["loss"] for r in train_records(tmp / "bf16_ep2")]
    fp32 = [r["loss"] for r in train_records(tmp / "ref_switch")]
    assert bf16 == pytest.approx(fp32, abs=5e-2)
    weights, _ = portable(tmp / "bf16_ep2", 4)  # fp32 master weights, not the bf16 copies
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_negative_control_unmarked_experts_differ(tmp, two_ranks, single_rank):
    """Without DeepSpeed's expert flags the expert gradients are averaged across ranks: wrong."""
    assert result(tmp / "negative", two_ranks)["ok"]
    (w, _), (rw, _) = portable(tmp / "negative", 4), portable(tmp / "ref_switch", 4)
    assert max_diff(w, rw) > 1e-3


def test_uneven_batches_finish(tmp, two_ranks):
    assert result(tmp / "uneven", two_ranks)["ok"]
    records = train_records(tmp / "uneven")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # rank 1 ran dry after 3 micro-batches: later steps count rank 0's tokens only.
    assert records[0]["tokens"] > records[-1]["tokens"] > 0


def test_sigterm_on_one_rank_stops_all_after_the_step_with_a_checkpoint(tmp, two_ranks):
    """Rank 0 gets SIGTERM while drawing micro-batch 5 (step 3 of GAS 2): both ranks finish step 3,
    save it and return normally."""
    assert result(tmp / "sigterm", two_ranks)["ok"]
    records = [json.loads(x) for x in (tmp / "sigterm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["type"] == "eval"] == [2]  # no final eval on a stop
    assert (tmp / "sigterm" / "checkpoints" / "latest").read_text() == "step_00000003"
    state = json.loads((tmp / "sigterm" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 6


def test_empty_filler_batches_under_zero(tmp, two_ranks):
    """Rank 1's task yields 0-row batches from micro-batch 3 on. On the real model an empty batch
    leaves the relative-position biases without a gradient, which breaks ZeRO's bucketed
    reduction (gloo: "Received data size doesn't match"); the trainer replays the last real batch
    with weight 0 instead, so only rank 0's tokens count afterwards."""
    assert result(tmp / "empty_batches", two_ranks)["ok"]
    tokens = [r["tokens"] for r in train_records(tmp / "empty_batches")]
    assert tokens == [96, 72, 48, 48]  # GAS 2 x 2 ranks x 24 tokens; rank 1 empty from micro-batch 3


def test_metrics_records(tmp, two_ranks):
    lines = [json.loads(x) for x in (tmp / "clean" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("loss", "lr", "tokens_per_second", "samples_per_second", "grad_norm"):
        assert all(isinstance(r[key], float) for r in train), key
    layer = train[0]["moe"][0]
    assert layer["layer"] == "layers.0" and len(layer["load"]) == 4 and abs(sum(layer["load"]) - 1) < 1e-9
    assert {"dropped_fraction", "router_entropy", "balance_loss", "z_loss"} <= layer.keys()
    assert all("cpu_others" not in r for r in train)  # with 2 ranks the other rank would count as "others"
    assert [r["step"] for r in lines if r["type"] == "eval"] == [4, 8]
    assert list((tmp / "clean" / "tensorboard").glob("events.out.tfevents.*"))


def test_kill_during_save_keeps_previous_checkpoint(tmp, resumed):
    _, after_kill = resumed
    assert after_kill["latest"] == "step_00000004"  # step 8 never became `latest`
    assert after_kill["tmp"] == [".tmp-step_00000008"]  # half-written save left aside


def test_resume_after_kill_is_bitwise_identical(tmp, resumed):
    proc, after_kill = resumed
    assert result(tmp / "killed", proc)["ok"]
    original = [r["loss"] for r in after_kill["records"]]
    records = train_records(tmp / "killed")
    # The killed run had logged steps 1-8 and saved step 4 only: the resume drops 5-8 from
    # metrics.jsonl and trains them again, so every step is there once.
    assert len(original) == 8 and [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in records] == original  # exact float equality
    ckpts = tmp / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000008" and not list(ckpts.glob(".tmp-*"))
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000008"]


def test_portable_resume_at_ep1_two_ranks(tmp, resumed):
    proc, _ = resumed
    assert result(tmp / "portable_ep1_w2", proc)["ok"]
    want = [r["loss"] for r in train_records(tmp / "clean")][4:]
    got = [r["loss"] for r in train_records(tmp / "portable_ep1_w2")]
    assert got == pytest.approx(want, abs=1e-6)
    assert max_diff(portable(tmp / "portable_ep1_w2", 8)[0], portable(tmp / "clean", 8)[0]) < 1e-6


def test_portable_resume_at_world_size_one(tmp, single_rank):
    proc, _ = single_rank
    assert result(tmp / "portable_w1", proc)["ok"]
    want = [r["loss"] for r in train_records(tmp / "clean")][4:]
    assert [r["loss"] for r in train_records(tmp / "portable_w1")] == pytest.approx(want, abs=1e-6)
    assert max_diff(portable(tmp / "portable_w1", 8)[0], portable(tmp / "clean", 8)[0]) < 1e-6


@pytest.mark.parametrize("name,key", [("mismatch_experts", "moe.num_experts"), ("mismatch_vocab", "model.vocab_size")])
def test_mismatched_checkpoint_is_refused(tmp, single_rank, name, key):
    proc, snapshot = single_rank
    res = result(tmp / name, proc)
    assert not res["ok"] and "CheckpointMismatch" in res["error"] and key in res["error"]
    assert "nothing was loaded or overwritten" in res["error"]
    assert not (tmp / name / "checkpoints").exists()
    assert {p: p.stat().st_mtime_ns for p in snapshot} == snapshot  # source untouched


@pytest.mark.parametrize("name", list(OPTIM))
def test_optimizers_ep2_on_two_ranks_match_one_rank_zero0(tmp, two_ranks, single_rank, name):
    """Adafactor (ZeRO-0) and AdamW with lr_scale (ZeRO-0 and ZeRO-1), EP=2 on 2 ranks, against one
    process at ZeRO-0 with the same global batch: losses, weights and every optimizer state tensor."""
    ep2, ref = tmp / f"ep2_{name}", tmp / f"ref_{OPTIM_REF[name]}"
    assert result(ep2, two_ranks)["ok"] and result(ref, single_rank[0])["ok"]
    losses, ref_losses = ([r["loss"] for r in train_records(d)] for d in (ep2, ref))
    assert len(losses) == 4 and losses == pytest.approx(ref_losses, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    norms = [r["grad_norm"] for r in train_records(ep2)]
    assert norms == pytest.approx([r["grad_norm"] for r in train_records(ref)], rel=1e-4)
    assert min(norms) > OPTIM[name]["train.grad_clip"]  # every step was clipped
    (w, m), (rw, rm) = portable(ep2, 4), portable(ref, 4)
    assert max_diff(w, rw) < 1e-5
    assert m.keys() == rm.keys() and max(max_diff(m[k], rm[k]) for k in rm) < 1e-5
    if name.startswith("adafactor"):  # factored second moments: a row and a column vector per matrix
        assert set(rm["embed.weight"]) == {"row_var", "col_var"} and rm["embed.weight"]["row_var"].shape == (64, 1)


def test_adafactor_on_zero1_shards_is_something_else(tmp, two_ranks, single_rank):
    """Why validation refuses Adafactor under ZeRO-1/2: on flat shards it takes other steps."""
    assert result(tmp / "adafactor_z1", two_ranks)["ok"]
    got = [r["loss"] for r in train_records(tmp / "adafactor_z1")]
    want = [r["loss"] for r in train_records(tmp / "ref_adafactor")]
    assert got[0] == pytest.approx(want[0], abs=1e-5) and abs(got[-1] - want[-1]) > 1e-3


def test_adafactor_exact_resume(tmp, resumed):
    proc, _ = resumed
    assert result(tmp / "exact_adafactor", proc)["ok"]
    want = [r["loss"] for r in train_records(tmp / "clean_adafactor")][4:]
    assert [r["loss"] for r in train_records(tmp / "exact_adafactor")] == want  # bit for bit


@pytest.mark.parametrize("name", ["portable_adafactor_ep1_w2", "portable_adafactor_w1"])
def test_adafactor_portable_resume_at_other_topologies(tmp, resumed, single_rank, name):
    """EP=2 -> EP=1 on two ranks and on one: Adafactor's factored moments come back exactly."""
    proc = resumed[0] if name.endswith("w2") else single_rank[0]
    assert result(tmp / name, proc)["ok"]
    want = [r["loss"] for r in train_records(tmp / "clean_adafactor")][4:]
    assert [r["loss"] for r in train_records(tmp / name)] == pytest.approx(want, abs=1e-6)
    (w, m), (cw, cm) = portable(tmp / name, 8), portable(tmp / "clean_adafactor", 8)
    assert max_diff(w, cw) < 1e-6 and max(max_diff(m[k], cm[k]) for k in cm) < 1e-6


def test_resume_with_another_optimizer_is_refused(tmp, single_rank):
    proc, _ = single_rank
    res = result(tmp / "adafactor_to_adamw", proc)
    assert not res["ok"] and "CheckpointMismatch" in res["error"] and "train.optimizer=adafactor" in res["error"]


def test_time_budget_stops_all_ranks_with_final_eval_and_checkpoint(tmp, two_ranks):
    """train.max_minutes (6 ms here): the step in progress finishes, then the final evaluation
    (unlike SIGTERM) and a checkpoint that records the time spent."""
    assert result(tmp / "budget", two_ranks)["ok"]
    records = [json.loads(x) for x in (tmp / "budget" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert 1 <= len(steps) <= 2 and steps == list(range(1, len(steps) + 1))
    assert [r["step"] for r in records if r["type"] == "eval"] == [steps[-1]]
    name = f"step_{steps[-1]:08d}"
    assert (tmp / "budget" / "checkpoints" / "latest").read_text() == name
    state = json.loads((tmp / "budget" / "checkpoints" / name / "trainer_state.json").read_text())
    assert state["train_seconds"] >= 1e-4 * 60


def test_bf16_at_zero0_is_autocast_over_fp32_weights(tmp, two_ranks, single_rank):
    """bf16 without ZeRO (Adafactor's case) runs as torch.autocast: EP=2, close to fp32 Adafactor,
    and the optimizer keeps fp32 weights with their factored moments."""
    assert result(tmp / "bf16_autocast_ep2", two_ranks)["ok"]
    bf16 = [r["loss"] for r in train_records(tmp / "bf16_autocast_ep2")]
    fp32 = [r["loss"] for r in train_records(tmp / "ref_adafactor")]
    assert bf16 == pytest.approx(fp32, abs=5e-2) and bf16 != fp32
    weights, moments = portable(tmp / "bf16_autocast_ep2", 4)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert set(moments["embed.weight"]) == {"row_var", "col_var"}
