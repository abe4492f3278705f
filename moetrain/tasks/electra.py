"""ELECTRA pretraining with a Switch MoE discriminator (task ``electra``).

    moetrain train configs/electra_tiny.yaml --output-dir runs/electra-tiny

Replaced-token detection (Clark et al. 2020, https://arxiv.org/abs/2003.10555): a small
generator fills masked positions with samples from its MLM distribution, the Switch
discriminator tells replaced tokens from original ones. The loss, written out in
:meth:`ElectraTask.loss`::

    loss = mlm + electra.rtd_weight * rtd + moe.balance_coef * sum(balance) + moe.z_coef * sum(z)

with ``mlm`` the generator's cross-entropy at the masked positions, ``rtd`` the
discriminator's binary cross-entropy per (non-special, non-padding) token, and the MoE sums
over the discriminator's (and a Switch generator's) layers. Sampling is not back-propagated
through. Logged: ``mlm_loss``, ``rtd_loss``, ``rtd_accuracy``, ``rtd_baseline_accuracy`` (the
accuracy of answering "original" everywhere), ``replaced_fraction``, ``rtd_replaced_recall``,
``generator_accuracy`` and the MoE losses.

Data: :mod:`moetrain.data.text` (load, clean, vocabulary, packing, sharded resumable batches,
counter-based masking). The run directory receives ``tokenizer/`` (when trained here), which
every checkpoint copies to ``portable/tokenizer``.

``moetrain export`` writes the discriminator as a stock HF ``SwitchTransformersEncoderModel``
with the RTD head in ``moetrain_heads.safetensors``; the generator is left out. Which keys go
where is the model's business (``ElectraModel.export_layout``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.data.text import (
    TextDataError,
    TextSource,
    batch_plan,
    check_tokenizer,
    iter_text,
    load_text,
    mask_tokens,
    pack_sequences,
    pad_batch,
    train_text_tokenizer,
    write_synthetic_corpus,
)
from moetrain.models.electra import ElectraModel
from moetrain.models.moe_stats import moe_aux_loss

from .base import LossOutput, Task

__all__ = ["ElectraTask", "tokenizers_match", "VALID_SAMPLE_BASE"]

#: Sample ids of validation sequences start here (training ids are epoch * N + row).
VALID_SAMPLE_BASE = 1 << 40


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _main_rank_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 first (it trains the tokenizer and fills the caches), then elsewhere."""
    rank, world = _rank_world()
    if world == 1:
        return fn()
    if rank != 0:
        dist.barrier()
    try:
        return fn()
    finally:
        if rank == 0:
            dist.barrier()


def tokenizers_match(a, b) -> bool:
    """Same vocabulary (token -> id) and the same special tokens."""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


class ElectraTask(Task):
    """Task ``electra`` for :func:`moetrain.train.trainer.train` (see the module docstring).

    Args:
        cfg: the run config; reads ``electra``, ``model``, ``moe``, ``data.tokenizer``,
            ``data.vocab_size``, ``data.cache_dir``, ``data.num_workers``, ``train.seed``.
        out_dir: the run directory (tokenizer, synthetic text).
    """

    name = "electra"
    best_metric = "loss"
    higher_is_better = False
    export_layout = ElectraModel.export_layout  # the discriminator and its RTD head

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.e = cfg.electra
        self.seed = cfg.train.seed
        self.tokenizer, self.tokenizer_dir, self.train_seqs, self.valid_seqs = _main_rank_first(self._prepare)
        tok = self.tokenizer
        self.pad_id, self.mask_id = tok.pad_token_id, tok.mask_token_id
        specials = {tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id}
        self.special_ids = torch.tensor(sorted(specials))  # never masked, not scored by RTD

    # -- data ------------------------------------------------------------------------------

    def _prepare(self):
        e, num_proc = self.e, self.cfg.data.num_workers
        raw = self._train_text()
        tokenizer, tokenizer_dir = self._tokenizer(raw)
        train = pack_sequences(raw, tokenizer, e.seq_length, e.source == "hub", num_proc)
        if e.valid_files is not None:
            raw_valid = load_text(TextSource("files", train_files=e.valid_files, encoding_errors=e.encoding_errors),
                                  self.cfg.data.cache_dir)
            valid = pack_sequences(raw_valid, tokenizer, e.seq_length, False, num_proc)
            valid = valid.select(range(min(e.valid_sequences, len(valid))))
        else:
            held = min(e.valid_sequences, len(train) // 10)
            if held < 1:
                raise TextDataError(f"{self._describe_source()}: only {len(train)} packed sequences; expected at "
                                    "least 10 to hold some out for validation (or set electra.valid_files)")
            valid = train.select(range(len(train) - held, len(train)))
            train = train.select(range(len(train) - held))
        return tokenizer, tokenizer_dir, train, valid

    def _describe_source(self) -> str:
        return {"files": self.e.train_files, "hub": self.e.hub_name}.get(self.e.source, "synthetic text")

    def _train_text(self):
        e, cache = self.e, self.cfg.data.cache_dir
        if e.source == "synthetic":
            path = self.out_dir / "data" / f"synthetic-seed{self.seed}-n{e.synthetic_num_documents}.txt"
            write_synthetic_corpus(path, e.synthetic_num_documents, self.seed)
            return load_text(TextSource("files", train_files=str(path), max_documents=e.max_documents), cache)
        return load_text(TextSource(e.source, train_files=e.train_files, hub_name=e.hub_name, hub_config=e.hub_config,
                                    hub_split=e.hub_split, text_column=e.text_column, max_documents=e.max_documents,
                                    encoding_errors=e.encoding_errors), cache)

    def _tokenizer(self, raw):
        """``data.tokenizer``; else ``<run dir>/tokenizer``: kept from an earlier start of this run,
        copied from the checkpoint being resumed, or trained here (WordPiece training is not
        bit-reproducible across processes, so a vocabulary is trained once and then reused)."""
        from moetrain.data.tokenizer import load_tokenizer

        data, model = self.cfg.data, self.cfg.model
        saved = self._resume_tokenizer_dir()
        if data.tokenizer is not None:
            path = Path(data.tokenizer)
            try:
                tokenizer = load_tokenizer(path)
            except (FileNotFoundError, OSError, ValueError) as err:
                raise TextDataError(f"{path}: cannot load the tokenizer ({err}); expected a tokenizer directory "
                                    "with tokenizer.json") from None
        else:
            path = self.out_dir / "tokenizer"
            if not (path / "tokenizer.json").is_file() and saved is not None:
                shutil.copytree(saved, path)
            if (path / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(path)
            else:
                tokenizer = train_text_tokenizer(iter_text(raw), data.vocab_size, path, self.e.tokenizer_kind,
                                                 self.e.lowercase)
        check_tokenizer(tokenizer, path, model.vocab_size, model.pad_token_id)
        # Resuming with another vocabulary would silently reinterpret every embedding row.
        if saved is not None and not tokenizers_match(tokenizer, load_tokenizer(saved)):
            raise TextDataError(f"{path}: vocabulary does not match the checkpoint's tokenizer {saved}; expected "
                                "the tokenizer the checkpoint was trained with (set data.tokenizer to it)")
        return tokenizer, path

    def _resume_tokenizer_dir(self) -> Path | None:
        """The tokenizer saved with the checkpoint ``train.resume`` names, if any."""
        from moetrain.checkpoint_format import resolve_resume

        try:
            ckpt = resolve_resume(self.cfg.train.resume, self.out_dir / "checkpoints")
        except FileNotFoundError:
            return None  # the trainer reports the missing checkpoint itself
        if ckpt is None:
            return None
        return next((p for p in (ckpt / "portable" / "tokenizer", ckpt / "tokenizer")
                     if (p / "tokenizer.json").is_file()), None)

    def _batch(self, sequences: list[list[int]], sample_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        ids, attention = pad_batch(sequences, self.e.seq_length, self.pad_id)
        candidates = attention.bool() & ~torch.isin(ids, self.special_ids)
        masked, labels = mask_tokens(ids, candidates, sample_ids, mask_prob=self.e.mask_prob,
                                     mask_token_prob=self.e.mask_token_prob, mask_id=self.mask_id, seed=self.seed)
        return {"input_ids": masked, "attention_mask": attention, "mlm_labels": labels, "rtd_mask": candidates,
                "sample_ids": sample_ids}

    # -- Task protocol -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def build_model(self, ep_size: int = 1) -> nn.Module:
        e = self.e
        return ElectraModel(self.cfg.model, self.cfg.moe, generator_width_fraction=e.generator_width_fraction,
                            generator_layers=e.generator_layers, generator_moe=e.generator_moe,
                            sampling_temperature=e.sampling_temperature, ep_size=ep_size, noise_seed=self.seed,
                            init_seed=self.seed)

    def train_batches(self, dp_rank: int, dp_world: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Endless masked batches for this rank; see :func:`moetrain.data.text.batch_plan`."""
        for _, rows, sample_ids in batch_plan(len(self.train_seqs), self.e.batch_size, dp_rank, dp_world,
                                              self.seed, start_step):
            sequences = self.train_seqs[rows.tolist()]["input_ids"]
            yield self._batch(sequences, torch.from_numpy(sample_ids))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = model(batch["input_ids"], batch["attention_mask"], batch["mlm_labels"], batch["sample_ids"])
        keep = batch["rtd_mask"].bool()
        mlm = F.cross_entropy(out.mlm_logits, out.mlm_labels) if out.mlm_labels.numel() else out.mlm_logits.sum()
        rtd = F.binary_cross_entropy_with_logits(out.rtd_logits[keep], out.rtd_labels[keep])
        aux, aux_logs = moe_aux_loss(out.moe_stats, self.cfg.moe.balance_loss_weight, self.cfg.moe.z_coef)
        loss = mlm + self.e.rtd_weight * rtd + aux
        counts = _rtd_counts(out, keep)
        logs = {"mlm_loss": float(mlm.detach()), "rtd_loss": float(rtd.detach()), **_rtd_rates(counts), **aux_logs}
        return LossOutput(loss=loss, num_tokens=int(keep.sum()), num_samples=batch["input_ids"].shape[0], logs=logs,
                          moe_stats=out.moe_stats)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dp_rank: int = 0, dp_world: int = 1) -> dict[str, float]:
        """Losses and RTD accuracies on the validation sequences (fixed masks and samples).

        Every rank runs the same number of forwards (the MoE collectives pair up); a rank
        without a batch left repeats its first one and discards the result.
        """
        n, bs = len(self.valid_seqs), self.e.batch_size
        starts = list(range(0, n, bs))
        rounds = -(-len(starts) // dp_world)
        device = next(model.parameters()).device
        sums = torch.zeros(8, dtype=torch.float64)
        for r in range(rounds):
            i = r * dp_world + dp_rank
            use = i < len(starts)
            start = starts[i] if use else starts[0]
            rows = list(range(start, min(start + bs, n)))
            sample_ids = torch.tensor(rows, dtype=torch.long) + VALID_SAMPLE_BASE
            batch = {k: v.to(device) for k, v in self._batch(self.valid_seqs[rows]["input_ids"], sample_ids).items()}
            out = model(batch["input_ids"], batch["attention_mask"], batch["mlm_labels"], batch["sample_ids"])
            if not use:
                continue
            keep = batch["rtd_mask"].bool()
            c = _rtd_counts(out, keep)
            m = out.mlm_labels.numel()
            mlm_sum = F.cross_entropy(out.mlm_logits, out.mlm_labels, reduction="sum") if m else 0.0
            rtd_sum = F.binary_cross_entropy_with_logits(out.rtd_logits[keep], out.rtd_labels[keep], reduction="sum")
            sums += torch.tensor([float(mlm_sum), m, c["gen_correct"], float(rtd_sum), c["tokens"], c["correct"],
                                  c["replaced"], c["replaced_caught"]], dtype=torch.float64)
        if dp_world > 1:
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        mlm_sum, m, gen_correct, rtd_sum, tokens, correct, replaced, caught = sums.tolist()
        mlm_loss, rtd_loss = mlm_sum / max(m, 1), rtd_sum / max(tokens, 1)
        rates = _rtd_rates({"gen_correct": gen_correct, "masked": m, "tokens": tokens, "correct": correct,
                            "replaced": replaced, "replaced_caught": caught})
        return {"loss": mlm_loss + self.e.rtd_weight * rtd_loss, "mlm_loss": mlm_loss, "rtd_loss": rtd_loss, **rates}


def _rtd_counts(out, keep: torch.Tensor) -> dict[str, float]:
    """Counts behind the accuracies (floats, summable over batches and ranks)."""
    pred = out.rtd_logits[keep] > 0
    label = out.rtd_labels[keep] > 0.5
    gen_correct = (out.mlm_logits.argmax(-1) == out.mlm_labels).sum() if out.mlm_labels.numel() else 0
    return {"tokens": float(keep.sum()), "correct": float((pred == label).sum()), "replaced": float(label.sum()),
            "replaced_caught": float((pred & label).sum()), "gen_correct": float(gen_correct),
            "masked": float(out.mlm_labels.numel())}


def _rtd_rates(c: dict[str, float]) -> dict[str, float]:
    tokens = max(c["tokens"], 1.0)
    return {
        "rtd_accuracy": c["correct"] / tokens,
        "rtd_baseline_accuracy": 1.0 - c["replaced"] / tokens,  # always answering "original"
        "replaced_fraction": c["replaced"] / tokens,
        "rtd_replaced_recall": c["replaced_caught"] / max(c["replaced"], 1.0),
        "generator_accuracy": c["gen_correct"] / max(c["masked"], 1.0),
    }
