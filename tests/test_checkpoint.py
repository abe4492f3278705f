"""Checkpoint bookkeeping without a process group: pointers, pruning, names, compatibility.

The save / kill / resume / reshard behaviour under real launches is in test_distributed.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from moetrain import checkpoint_format as fmt
from moetrain.config import RunConfig, save_config
from moetrain.moe import MoELayer
from moetrain.train import checkpoint as ck


def _step_dirs(root, *steps):
    for s in steps:
        (root / fmt.checkpoint_name(s)).mkdir(parents=True)


def test_prune_keeps_last_n_plus_latest_and_best(tmp_path):
    _step_dirs(tmp_path, 10, 20, 30, 40)
    (tmp_path / ".tmp-step_00000050").mkdir()
    fmt.write_pointer(tmp_path / "latest", "step_00000040")
    fmt.write_pointer(tmp_path / "best", "step_00000010")
    fmt.prune(tmp_path, keep_last=2)
    assert [p.name for p in fmt.list_checkpoints(tmp_path)] == ["step_00000010", "step_00000030", "step_00000040"]
    assert not list(tmp_path.glob(".latest.tmp"))  # the pointer was replaced atomically
    fmt.prune(tmp_path, keep_last=0)  # 0 = keep everything
    assert len(fmt.list_checkpoints(tmp_path)) == 3


def test_publish_replaces_a_step_saved_before(tmp_path):
    _step_dirs(tmp_path, 10, 20)
    fmt.write_pointer(tmp_path / "latest", "step_00000020")
    tmp = tmp_path / ".tmp-step_00000020"
    tmp.mkdir()
    (tmp / "new").write_text("x")
    fmt.publish(tmp_path, tmp, "step_00000020", is_best=True)
    assert (tmp_path / "step_00000020" / "new").exists() and not tmp.exists()
    assert (tmp_path / "latest").read_text() == "step_00000020" == (tmp_path / "best").read_text()
    assert not list(tmp_path.glob(".tmp-*"))


def test_resolve_resume(tmp_path):
    root = tmp_path / "checkpoints"
    assert fmt.resolve_resume(None, root) is None
    assert fmt.resolve_resume("latest", root) is None  # a fresh run: nothing to resume yet
    _step_dirs(root, 5)
    fmt.write_pointer(root / "latest", "step_00000005")
    assert fmt.resolve_resume("latest", root) == root / "step_00000005"
    assert fmt.resolve_resume(str(root), tmp_path / "elsewhere") == root / "step_00000005"
    assert fmt.resolve_resume(str(root / "step_00000005"), root) == root / "step_00000005"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fmt.resolve_resume(str(tmp_path / "missing"), root)


def test_global_expert_names():
    layers = {"enc.1.ffn": SimpleNamespace(ep_rank=1, num_local_experts=2)}
    local = "enc.1.ffn.deepspeed_moe.experts.deepspeed_experts.1.wi.weight"
    key, layer = fmt.global_key(local, layers)
    assert key == "enc.1.ffn.deepspeed_moe.experts.deepspeed_experts.3.wi.weight" and layer is layers["enc.1.ffn"]
    assert fmt.global_key("enc.1.ffn.router.classifier.weight", layers) == ("enc.1.ffn.router.classifier.weight", None)


def test_trainer_state_roundtrip_and_best(tmp_path):
    state = fmt.TrainerState(step=7, data_position=14, metric="bleu", higher_is_better=True)
    assert state.improves(1.0)
    state.best_metric = 3.0
    assert state.improves(3.5) and not state.improves(2.0)
    (tmp_path / "s.json").write_text(json.dumps({**asdict(state), "future_field": 1}))
    assert fmt.TrainerState.from_json(tmp_path / "s.json") == state


class Net(nn.Module):
    def __init__(self, vocab=10, experts=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.ffn = MoELayer(8, 16, num_experts=experts, estimator="switch")


def _portable(tmp_path, model, cfg):
    path = tmp_path / "portable"
    path.mkdir()
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path / "model.safetensors"))
    save_config(cfg, path / "config.yaml")
    (path / "trainer_state.json").write_text(json.dumps(asdict(fmt.TrainerState(step=3))))
    return path


def test_expected_shapes_expand_local_experts():
    shapes = ck.expected_global_shapes(Net())
    assert shapes["ffn.deepspeed_moe.experts.deepspeed_experts.3.wo.weight"] == (8, 16)
    assert shapes["embed.weight"] == (10, 8)


def test_mismatch_names_the_config_key(tmp_path):
    cfg = RunConfig()
    path = _portable(tmp_path, Net(), cfg)
    other = RunConfig()
    other.moe.num_experts, other.model.vocab_size = 16, 1000
    with pytest.raises(ck.CheckpointMismatch, match=r"moe.num_experts: checkpoint 8, config 16") as err:
        ck.check_compatible(cfg, other, path / "model.safetensors", Net())
    assert "model.vocab_size: checkpoint 32128, config 1000" in str(err.value)


def test_mismatch_in_shapes_when_configs_agree(tmp_path):
    """Same config, different code: names and shapes are compared against the file."""
    cfg = RunConfig()
    path = _portable(tmp_path, Net(vocab=10, experts=4), cfg)
    ck.check_compatible(cfg, cfg, path / "model.safetensors", Net(vocab=10, experts=4))  # fine
    with pytest.raises(ck.CheckpointMismatch, match=r"embed.weight: checkpoint \(10, 8\), model \(12, 8\)"):
        ck.check_compatible(cfg, cfg, path / "model.safetensors", Net(vocab=12, experts=4))
    with pytest.raises(ck.CheckpointMismatch, match="missing in checkpoint"):
        ck.check_compatible(cfg, cfg, path / "model.safetensors", Net(vocab=10, experts=8))


def test_read_portable(tmp_path):
    cfg = RunConfig(name="probe")
    model = Net()
    path = _portable(tmp_path, model, cfg)
    ckpt = fmt.read_portable(tmp_path)  # the step directory works too
    assert ckpt.cfg.name == "probe" and ckpt.state.step == 3
    assert torch.equal(ckpt.weights["embed.weight"], model.embed.weight.detach())
    assert fmt.read_portable(path).state.step == 3


def test_rng_roundtrip_without_pickle(tmp_path):
    import random

    import numpy as np

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    ck._save_rng(tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck._load_rng(tmp_path / "rng.pt")  # torch.load(weights_only=True) inside
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
