"""Writes a tiny run directory with one checkpoint, the way the trainer writes one.

``tests/data/checkpoint-0.1.0/`` was made with ``python tests/checkpoint_fixture.py OUT_DIR`` by the
code of main at 5364698, before the checkpoint format moved to ``moetrain/checkpoint_format.py``;
``test_checkpoint_compat.py`` reads it with today's code. The script runs on both versions: it
uses only what the trainer used then and still uses now (``train.checkpoint._write_portable``,
``TrainerState``, the ``latest`` pointer), with a plain module and optimizer standing in for the
DeepSpeed engine at ZeRO-0. DeepSpeed's own ``engine/`` and ``rng/`` files are not written, so a
resume takes the portable path, as it does after any change of topology.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
STEP = 3
#: A translation model small enough that the whole directory stays a few KB.
OVERRIDES = ["model.vocab_size=12", "data.vocab_size=12", "model.d_model=4", "model.d_ff=4", "model.d_kv=2",
             "model.num_layers=1", "model.num_decoder_layers=1", "moe.sparse_step=1",
             "model.num_heads=2", "model.relative_attention_num_buckets=4", "moe.num_experts=2",
             "model.dropout_rate=0.0", "train.lr=0.01"]


def fixture_config():
    from moetrain.config import load_config

    return load_config(REPO_ROOT / "configs" / "tiny.yaml", OVERRIDES)


def write_tokenizer(path: Path) -> Path:
    """A bare ``tokenizer.json`` (word level, T5's special ids: 0 pad, 1 eos, 2 unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 12)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def trained_engine(cfg):
    """The model after ``STEP`` AdamW steps, with its optimizer and LR schedule, as an engine stand-in."""
    from moetrain.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEP):
        src = torch.randint(3, cfg.model.vocab_size, (2, 5), generator=gen)
        tgt = torch.randint(3, cfg.model.vocab_size, (2, 4), generator=gen)
        out = model(src, None, tgt)
        loss = out.logits.pow(2).mean() + sum(s.balance_loss for s in out.moe_stats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return SimpleNamespace(module=model, optimizer=opt, lr_scheduler=sched, zero_optimization=lambda: False)


def write_checkpoint(run_dir: Path) -> Path:
    """``run_dir/checkpoints/step_00000003`` and ``latest``; returns the step directory."""
    from moetrain.train import checkpoint

    cfg = fixture_config()
    engine = trained_engine(cfg)
    model, opt = engine.module, engine.optimizer
    weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    moments = {name: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "step"}
               for name, p in model.named_parameters()}
    state = checkpoint.TrainerState(step=STEP, data_position=STEP, best_metric=1.5, best_step=STEP, metric="bleu",
                                    higher_is_better=True, train_seconds=1.25,
                                    topology={"world_size": 1, "ep_size": 1, "zero_stage": 0, "precision": "fp32"})
    step_dir = run_dir / "checkpoints" / f"step_{STEP:08d}"
    checkpoint._write_portable(step_dir / "portable", weights, moments, engine, state, cfg,
                               write_tokenizer(run_dir / "tokenizer"))
    (step_dir / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    (run_dir / "checkpoints" / "latest").write_text(step_dir.name)
    return step_dir


if __name__ == "__main__":
    print(write_checkpoint(Path(sys.argv[1])))
