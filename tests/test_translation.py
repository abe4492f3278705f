"""The translation recipe: loss, task batches, a few trainer steps, checkpoint averaging, CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import load_config
from moetrain.tasks.translation import label_smoothed_nll_loss


def test_label_smoothed_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]]])
    labels = torch.tensor([[0, 3, -100]])
    eps = 0.1
    loss_sum, nll_sum, ntok = label_smoothed_nll_loss(logits, labels, eps)
    expected = 0.0
    expected_nll = 0.0
    for t, y in ((0, 0), (1, 3)):
        z = logits[0, t].tolist()
        log_z = math.log(sum(math.exp(v) for v in z))
        logp = [v - log_z for v in z]
        target = [eps / 4 + (1 - eps) * (v == y) for v in range(4)]
        expected += -sum(q * lp for q, lp in zip(target, logp))
        expected_nll += -logp[y]
    assert ntok == 2
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert nll_sum.item() == pytest.approx(expected_nll, rel=1e-6)
    # Same as PyTorch's label_smoothing, and eps=0 is plain cross-entropy.
    torch_sum = F.cross_entropy(logits[0], labels[0], ignore_index=-100, label_smoothing=eps, reduction="sum")
    assert loss_sum.item() == pytest.approx(torch_sum.item(), rel=1e-6)
    plain, _, _ = label_smoothed_nll_loss(logits, labels, 0.0)
    assert plain.item() == pytest.approx(expected_nll, rel=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """configs/tiny.yaml with a private cache, and its task."""
    from moetrain.tasks.translation import TranslationTask

    root = tmp_path_factory.mktemp("translation")
    cfg = load_config("configs/tiny.yaml", [f"data.cache_dir={root / 'cache'}", "train.max_steps=12",
                                            "train.eval_every=0", "train.save_every=6", "train.keep_last=3",
                                            "data.synthetic_num_valid=8", "train.max_decode_length=24"])
    run = root / "run"
    run.mkdir()
    return cfg, run, TranslationTask(cfg, run)


def test_task_batches_and_loss(tiny):
    cfg, _, task = tiny
    batches = task.train_batches(0, 1, 0)
    batch = next(batches)
    assert batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] + batch["labels"].shape[1]) \
        <= cfg.data.max_tokens
    # Rank 1 of 2 resumed at 3 sees what it would have seen anyway.
    it = task.train_batches(1, 2, 0)
    for _ in range(3):
        next(it)
    assert torch.equal(next(it)["sample_ids"], next(task.train_batches(1, 2, 3))["sample_ids"])

    model = task.build_model()
    out = task.loss(model, batch)
    assert out.loss.requires_grad and out.num_tokens == int((batch["labels"] != -100).sum())
    assert set(out.logs) >= {"ce_loss", "nll_loss", "balance_loss", "z_loss", "aux_loss"}
    assert len(out.moe_stats) == 2
    # The one visible line: task loss + weighted router losses.
    assert out.loss.item() == pytest.approx(out.logs["ce_loss"] + out.logs["aux_loss"], rel=1e-5)


def test_empty_batch_runs(tiny):
    """A rank padded with an empty batch still runs forward and backward (EP collectives)."""
    _, _, task = tiny
    model = task.build_model()
    batch = task.data.train.collate([])
    out = task.loss(model, batch)
    out.loss.backward()
    assert out.num_tokens == 0 and out.loss.item() == pytest.approx(out.logs["aux_loss"], abs=1e-6)


def test_trainer_loss_decreases_then_average_and_cli(tiny, tmp_path, capsys):
    """A few real trainer steps, then the checkpoint tools on what they wrote."""
    from moetrain.checkpoint_format import average_checkpoints, last_checkpoints
    from moetrain.commands.translation import (
        add_evaluate_arguments,
        add_translate_arguments,
        main_evaluate,
        main_translate,
    )
    from moetrain.train.trainer import train

    cfg, run, task = tiny
    state = train(cfg, run, task)
    assert state.step == 12
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("type") == "train"]
    assert losses[-1] < losses[0]
    evals = [r for r in records if r.get("type") == "eval"]
    assert evals and {"bleu", "ppl", "loss"} <= set(evals[-1])

    steps = last_checkpoints(run, 2)
    assert [p.name for p in steps] == ["step_00000006", "step_00000012"]
    avg = average_checkpoints(steps)
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "portable" / "model.safetensors")) for p in steps)
    key = next(iter(a))
    assert torch.allclose(avg[key], (a[key] + b[key]) / 2)

    src = tmp_path / "src.txt"
    ref = tmp_path / "ref.txt"
    src.write_text("".join(str(s) + "\n" for s in task.data.valid.src_text))
    ref.write_text("".join(str(s) + "\n" for s in task.data.valid.tgt_text))
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    out_json = tmp_path / "m.json"
    args = parser.parse_args([str(run), "--src", str(src), "--ref", str(ref), "--json", str(out_json),
                              "--tokenized-bleu", "--average-last", "2", "--no-progress", "--beam", "2"])
    assert main_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "signature: nrefs:1|case:mixed|eff:no|tok:13a" in printed and "tokenized BLEU" in printed
    metrics = json.loads(out_json.read_text())
    assert metrics["sentences"] == 8 and 0 <= metrics["bleu"] <= 100

    parser = argparse.ArgumentParser()
    add_translate_arguments(parser)
    hyp = tmp_path / "hyp.txt"
    assert main_translate(parser.parse_args([str(steps[-1]), "--input", str(src), "--output", str(hyp),
                                             "--no-progress"])) == 0
    assert len(hyp.read_text().splitlines()) == 8
