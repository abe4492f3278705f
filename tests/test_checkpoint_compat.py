"""A checkpoint written before the checkpoint format had one owner still loads, resumes and
exports, and today's trainer writes the same files.

``tests/data/checkpoint-0.1.0`` was written by main at 5364698 through the trainer's own
writer (see ``tests/checkpoint_fixture.py``, which made it): a run directory whose
``checkpoints/latest`` names ``step_00000003`` after three AdamW steps of a tiny translation model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open

from checkpoint_fixture import STEP, write_checkpoint
from moetrain import cli
from moetrain.config import load_config
from moetrain.checkpoint_format import read_optimizer, read_portable, resolve_resume
from moetrain.models import build_model
from moetrain.train.checkpoint import load_checkpoint
from moetrain.train.distributed import DistInfo

OLD_RUN = Path(__file__).resolve().parent / "data" / "checkpoint-0.1.0"
OLD_PORTABLE = OLD_RUN / "checkpoints" / f"step_{STEP:08d}" / "portable"


def test_old_checkpoint_reads_from_the_run_directory():
    ckpt = read_portable(OLD_RUN)  # run dir -> checkpoints/latest -> portable/
    assert ckpt.path == OLD_PORTABLE and ckpt.tokenizer_dir == OLD_PORTABLE / "tokenizer"
    assert (ckpt.state.step, ckpt.state.metric, ckpt.state.best_metric, ckpt.state.train_seconds) == \
        (STEP, "bleu", 1.5, 1.25)
    model = build_model(ckpt.cfg.model, ckpt.cfg.moe)
    model.load_state_dict(ckpt.weights)  # strict: every name and shape fits today's model


def test_old_checkpoint_resumes(tmp_path):
    """The portable path of a resume (any change of topology takes it) at ZeRO-0, into a
    stand-in engine: weights, AdamW moments and step, LR schedule and trainer state come back."""
    saved = read_portable(OLD_RUN)
    cfg = saved.cfg
    torch.manual_seed(5)  # other initial weights: everything below must come from the checkpoint
    model = build_model(cfg.model, cfg.moe)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    engine = SimpleNamespace(module=model, optimizer=opt, lr_scheduler=sched, zero_optimization=lambda: False)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    path = resolve_resume(str(OLD_RUN / "checkpoints"), tmp_path / "checkpoints")
    state, exact = load_checkpoint(engine, path, cfg, info)

    assert not exact and (state.step, state.data_position, state.best_step) == (STEP, STEP, STEP)
    assert all(torch.equal(v, saved.weights[k]) for k, v in model.state_dict().items())
    moments = read_optimizer(OLD_PORTABLE)["moments"]
    for name, param in model.named_parameters():
        restored = opt.state[param]
        assert int(restored["step"]) == STEP, name
        assert torch.equal(restored["exp_avg"], moments[name]["exp_avg"]), name
        assert torch.equal(restored["exp_avg_sq"], moments[name]["exp_avg_sq"]), name
    assert engine.global_steps == STEP and sched.last_epoch == STEP
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * (STEP + 1) / 10)


def test_old_checkpoint_exports(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main(["export", str(OLD_RUN), "--out", str(tmp_path / "hf"), "--verify"]) == 0
    assert float(capsys.readouterr().out.rsplit("=", 1)[1]) < 1e-4
    assert json.loads((tmp_path / "hf" / "moetrain_export.json").read_text())["source"] == str(OLD_PORTABLE)


def _tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_todays_writer_writes_the_same_files(tmp_path):
    step = write_checkpoint(tmp_path / "run")
    new, old = step / "portable", OLD_PORTABLE
    assert sorted(p.relative_to(new) for p in new.rglob("*")) == sorted(p.relative_to(old) for p in old.rglob("*"))
    for name in ("trainer_state.json", "tokenizer/tokenizer.json"):
        assert (new / name).read_bytes() == (old / name).read_bytes(), name
    # config.yaml grows when a config key is added (moe.balance, train.plot, ...): every old key
    # keeps its value, and the old file loads to the same config as the new one.
    old_cfg, new_cfg = (yaml.safe_load((d / "config.yaml").read_text()) for d in (old, new))
    for section, values in old_cfg.items():
        if isinstance(values, dict):
            assert {k: new_cfg[section].get(k) for k in values} == values, section
        else:
            assert new_cfg[section] == values, section
    assert load_config(old / "config.yaml") == load_config(new / "config.yaml")
    assert (step / "trainer_state.json").read_bytes() == (old.parent / "trainer_state.json").read_bytes()
    (new_meta, new_w), (old_meta, old_w) = _tensors(new / "model.safetensors"), _tensors(old / "model.safetensors")
    assert new_meta == old_meta and new_w.keys() == old_w.keys()
    for key, value in old_w.items():  # the same three AdamW steps; allow other hardware's rounding
        assert new_w[key].dtype == value.dtype and torch.allclose(new_w[key], value, atol=1e-5), key
    new_opt, old_opt = read_optimizer(new), read_optimizer(old)
    assert (new_opt["adam_step"], new_opt["optimizer"]) == (old_opt["adam_step"], old_opt["optimizer"])
    assert {k: sorted(v) for k, v in new_opt["moments"].items()} == {k: sorted(v) for k, v in old_opt["moments"].items()}
    assert new_opt["lr_scheduler"].keys() == old_opt["lr_scheduler"].keys()
