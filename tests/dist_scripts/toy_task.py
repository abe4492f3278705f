"""A tiny task for trainer tests: embeddings -> two MoE layers -> a softmax over the vocabulary.

It is a ``Task`` with the properties the distributed tests rely on:

* the data is a pure function of (seed, micro-batch index): micro-batch ``m`` is one GLOBAL
  batch of ``rows`` sequences and rank ``r`` of ``W`` takes rows ``[r*rows/W, (r+1)*rows/W)``,
  so one rank and two ranks see the same global batch;
* routing-noise token ids are global (``row * seq_len + position``);
* the loss is a per-token mean (equal token counts per rank make the rank mean the global mean).

Options (``ToyTask(cfg, out_dir, **options)``):
    unmark_experts: strip DeepSpeed's expert flags (negative control: EP results must differ).
    uneven: rank r uses sequences of length seq_len + 3r and rank 1 stops after 3 batches.
    sigterm_at: rank 0 sends itself SIGTERM when it draws this micro-batch (preemption test).
    empty_after: rank 1 yields empty (0-row) filler batches from this micro-batch on.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.moe import MoELayer
from moetrain.tasks import LossOutput, Task


class ToyModel(nn.Module):
    def __init__(self, vocab: int, d_model: int, d_ff: int, moe_kwargs: dict, num_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.drop = nn.Dropout(dropout)  # per-rank RNG: exact resume must restore it
        self.layers = nn.ModuleList(MoELayer(d_model, d_ff, layer_id=i, **moe_kwargs) for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids, token_ids):
        h = self.drop(self.embed(input_ids))
        stats = []
        for layer in self.layers:
            y, s = layer(h, token_ids=token_ids)
            h = h + y
            stats.append(s)
        return self.head(self.norm(h)), stats


class ToyTask(Task):
    name = "toy"
    best_metric = "loss"
    higher_is_better = False

    def __init__(self, cfg, out_dir: Path, rows: int = 8, seq_len: int = 6, unmark_experts: bool = False,
                 uneven: bool = False, sigterm_at: int | None = None, empty_after: int | None = None):
        self.cfg, self.rows, self.seq_len = cfg, rows, seq_len
        self.unmark_experts, self.uneven, self.sigterm_at = unmark_experts, uneven, sigterm_at
        self.empty_after = empty_after
        self.tokenizer_dir = Path(out_dir) / "toy_tokenizer"
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.tokenizer_dir.mkdir(parents=True, exist_ok=True)
            (self.tokenizer_dir / "vocab.txt").write_text("\n".join(map(str, range(cfg.model.vocab_size))))

    def build_model(self, ep_size: int = 1) -> nn.Module:
        m, moe = self.cfg.model, self.cfg.moe
        model = ToyModel(m.vocab_size, m.d_model, m.d_ff, dict(
            num_experts=moe.num_experts, estimator=moe.estimator, top_k=moe.top_k,
            capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
            jitter_eps=moe.jitter_eps, ep_size=ep_size, noise_seed=self.cfg.train.seed,
            init_seed=self.cfg.train.seed, balance_scope=moe.balance_scope, aux_free=moe.aux_free,
            bias_update_rate=moe.bias_update_rate), dropout=m.dropout_rate)
        if self.unmark_experts:
            for layer in model.layers:
                for p in layer.experts.parameters():
                    del p.allreduce, p.group_name
        return model

    def _global_batch(self, index: int, length: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + index)
        return torch.randint(1, self.cfg.model.vocab_size, (self.rows, length), generator=gen)

    def _rank_batch(self, index: int, dp_rank: int, dp_world: int) -> dict[str, torch.Tensor]:
        per_rank = self.rows // dp_world
        length = self.seq_len + (3 * dp_rank if self.uneven else 0)
        ids = self._global_batch(index, length)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        rows = torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        return {"input_ids": ids, "token_ids": rows[:, None] * length + torch.arange(length)}

    def train_batches(self, dp_rank: int, dp_world: int, start_step: int = 0):
        index = start_step
        while not (self.uneven and dp_rank == 1 and index >= 3):  # uneven: rank 1 runs dry early
            if index == self.sigterm_at and dp_rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            batch = self._rank_batch(index, dp_rank, dp_world)
            if self.empty_after is not None and dp_rank == 1 and index >= self.empty_after:
                batch = {k: v[:0] for k, v in batch.items()}
            yield batch
            index += 1

    def loss(self, model, batch) -> LossOutput:
        logits, stats = model(batch["input_ids"], batch["token_ids"])
        target = (batch["input_ids"] * 3 + 1) % self.cfg.model.vocab_size  # a learnable rule
        ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        moe = self.cfg.moe
        loss = ce + moe.balance_loss_weight * sum(s.balance_loss for s in stats) + moe.z_coef * sum(s.z_loss for s in stats)
        return LossOutput(loss, target.numel(), len(batch["input_ids"]), {"ce": float(ce.detach())}, stats)

    def evaluate(self, model, dp_rank: int = 0, dp_world: int = 1) -> dict[str, float]:
        batch = self._rank_batch(10_000, dp_rank, dp_world)
        device = next(model.parameters()).device
        out = self.loss(model, {k: v.to(device) for k, v in batch.items()})
        total = torch.tensor([float(out.loss) * out.num_tokens, out.num_tokens], dtype=torch.float64)
        if dist.is_initialized() and dp_world > 1:
            dist.all_reduce(total)
        return {"loss": float(total[0] / total[1])}


class Seq2SeqToyTask(ToyTask):
    """The real Switch encoder-decoder (``moetrain.models.build_model``) on a reversal task.

    Equal-length sequences (no padding), so every rank holds the same number of tokens and a
    mean of per-rank means is the global mean.
    """

    name = "seq2seq_toy"

    def build_model(self, ep_size: int = 1) -> nn.Module:
        from moetrain.models import build_model

        return build_model(self.cfg.model, self.cfg.moe, ep_size=ep_size, noise_seed=self.cfg.train.seed,
                           init_seed=self.cfg.train.seed)

    def _rank_batch(self, index: int, dp_rank: int, dp_world: int) -> dict[str, torch.Tensor]:
        per_rank = self.rows // dp_world
        src = self._global_batch(index, self.seq_len)[dp_rank * per_rank:(dp_rank + 1) * per_rank].clamp(min=2)
        tgt = src.flip(1)
        start = torch.full_like(tgt[:, :1], self.cfg.model.decoder_start_token_id)
        return {"input_ids": src, "decoder_input_ids": torch.cat([start, tgt[:, :-1]], 1), "labels": tgt,
                "sample_ids": torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)}

    def loss(self, model, batch) -> LossOutput:
        out = model(batch["input_ids"], None, batch["decoder_input_ids"], None, batch["sample_ids"])
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten())
        moe = self.cfg.moe
        stats = out.moe_stats
        aux = moe.balance_loss_weight * sum(s.balance_loss for s in stats) + moe.z_coef * sum(s.z_loss for s in stats)
        return LossOutput(ce + aux, batch["labels"].numel(), len(batch["input_ids"]), {"ce": float(ce.detach())},
                          out.moe_stats)
