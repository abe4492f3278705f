"""Single-process pieces of the trainer: LR schedule, DeepSpeed config, optimizer groups, metrics.

No process group is created here; the multi-rank behaviour is in test_distributed.py.
"""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moetrain.config import ParallelConfig, TrainConfig
from moetrain.moe import MoELayer
from moetrain.train.distributed import deepspeed_config
from moetrain.train.optim import param_groups
from moetrain.train.metrics import MetricsLogger, WindowStats, _merge_windows, flops_per_token
from moetrain.train.schedule import LRSchedule, build_scheduler
from moetrain.train.trainer import _to_device


# -- schedule -------------------------------------------------------------------------------


def test_inverse_sqrt_warms_up_then_decays():
    f = LRSchedule("inverse_sqrt", warmup_steps=4, max_steps=100)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the first step already trains
    assert f(4) == pytest.approx(math.sqrt(4 / 5)) and f(15) == pytest.approx(0.5)


def test_linear_reaches_zero_after_last_step_and_constant_stays():
    f = LRSchedule("linear", warmup_steps=2, max_steps=10)
    assert f(1) == 1.0 and f(2) == 1.0 and f(9) == pytest.approx(1 / 8) and f(10) == 0.0
    assert LRSchedule("constant", 0, 10)(5) == 1.0
    assert LRSchedule("inverse_sqrt", 0, 10)(3) == pytest.approx(0.5)  # no warmup: 1/sqrt(step)
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule("cosine", 0, 10)


def test_scheduler_state_records_the_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = build_scheduler(opt, "inverse_sqrt", 4, 100)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    assert sched.state_dict()["lr_lambdas"][0] == {"kind": "inverse_sqrt", "warmup_steps": 4, "max_steps": 100}


# -- DeepSpeed config -------------------------------------------------------------------------


def test_generated_deepspeed_config():
    t = TrainConfig(grad_accum_steps=4, grad_clip=1.0, precision="bf16")
    cfg = deepspeed_config(t, ParallelConfig(ep_size=2, zero_stage=2), on_gpu=False)
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True}
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["zero_allow_untested_optimizer"]


def test_zero0_clips_itself_and_runs_bf16_as_autocast():
    t = TrainConfig(grad_clip=1.0, precision="bf16", optimizer="adafactor")
    cfg = deepspeed_config(t, ParallelConfig(ep_size=2, zero_stage=0), on_gpu=False)
    assert cfg["gradient_clipping"] == 0.0  # moetrain's own clipping (DeepSpeed's norm is wrong under EP)
    assert not cfg["bf16"]["enabled"] and cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_user_json_overrides_but_cannot_contradict(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}, "comms_logger": {}}))
    cfg = deepspeed_config(TrainConfig(), ParallelConfig(zero_stage=1, deepspeed_config=str(user)), on_gpu=False)
    assert cfg["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000} and "comms_logger" in cfg
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="set parallel.zero_stage instead"):
        deepspeed_config(TrainConfig(), ParallelConfig(zero_stage=1, deepspeed_config=str(user)), on_gpu=False)
    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match="set by moetrain"):
        deepspeed_config(TrainConfig(), ParallelConfig(deepspeed_config=str(user)), on_gpu=False)


def test_fp16_needs_a_gpu_and_zero():
    with pytest.raises(ValueError, match="needs a GPU"):
        deepspeed_config(TrainConfig(precision="fp16"), ParallelConfig(zero_stage=1), on_gpu=False)
    with pytest.raises(ValueError, match="zero_stage 1 or 2"):
        deepspeed_config(TrainConfig(precision="fp16"), ParallelConfig(zero_stage=0), on_gpu=True)
    assert deepspeed_config(TrainConfig(precision="fp16"), ParallelConfig(zero_stage=1), on_gpu=True)["fp16"]["enabled"]


def test_accelerate_plugin_must_agree(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    deepspeed_config(TrainConfig(), ParallelConfig(zero_stage=1), on_gpu=False)
    with pytest.raises(ValueError, match="parallel.zero_stage"):
        deepspeed_config(TrainConfig(), ParallelConfig(zero_stage=2), on_gpu=False)


# -- optimizer groups and FLOPs -----------------------------------------------------------


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.moe = MoELayer(8, 16, num_experts=4, estimator="switch")

    def forward(self, x):
        return self.moe(self.norm(self.embed(x)))[0]


def test_param_groups_split_experts_and_decay():
    model = TinyMoE()
    groups = param_groups(model, weight_decay=0.1)
    experts = {id(p) for p in model.moe.experts.parameters()}
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and {id(p) for p in moe[0]["params"]} == experts and moe[0]["weight_decay"] == 0.1
    no_decay = next(g for g in groups if g["name"] == "no_decay")
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["name"] for g in param_groups(model, 0.0)] == ["dense", "ep_size_1"]


def test_lr_scale_groups_and_their_rates():
    model = TinyMoE()
    groups = param_groups(model, 0.0, lr=1e-3, lr_scale={"embed": 10.0, r"experts\.\d+\.wo": 0.5})
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert by_param[id(model.embed.weight)] == pytest.approx(1e-2)
    for expert in model.moe.deepspeed_moe.experts.deepspeed_experts:
        assert by_param[id(expert.wo.weight)] == pytest.approx(5e-4) and by_param[id(expert.wi.weight)] == 1e-3
    assert groups[0]["lr"] == 1e-3  # the unscaled group comes first: its rate is the one logged
    assert all(g.get("moe") for g in groups if any(id(p) in {id(q) for q in model.moe.experts.parameters()}
                                                   for p in g["params"]))
    with pytest.raises(ValueError, match="train.lr_scale: pattern 'embedding' matches no parameter name"):
        param_groups(model, 0.0, lr_scale={"embedding": 2.0})


def test_clip_stage0_gradients_on_one_process():
    from moetrain.train.optim import clip_stage0_gradients

    model = TinyMoE()
    model(torch.randint(0, 10, (2, 5))).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert clip_stage0_gradients(model, norm * 2) == pytest.approx(norm)  # above the norm: unchanged
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert clip_stage0_gradients(model, norm / 4) == pytest.approx(norm)
    clipped = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    assert clipped == pytest.approx(norm / 4, rel=1e-5)


def test_flops_per_token_counts_top_k_experts():
    model = TinyMoE()
    expert = 2 * 8 * 16  # wi + wo of one expert
    dense = 10 * 8 + 2 * 8 + 8 * 4  # embedding, norm, router
    assert flops_per_token(model) == 6.0 * (dense + expert)


# -- metrics --------------------------------------------------------------------------------


def _stats(counts, n, value):
    return SimpleNamespace(tokens_per_expert=torch.tensor(counts), num_tokens=n, balance_loss=torch.tensor(value),
                           z_loss=torch.tensor(value), router_entropy=torch.tensor(value),
                           dropped_fraction=torch.tensor(0.0))


def test_window_is_token_weighted_over_micro_batches_and_ranks():
    a, b = WindowStats(), WindowStats()
    a.add(SimpleNamespace(loss=torch.tensor(1.0), num_tokens=10, logs={"ce": 1.0}, moe_stats=[_stats([10, 0], 10, 1.0)]), 2)
    b.add(SimpleNamespace(loss=torch.tensor(4.0), num_tokens=30, logs={"ce": 2.0}, moe_stats=[_stats([0, 30], 30, 3.0)]), 3)
    merged = _merge_windows([a.part(), b.part()])  # what rank 0 gathers from two ranks
    assert merged["means"]["loss"] == pytest.approx((10 + 120) / 40) and merged["means"]["ce"] == pytest.approx(70 / 40)
    assert merged["tokens"] == 40 and merged["samples"] == 5
    assert merged["moe"][0]["load"] == [0.25, 0.75] and merged["moe"][0]["z_loss"] == pytest.approx(100 / 40)


def test_metrics_logger_writes_jsonl_tensorboard_and_lines(tmp_path, capsys):
    log = MetricsLogger(tmp_path, is_main=True, max_steps=10, start_step=0, layer_names=["encoder.1"])
    moe = [{"load": [0.5, 0.5], "dropped_fraction": 0.0, "router_entropy": 0.6, "balance_loss": 1.0, "z_loss": 2.0}]
    log.log_train(5, {"loss": 2.5, "lr": 1e-3, "tokens_per_second": 100.0, "grad_norm": None, "moe": moe})
    log.log_eval(5, {"loss": 2.0, "bleu": 1.5})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "train" and lines[0]["step"] == 5 and lines[0]["moe"][0]["layer"] == "encoder.1"
    assert lines[1] == {"type": "eval", "step": 5, "loss": 2.0, "bleu": 1.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "step 5/10" in out and "max_load 1.00x" in out and "eval step 5" in out


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    log = MetricsLogger(tmp_path, is_main=True, max_steps=4, start_step=1)
    log.advance(2)
    log.log_train(2, {"loss": 2.5, "lr": 1e-3, "tokens_per_second": 100.0})
    log.message("hello")
    assert log.bar is not None and log.bar.n == 2 and "loss" in str(log.bar.postfix)
    log.close()
    err = capsys.readouterr()
    assert "hello" in err.out + err.err and "step 2/4" not in err.out  # the bar replaces plain lines


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "r1", is_main=False, max_steps=10, start_step=0)
    log.log_train(1, {"loss": 1.0, "lr": 1.0, "tokens_per_second": 1.0})
    log.close()
    assert not (tmp_path / "r1").exists()


# -- small helpers ---------------------------------------------------------------------------


def test_batch_helpers():
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "meta": [torch.ones(2)], "n": 1}
    moved = _to_device(batch, torch.device("cpu"))
    assert moved["n"] == 1 and isinstance(moved["meta"], list)


class ProbeTask:
    def __init__(self, cfg, out_dir):
        self.cfg, self.out_dir = cfg, out_dir


def test_build_task_registry(tmp_path, monkeypatch):
    from moetrain import tasks

    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.build_task(SimpleNamespace(task="nope"), tmp_path)
    monkeypatch.setitem(tasks.TASKS, "probe", f"{__name__}:ProbeTask")
    cfg = SimpleNamespace(task="probe")
    built = tasks.build_task(cfg, str(tmp_path))
    assert isinstance(built, ProbeTask) and built.cfg is cfg and built.out_dir == tmp_path
    assert tasks.TASKS["translation"] == "moetrain.tasks.translation:TranslationTask"
    assert tasks.TASKS["electra"] == "moetrain.tasks.electra:ElectraTask"


def test_task_registries_agree():
    """Every task the config accepts for `moetrain train` has a class, and nothing else does."""
    from moetrain import config, tasks

    assert set(tasks.TASKS) == {name for name, command in config.TASKS.items() if command == "train"}
    with pytest.raises(ValueError, match="task 'glue' is run by `moetrain finetune`"):
        tasks.task_class("glue")


def test_resumed_logger_shows_each_step_once_in_tensorboard(tmp_path, monkeypatch):
    """A run that logged steps 1-4 and resumes from its step-2 checkpoint: TensorBoard (and
    metrics.jsonl) show steps 1-4 once, with the resumed run's values for 3 and 4."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path, is_main=True, max_steps=4, start_step=0)
    for step in range(1, 5):
        first.log_train(step, {"loss": float(step), "tokens_per_second": 1.0, "lr": 0.1})
    first.close()
    # A resume is a later process, so its event file (events.out.tfevents.<second>.<host>.<pid>.<n>)
    # sorts after the first run's. Here both may share a second, and then the per-process writer
    # count n decides: as text, .10 sorts before .9 once 9 writers came before in this process.
    later = time.time() + 2
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: later)
        resumed = MetricsLogger(tmp_path, is_main=True, max_steps=4, start_step=2, resumed=True)
    for step in (3, 4):
        resumed.log_train(step, {"loss": 10.0 + step, "tokens_per_second": 1.0, "lr": 0.1})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_cpu_ranks_on_one_machine_share_its_cores(monkeypatch):
    """Two ranks on one machine get half the cores each; a set OMP_NUM_THREADS is left alone."""
    import os

    import torch

    from moetrain.train.distributed import share_cpu_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert share_cpu_threads({"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)  # torchrun's variable
        torch.set_num_threads(before)
        assert share_cpu_threads({"LOCAL_SIZE": "2"}) == max(1, cores // 2)  # deepspeed's launcher
        torch.set_num_threads(3)
        assert share_cpu_threads({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}) == 3
        assert share_cpu_threads({}) == 3  # one rank: torch's own default stands
    finally:
        torch.set_num_threads(before)


def test_adamw_uses_the_fused_kernel_and_adafactor_the_core_one():
    """build_optimizer: fused AdamW (one kernel for all tensors; HF Trainer's default too), and
    the same update as the one-tensor-at-a-time loop."""
    import torch

    from moetrain.config import TrainConfig
    from moetrain.train.optim import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], TrainConfig(optimizer="adamw", lr=1e-2))
    assert all(g["fused"] for g in fused.param_groups)
    loop = torch.optim.AdamW(models[1].parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0,
                             foreach=False)
    x = torch.randn(16, 8)
    for model, opt in zip(models, (fused, loop)):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert type(build_optimizer(models[0], TrainConfig(optimizer="adafactor", lr=1e-2))) is torch.optim.Adafactor
