"""Translation (WMT'14 En-De and the built-in synthetic demo): recipe, evaluation, inference.

The recipe follows the Switch/SparseMixer WMT'14 setting (Liu et al. 2023, fairseq): label-
smoothed cross-entropy (0.1) normalised per target token, plus the router losses; Adam
betas (0.9, 0.98) with inverse-sqrt warmup (``train.*``, applied by the trainer); token-
budget batches; validation loss, perplexity and beam-search BLEU on the dev set.

    task = TranslationTask(cfg, out_dir)       # prepares tokenizer + data (cached)
    model = task.build_model(ep_size=1)
    out = task.loss(model, batch)              # LossOutput
    metrics = task.evaluate(model)             # {"loss", "nll_loss", "ppl", "bleu", ...}

    translator, cfg = Translator.load(run_dir)  # a checkpoint, or an HF export directory

``moetrain evaluate`` and ``moetrain translate`` (:mod:`moetrain.commands.translation`) are
built on :class:`Translator`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.data.batching import TokenBudgetBatcher
from moetrain.data.pipeline import IGNORE_INDEX, prepare_translation_data
from moetrain.eval.bleu import bleu_report

from .base import ExportCheck, LossOutput, Task

__all__ = ["TranslationTask", "label_smoothed_nll_loss", "Translator"]


def label_smoothed_nll_loss(logits: Tensor, labels: Tensor, epsilon: float) -> tuple[Tensor, Tensor, int]:
    """Summed label-smoothed cross-entropy and summed NLL over non-padding target tokens.

    The smoothed target puts ``1 - epsilon`` on the gold token and spreads ``epsilon``
    uniformly over the whole vocabulary (``F.cross_entropy(label_smoothing=epsilon)``)::

        loss_t = (1 - epsilon) * -log p(y_t) + epsilon * mean_v(-log p(v))

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` gold ids, ``-100`` at padding.
        epsilon: smoothing mass (0 = plain cross-entropy).

    Returns:
        ``(loss_sum, nll_sum, num_tokens)``; divide by ``num_tokens`` for per-token values.
    """
    mask = labels != IGNORE_INDEX
    lprobs = F.log_softmax(logits.float(), dim=-1)
    gold = labels.masked_fill(~mask, 0).unsqueeze(-1)
    nll = -lprobs.gather(-1, gold).squeeze(-1)
    smooth = -lprobs.mean(dim=-1)
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(mask, loss, zero).sum(), torch.where(mask, nll, zero).sum().detach(), int(mask.sum())


class TranslationTask(Task):
    """Sequence-to-sequence translation on the data described by ``cfg.data``.

    Args:
        cfg: the ``RunConfig`` (sections ``model``, ``moe``, ``data``, ``train``).
        out_dir: run directory; receives ``tokenizer/`` and ``data_report.json``.
    """

    name = "translation"
    best_metric = "bleu"
    higher_is_better = True

    def __init__(self, cfg, out_dir: str | Path):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.data = prepare_translation_data(cfg.data, seed=cfg.train.seed, run_dir=self.out_dir,
                                             splits=("train", "valid"))
        self.tokenizer = self.data.tokenizer
        self.tokenizer_dir = self.data.tokenizer_dir
        if len(self.tokenizer) > cfg.model.vocab_size:
            from moetrain.data.sources import DataError

            raise DataError(f"model.vocab_size: the tokenizer ({self.tokenizer_dir}) has {len(self.tokenizer)} tokens "
                            f"but model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size to at least "
                            f"{len(self.tokenizer)}" + ("" if cfg.data.tokenizer else " or lower data.vocab_size"))

    # -- Task protocol -----------------------------------------------------------------

    def build_model(self, ep_size: int = 1) -> nn.Module:
        from moetrain.models import build_model

        seed = self.cfg.train.seed
        return build_model(self.cfg.model, self.cfg.moe, ep_size=ep_size, noise_seed=seed, init_seed=seed)

    def train_batches(self, dp_rank: int, dp_world: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Endless token-budget batches of this rank's shard, from micro-batch ``start_step``."""
        train = self.data.train
        batcher = TokenBudgetBatcher(train.src_len, train.tgt_len, self.cfg.data.max_tokens, seed=self.cfg.train.seed,
                                     dp_rank=dp_rank, dp_world=dp_world)
        for indices in batcher.iterate(start_step):
            yield self._collate(train, indices)

    def _collate(self, split, indices) -> dict[str, Tensor]:
        m = self.cfg.model
        return split.collate(indices, pad_id=m.pad_token_id, decoder_start_id=m.decoder_start_token_id)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        out = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                    batch["decoder_attention_mask"], sample_ids=batch["sample_ids"])
        ls_sum, nll_sum, ntok = label_smoothed_nll_loss(out.logits, batch["labels"], self.cfg.train.label_smoothing)
        ce = ls_sum / max(ntok, 1)  # per target token (fairseq's token sum made the MoE losses ~1e-6 weak)
        aux, aux_logs = self._moe_aux_loss(out.moe_stats)
        loss = ce + aux
        logs = {"ce_loss": float(ce.detach()), "nll_loss": float(nll_sum) / max(ntok, 1), **aux_logs}
        return LossOutput(loss=loss, num_tokens=ntok, num_samples=batch["input_ids"].shape[0], logs=logs,
                          moe_stats=out.moe_stats)

    def _moe_aux_loss(self, moe_stats):
        from moetrain.models import moe_aux_loss

        return moe_aux_loss(moe_stats, self.cfg.moe.balance_loss_weight, self.cfg.moe.z_coef)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dp_rank: int = 0, dp_world: int = 1) -> dict[str, float]:
        """Dev-set loss, perplexity and beam-search BLEU (every rank must call it)."""
        valid = self.data.valid
        if valid is None:
            return {}
        t, device = self.cfg.train, next(model.parameters()).device
        batcher = TokenBudgetBatcher(valid.src_len, valid.tgt_len, self.cfg.data.max_tokens, shuffle=False,
                                     dp_rank=dp_rank, dp_world=dp_world)
        sums = torch.zeros(3, dtype=torch.float64)  # label-smoothed loss, nll, tokens
        hyps: dict[int, str] = {}
        group = dist.group.WORLD if dp_world > 1 else None
        for indices in batcher.epoch(0):  # same count on every rank; some may be empty
            batch = {k: v.to(device) for k, v in self._collate(valid, indices).items()}
            out = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                        batch["decoder_attention_mask"], sample_ids=batch["sample_ids"])
            ls_sum, nll_sum, ntok = label_smoothed_nll_loss(out.logits, batch["labels"], t.label_smoothing)
            sums += torch.tensor([float(ls_sum), float(nll_sum), ntok], dtype=torch.float64)
            generated = model.generate(batch["input_ids"], batch["attention_mask"], num_beams=t.beam_size,
                                       length_penalty=t.length_penalty, max_length=t.max_decode_length + 1,
                                       sample_ids=batch["sample_ids"], dist_group=group)
            texts = self.tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
            hyps.update(zip(indices.tolist(), texts))
        if dp_world > 1:
            dist.all_reduce(sums)
            parts: list = [None] * dp_world
            dist.all_gather_object(parts, hyps)
            hyps = {k: v for part in parts for k, v in part.items()}
        ls, nll, ntok = sums.tolist()
        refs = [str(valid.tgt_text[i]) for i in range(len(valid))]
        # The synthetic language separates punctuation by design; sacreBLEU would warn it looks tokenised.
        bleu = bleu_report([hyps[i] for i in range(len(valid))], refs, lang=self.cfg.data.tgt_lang,
                           force=self.cfg.data.source == "synthetic")
        nll_per_token = nll / max(ntok, 1)
        return {"loss": ls / max(ntok, 1), "nll_loss": nll_per_token, "ppl": math.exp(min(nll_per_token, 50.0)),
                "bleu": bleu["bleu"], "bleu_brevity_penalty": bleu["bleu_brevity_penalty"]}


    @classmethod
    def check_export(cls, ckpt, hf_dir: Path, num_check: int = 100) -> ExportCheck:
        """Translate the first ``num_check`` validation sources with moetrain and with stock
        ``SwitchTransformersForConditionalGeneration`` loaded from ``hf_dir`` (the checkpoint's
        beam settings) and count identical outputs."""
        from moetrain.data.sources import load_split
        from moetrain.models import build_model

        cfg = ckpt.cfg
        usage = (f"moetrain: load it with transformers.SwitchTransformersForConditionalGeneration.from_pretrained("
                 f"'{hf_dir}'), or: moetrain translate {hf_dir} --input FILE --output FILE")
        pairs = load_split(cfg.data, "valid", cfg.train.seed)
        if pairs is None or num_check <= 0:
            return ExportCheck(usage=usage)
        sources = list(pairs[0])[:num_check]
        decoding = {"beam_size": cfg.train.beam_size, "length_penalty": cfg.train.length_penalty,
                    "max_length": cfg.train.max_decode_length, "progress": False}
        model = build_model(cfg.model, cfg.moe)
        model.load_state_dict(ckpt.weights)
        hf = Translator.load(hf_dir, device="cpu")[0]
        ours = Translator(model, hf.tokenizer).translate(sources, **decoding)
        theirs = hf.translate(sources, **decoding)
        same = sum(a == b for a, b in zip(ours, theirs))
        return ExportCheck({"checked_sentences": len(sources), "identical_translations": same},
                           f"; stock transformers translates {same}/{len(sources)} validation sentences exactly "
                           "as moetrain does", usage)


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------


class Translator:
    """Batched beam search with a moetrain checkpoint or an exported HF directory.

    Args:
        model: a ``SwitchTransformer`` or an HF ``SwitchTransformersForConditionalGeneration``.
        tokenizer: the shared tokenizer.
        hf: True when ``model`` is the HF class (its ``generate`` takes keyword tensors).
    """

    def __init__(self, model: nn.Module, tokenizer, hf: bool = False, device: str | torch.device = "cpu"):
        self.model, self.tokenizer, self.hf = model.to(device).eval(), tokenizer, hf
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path, average_last: int = 0, device: str | None = None) -> tuple["Translator", Any]:
        """From a portable checkpoint / run dir, or an HF directory (``config.json`` inside).

        Returns:
            ``(translator, cfg)``; ``cfg`` is the run config, or None for an HF directory.
        """
        from moetrain.data.tokenizer import load_tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = Path(path)
        if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
            from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

            model = SwitchTransformersForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
            return cls(model, AutoTokenizer.from_pretrained(str(path)), hf=True, device=device), None
        from moetrain.checkpoint_format import TOKENIZER, last_checkpoints, read_averaged, read_portable
        from moetrain.models import build_model

        ckpt = read_averaged(last_checkpoints(path, average_last)) if average_last > 0 else read_portable(path)
        model = build_model(ckpt.cfg.model, ckpt.cfg.moe)
        model.load_state_dict(ckpt.weights)
        return cls(model, load_tokenizer(ckpt.path / TOKENIZER), device=device), ckpt.cfg

    @torch.no_grad()
    def translate(self, sentences: Sequence[str], *, beam_size: int = 4, length_penalty: float = 0.6,
                  max_length: int = 256, max_tokens: int = 4096, progress: bool = True,
                  max_source_length: int | None = None, warn=None) -> list[str]:
        """Translations of ``sentences``, in order (batches of similar lengths, a tqdm bar).

        A blank (or whitespace-only) line translates to an empty line, so the output has as many
        lines as the input. Sources longer than ``max_source_length`` tokens (EOS included) are
        cut to that length, and one warning (``warn``, default stderr) counts them: encoder
        memory grows with the square of the length, and one 10k-word line once took 22 GB. A
        batch holds at most ``max_tokens`` padded source tokens, so with the cap memory is
        bounded by the budget whatever the input.
        """
        from tqdm import tqdm

        if max_source_length is not None and max_source_length > max_tokens:
            raise ValueError(f"max_source_length ({max_source_length}) must not exceed max_tokens ({max_tokens})")
        warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        keep = [i for i, s in enumerate(sentences) if s.strip()]
        encoded = [self.tokenizer(sentences[i])["input_ids"] for i in keep]
        truncated = 0
        if max_source_length is not None:
            eos = self.tokenizer.eos_token_id
            for j, ids in enumerate(encoded):
                if len(ids) > max_source_length:
                    truncated += 1
                    cut = ids[:max_source_length]
                    if eos is not None and ids[-1] == eos:
                        cut[-1] = eos  # keep the end-of-sentence marker the model was trained with
                    encoded[j] = cut
        if truncated:
            warn(f"moetrain: warning: {truncated} of {len(sentences)} source lines were longer than "
                 f"{max_source_length} tokens and were truncated to it (--max-source-length)")
        out: list[str] = [""] * len(sentences)
        if not encoded:
            return out
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        # The budget counts padded source tokens (target lengths are unknown: zeros).
        batcher = TokenBudgetBatcher(lengths, np.zeros_like(lengths), max_tokens, shuffle=False)
        bar = tqdm(total=len(encoded), desc="translate", unit="sent", disable=not progress, file=sys.stderr)
        for indices in batcher.epoch(0):
            if len(indices) == 0:
                continue
            ids, mask = self._pad([encoded[i] for i in indices])
            if self.hf:
                extra = {"early_stopping": True} if beam_size > 1 else {}  # HF refuses it without beams
                generated = self.model.generate(input_ids=ids, attention_mask=mask, num_beams=beam_size,
                                                length_penalty=length_penalty, max_length=max_length + 1,
                                                do_sample=False, **extra)
            else:
                generated = self.model.generate(ids, mask, num_beams=beam_size, length_penalty=length_penalty,
                                                max_length=max_length + 1)
            texts = self.tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
            for i, text in zip(indices.tolist(), texts):
                out[keep[i]] = text.strip()
            bar.update(len(indices))
        bar.close()
        return out

    def _pad(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)
