"""Translation (WMT'14 En-De and the built-in synthetic demo): recipe, evaluation, CLI.

The recipe follows the Switch/SparseMixer WMT'14 setting (Liu et al. 2023, fairseq): label-
smoothed cross-entropy (0.1) normalised per target token, plus the router losses; Adam
betas (0.9, 0.98) with inverse-sqrt warmup (``train.*``, applied by the trainer); token-
budget batches; validation loss, perplexity and beam-search BLEU on the dev set.

    task = TranslationTask(cfg, out_dir)       # prepares tokenizer + data (cached)
    model = task.build_model(ep_size=1)
    out = task.loss(model, batch)              # LossOutput
    metrics = task.evaluate(model)             # {"loss", "nll_loss", "ppl", "bleu", ...}

Command-line entry points (registered by ``moetrain.cli``):

    moetrain evaluate CHECKPOINT [--src FILE --ref FILE] [--tokenized-bleu] [--average-last N]
    moetrain translate CHECKPOINT|HF_DIR --input FILE --output FILE

``CHECKPOINT`` is a portable checkpoint (``.../step_X/portable``), a step directory or a run
directory (its latest checkpoint); ``HF_DIR`` is a ``moetrain export`` output.
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

__all__ = ["TranslationTask", "label_smoothed_nll_loss", "Translator",
           "add_evaluate_arguments", "main_evaluate", "add_translate_arguments", "main_translate"]


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
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but model.vocab_size is "
                             f"{cfg.model.vocab_size}; raise model.vocab_size or lower data.vocab_size")

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
        return LossOutput(loss=loss, num_tokens=ntok, logs=logs, moe_stats=out.moe_stats)

    def _moe_aux_loss(self, moe_stats):
        from moetrain.models import moe_aux_loss

        return moe_aux_loss(moe_stats, self.cfg.moe.balance_coef, self.cfg.moe.z_coef)

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
                  max_length: int = 256, max_tokens: int = 4096, progress: bool = True) -> list[str]:
        """Translations of ``sentences``, in order (batches of similar lengths, a tqdm bar)."""
        from tqdm import tqdm

        encoded = [self.tokenizer(s)["input_ids"] for s in sentences]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        # The budget counts padded source tokens (target lengths are unknown: zeros).
        batcher = TokenBudgetBatcher(lengths, np.zeros_like(lengths), max_tokens, shuffle=False)
        out: list[str] = [""] * len(sentences)
        bar = tqdm(total=len(sentences), desc="translate", unit="sent", disable=not progress, file=sys.stderr)
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
                out[i] = text.strip()
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


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _add_decoding_arguments(parser) -> None:
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the checkpoint's train.beam_size, or 4)")
    parser.add_argument("--lenpen", type=float, default=None,
                        help="length penalty alpha (default: train.length_penalty, or 0.6)")
    parser.add_argument("--max-length", dest="max_length", type=int, default=None,
                        help="longest output in tokens (default: train.max_decode_length, or 256)")
    parser.add_argument("--max-tokens", dest="max_tokens", type=int, default=4096,
                        help="source-token budget of one translation batch (default: 4096)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def add_evaluate_arguments(parser) -> None:
    """``moetrain evaluate CHECKPOINT [--src FILE --ref FILE] ...``."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="portable checkpoint, step directory, run directory (latest checkpoint) or HF directory")
    parser.add_argument("--src", default=None, help="source sentences, one per line (default: the config's test "
                                                     "set, else its validation set)")
    parser.add_argument("--ref", default=None, help="reference translations, line-aligned with --src")
    parser.add_argument("--output", default=None, help="also write the hypotheses to this file")
    parser.add_argument("--json", default=None, help="metrics file (default: <output>.json, else "
                                                      "eval-<src name>.json next to the checkpoint)")
    parser.add_argument("--tokenized-bleu", dest="tokenized_bleu", action="store_true",
                        help="also report tokenised BLEU with compound splitting (fairseq-era WMT'14 tables)")
    parser.add_argument("--average-last", dest="average_last", type=int, default=0, metavar="N",
                        help="average the weights of the run's last N checkpoints first")
    _add_decoding_arguments(parser)


def add_translate_arguments(parser) -> None:
    """``moetrain translate CHECKPOINT|HF_DIR --input FILE --output FILE``."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="portable checkpoint, run directory or HF directory")
    parser.add_argument("--input", required=True, help="source sentences, one per line ('-' = stdin)")
    parser.add_argument("--output", required=True, help="where to write the translations ('-' = stdout)")
    parser.add_argument("--average-last", dest="average_last", type=int, default=0, metavar="N",
                        help="average the weights of the run's last N checkpoints first")
    _add_decoding_arguments(parser)


def _decoding(args, cfg) -> dict[str, Any]:
    t = cfg.train if cfg is not None else None
    return {"beam_size": args.beam or (t.beam_size if t else 4),
            "length_penalty": args.lenpen if args.lenpen is not None else (t.length_penalty if t else 0.6),
            "max_length": args.max_length or (t.max_decode_length if t else 256),
            "max_tokens": args.max_tokens, "progress": args.progress}


def _read(path: str) -> list[str]:
    from moetrain.data.sources import read_lines

    return sys.stdin.read().splitlines() if path == "-" else read_lines(path)


def _eval_pairs(args, cfg) -> tuple[list[str], list[str], str]:
    """``(sources, references, name)`` from ``--src/--ref`` or the checkpoint's config."""
    if (args.src is None) != (args.ref is None):
        raise ValueError("give both --src and --ref, or neither (then the config's test/valid set is used)")
    if args.src is not None:
        src, ref = _read(args.src), _read(args.ref)
        if len(src) != len(ref):
            raise ValueError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}")
        return src, ref, Path(args.src).name
    if cfg is None:
        raise ValueError("an HF directory has no data config: pass --src and --ref")
    from moetrain.data.sources import load_split

    for split in ("test", "valid"):
        pairs = load_split(cfg.data, split, cfg.train.seed)
        if pairs is not None:
            return list(pairs[0]), list(pairs[1]), split
    raise ValueError("the checkpoint's config names no test or validation data: pass --src and --ref")


def main_evaluate(args) -> int:
    """``moetrain evaluate``: translate a test set and print sacreBLEU (+ signature); write JSON."""
    translator, cfg = Translator.load(args.checkpoint, args.average_last, args.device)
    src, ref, name = _eval_pairs(args, cfg)
    hyps = translator.translate(src, **_decoding(args, cfg))
    lang = cfg.data.tgt_lang if cfg is not None else "de"
    metrics = bleu_report(hyps, ref, lang=lang, tokenized=args.tokenized_bleu)
    metrics.update({"checkpoint": str(args.checkpoint), "src": args.src or name, "ref": args.ref or name,
                    "sentences": len(src), "average_last": args.average_last, **_decoding(args, cfg)})
    print(metrics["bleu_text"].replace("BLEU", "sacreBLEU", 1))
    print(f"signature: {metrics['bleu_signature']}")
    if args.tokenized_bleu:
        print(f"tokenized BLEU (compound split) = {metrics['tokenized_bleu']:.2f}  "
              f"[{metrics['tokenized_bleu_signature']}]")
    if args.output:
        Path(args.output).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    json_path = Path(args.json) if args.json else (
        Path(args.output + ".json") if args.output else _checkpoint_dir(args.checkpoint) / f"eval-{name}.json")
    json_path.write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"metrics: {json_path}")
    return 0


def export_after_training(cfg, run_dir: Path) -> dict[str, Any]:
    """``export.after_train``: export the run's last checkpoint and check the stock HF model.

    The check reports the largest logit gap on a random batch and, from the task, how many
    validation sentences translate identically. Returns the figures it prints (also written
    to ``<hf dir>/moetrain_export_check.json``).
    """
    from moetrain.checkpoint_format import read_portable
    from moetrain.export import export_checkpoint, verify_export
    from moetrain.hf_convert import name_map

    ckpt = read_portable(run_dir)
    out = Path(cfg.export.out_dir) if cfg.export.out_dir else run_dir / "hf"
    export_checkpoint(ckpt, out)
    print(f"exported {ckpt.path} -> {out} ({len(name_map(ckpt.cfg.model, ckpt.cfg.moe))} tensors, "
          f"estimator {ckpt.cfg.moe.estimator})")
    report: dict[str, Any] = {"hf_dir": str(out), "estimator": ckpt.cfg.moe.estimator,
                              "max_logit_gap": verify_export(out, ckpt.weights, ckpt.cfg.model, ckpt.cfg.moe)}
    check = TranslationTask.check_export(ckpt, out)
    report.update(check.figures)
    (out / "moetrain_export_check.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"moetrain: HF export {out}: max |logit gap| {report['max_logit_gap']:.2g}{check.summary}")
    print(check.usage)
    return report


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def main_translate(args) -> int:
    """``moetrain translate``: translate a file line by line."""
    translator, cfg = Translator.load(args.checkpoint, args.average_last, args.device)
    hyps = translator.translate(_read(args.input), **_decoding(args, cfg))
    text = "".join(h + "\n" for h in hyps)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"translations: {args.output} ({len(hyps)} lines)", file=sys.stderr)
    return 0
