"""GLUE fine-tuning of a (pretrained) Switch encoder (the work of ``moetrain finetune CONFIG``).

    moetrain finetune configs/glue_rte.yaml --set glue.pretrained=runs/electra-tiny
    moetrain finetune configs/glue_rte.yaml --set glue.pretrained=runs/electra-tiny glue.random_init=true

For each of ``glue.num_seeds`` seeds: load the encoder (an ELECTRA discriminator, or any
checkpoint holding one ``<prefix>embed.weight`` + ``<prefix>encoder.*``), put a
classification head on it (:class:`~moetrain.models.electra.SequenceClassifier`), train with
``glue.optimizer`` (AdamW or Adafactor, linear warmup and decay) for ``glue.epochs``, and score the dev set after every epoch
with the task's official metric. The report (``<run dir>/glue_results.json`` and a table on
stdout) gives every seed's final dev scores and their mean, standard deviation, min and max,
next to the majority-class baseline.

Fine-tuning is a plain single-process loop (one device; MoE layers run locally, no
DeepSpeed): GLUE sets are small and the comparison needs many short runs. The loss is
``cross-entropy + moe.balance_coef * sum(balance) + moe.z_coef * sum(z)`` with the
checkpoint's MoE settings.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moetrain.data.glue import GlueTaskSpec, load_glue
from moetrain.data.text import TextDataError, check_tokenizer, train_text_tokenizer
from moetrain.eval.glue_metrics import MAIN_METRIC, glue_metrics, summarize
from moetrain.models.electra import SequenceClassifier
from moetrain.models.export_layout import split_encoder
from moetrain.models.moe_stats import moe_aux_loss
from moetrain.models.switch import SwitchEncoderModel
from moetrain.moe import set_routing_step
from moetrain.train.optim import param_groups

__all__ = ["StartPoint", "load_start_point", "encode_examples", "finetune", "finetune_seed"]


@dataclass
class StartPoint:
    """What fine-tuning starts from.

    Attributes:
        model_cfg / moe_cfg: the encoder's architecture.
        tokenizer / tokenizer_dir: its vocabulary.
        encoder_state: encoder weights (``embed.weight``, ``encoder.*``), or None (random init).
        description: for the report.
    """

    model_cfg: Any
    moe_cfg: Any
    tokenizer: Any
    tokenizer_dir: Path
    encoder_state: dict[str, torch.Tensor] | None
    description: str


def _load_tokenizer(path: Path):
    from moetrain.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise TextDataError(f"{path}: cannot load the tokenizer ({err}); expected a tokenizer directory") from None


def load_start_point(cfg, out_dir: Path, train_texts=None) -> StartPoint:
    """Architecture, tokenizer and (unless random) weights per ``glue.pretrained``/``random_init``.

    Without a checkpoint the config's own ``model``/``moe`` sections are used, with
    ``data.tokenizer`` or a vocabulary trained on ``train_texts`` (batches of strings).

    Raises:
        CheckpointNotFound: no portable checkpoint at ``glue.pretrained``.
        TextDataError: a tokenizer that does not match the checkpoint, or is missing.
    """
    from moetrain.checkpoint_format import TOKENIZER, read_portable
    from moetrain.tasks.electra import tokenizers_match

    g, data = cfg.glue, cfg.data
    given = Path(data.tokenizer) if data.tokenizer is not None else None
    if g.pretrained is None:
        if given is not None:
            tokenizer, tok_dir = _load_tokenizer(given), given
        else:
            tok_dir = out_dir / "tokenizer"
            tokenizer = train_text_tokenizer(train_texts, data.vocab_size, tok_dir, cfg.electra.tokenizer_kind,
                                             cfg.electra.lowercase)
        check_tokenizer(tokenizer, tok_dir, cfg.model.vocab_size, cfg.model.pad_token_id)
        return StartPoint(cfg.model, cfg.moe, tokenizer, tok_dir, None, "random init (no checkpoint)")

    ckpt = read_portable(g.pretrained)
    portable, state, saved = ckpt.path, ckpt.weights, ckpt.cfg
    saved_tok = portable / TOKENIZER
    if given is not None:
        tokenizer, tok_dir = _load_tokenizer(given), given
        if saved_tok.is_dir() and not tokenizers_match(tokenizer, _load_tokenizer(saved_tok)):
            raise TextDataError(f"{given}: vocabulary does not match the checkpoint's tokenizer {saved_tok}; "
                                "expected the tokenizer the encoder was pretrained with (leave data.tokenizer null "
                                "to use it)")
    elif saved_tok.is_dir():
        tokenizer, tok_dir = _load_tokenizer(saved_tok), saved_tok
    else:
        raise TextDataError(f"{portable}: the checkpoint has no tokenizer/ directory; expected one, or set "
                            "data.tokenizer to the vocabulary it was trained with")
    check_tokenizer(tokenizer, tok_dir, saved.model.vocab_size, saved.model.pad_token_id)
    body, _, prefix = split_encoder(state)
    what = "random init with the architecture and tokenizer of" if g.random_init else "pretrained"
    return StartPoint(saved.model, saved.moe, tokenizer, tok_dir, None if g.random_init else body,
                      f"{what} {portable} (encoder prefix '{prefix}')")


def encode_examples(ds, tokenizer, spec: GlueTaskSpec, max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids (``[CLS] a [SEP] (b [SEP])``, truncated longest-first) and labels."""
    second = list(ds["text_b"]) if spec.is_pair else None
    enc = tokenizer(list(ds["text_a"]), second, truncation=True, max_length=max_length)
    return enc["input_ids"], np.asarray(ds["label"], dtype=np.int64)


def _pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s)
    return ids.to(device), (ids != pad_id).long().to(device)


@torch.no_grad()
def _predict(model, seqs: list[list[int]], batch_size: int, pad_id: int, device) -> np.ndarray:
    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths pad less
    preds = np.zeros(len(seqs), dtype=np.int64)
    for start in range(0, len(seqs), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = _pad([seqs[i] for i in rows], pad_id, device)
        logits, _ = model(ids, mask, torch.as_tensor(rows, device=device))
        preds[rows] = logits.argmax(-1).cpu().numpy()
    return preds


def _optimizer(model, g, total: int, warmup: int):
    """``glue.optimizer`` over the trainer's parameter groups (weight decay, ``lr_scale``), with
    linear warmup then linear decay to 0."""
    groups = param_groups(model, g.weight_decay, g.lr, g.lr_scale)
    if g.optimizer == "adafactor":
        opt = torch.optim.Adafactor(groups, lr=g.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=g.lr, betas=(0.9, 0.999), eps=1e-6)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(total - warmup, 1))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def finetune_seed(start: StartPoint, spec: GlueTaskSpec, train, dev, g, seed: int, device,
                  log=print) -> tuple[dict[str, Any], SequenceClassifier]:
    """Fine-tune one seed; returns ``(record, model)`` with dev metrics after every epoch.

    Args:
        train / dev: ``(token id lists, labels)`` from :func:`encode_examples`.
        g: the ``GlueConfig``.
    """
    torch.manual_seed(seed)
    backbone = SwitchEncoderModel(start.model_cfg, start.moe_cfg, noise_seed=seed, init_seed=seed)
    if start.encoder_state is not None:
        backbone.load_state_dict(start.encoder_state)
    model = SequenceClassifier(backbone, spec.num_labels, g.pooling, g.classifier_dropout).to(device)
    seqs, labels = train
    pad_id, moe = start.tokenizer.pad_token_id, start.moe_cfg
    per_epoch = math.ceil(len(seqs) / g.batch_size)
    total = max(1, round(g.epochs * per_epoch))
    opt, sched = _optimizer(model, g, total, int(g.warmup_fraction * total))
    record: dict[str, Any] = {"seed": seed, "steps": total, "epochs": []}
    step, t0, losses = 0, time.perf_counter(), []
    for epoch in range(math.ceil(total / per_epoch)):
        order = np.random.default_rng([seed, epoch]).permutation(len(seqs))
        model.train()
        for start_row in range(0, len(seqs), g.batch_size):
            if step == total:
                break
            rows = order[start_row:start_row + g.batch_size]
            ids, mask = _pad([seqs[i] for i in rows], pad_id, device)
            set_routing_step(model, step)
            logits, stats = model(ids, mask, torch.as_tensor(rows + epoch * len(seqs), device=device))
            ce = F.cross_entropy(logits, torch.as_tensor(labels[rows], device=device))
            aux, _ = moe_aux_loss(stats, moe.balance_loss_weight, moe.z_coef)
            loss = ce + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if g.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), g.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(ce.detach()))
            step += 1
        preds = _predict(model, dev[0], g.eval_batch_size, pad_id, device)
        metrics = glue_metrics(spec.name, preds.tolist(), dev[1].tolist())
        entry = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)), **metrics,
                 "seconds": time.perf_counter() - t0}
        record["epochs"].append(entry)
        losses = []
        log(f"  seed {seed} epoch {epoch + 1}: train loss {entry['train_loss']:.4f}, dev "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({entry['seconds']:.0f}s)")
    record["final"] = {k: record["epochs"][-1][k] for k in metrics}
    return record, model


def finetune(cfg, out_dir: str | os.PathLike, log=print) -> dict[str, Any]:
    """Fine-tune ``glue.num_seeds`` seeds and write ``<out_dir>/glue_results.json``.

    Returns:
        The report: task, start point, majority baseline, per-seed records, summary
        (mean/std/min/max per metric), main metric name.
    """
    g, out_dir = cfg.glue, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec, train_ds, dev_ds = load_glue(g.task, g.source, hub_name=g.hub_name, train_file=g.train_file,
                                       dev_file=g.dev_file, cache_dir=cfg.data.cache_dir)
    if g.max_train_examples is not None:
        train_ds = train_ds.select(range(min(g.max_train_examples, len(train_ds))))
    if g.max_dev_examples is not None:
        dev_ds = dev_ds.select(range(min(g.max_dev_examples, len(dev_ds))))
    texts = [list(train_ds["text_a"]) + (list(train_ds["text_b"]) if spec.is_pair else [])]
    start = load_start_point(cfg, out_dir, iter(texts))
    train = encode_examples(train_ds, start.tokenizer, spec, g.max_length)
    dev = encode_examples(dev_ds, start.tokenizer, spec, g.max_length)
    majority = int(np.bincount(train[1], minlength=spec.num_labels).argmax())
    baseline = glue_metrics(spec.name, [majority] * len(dev[1]), dev[1].tolist())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"finetune {spec.name}: {len(train[1])} train / {len(dev[1])} dev examples; {start.description}; "
        f"majority class {spec.label_names[majority]} scores {MAIN_METRIC[spec.name]} "
        f"{baseline[MAIN_METRIC[spec.name]]:.4f}")
    runs = []
    for i in range(g.num_seeds):
        record, model = finetune_seed(start, spec, train, dev, g, g.seed + i, device, log)
        runs.append(record)
        if i == 0 and g.export_hf:
            _export(model, start, out_dir / "hf", log)
        del model
    report = {"task": spec.name, "main_metric": MAIN_METRIC[spec.name], "start": start.description,
              "train_examples": len(train[1]), "dev_examples": len(dev[1]), "majority_baseline": baseline,
              "runs": runs, "summary": summarize([r["final"] for r in runs])}
    (out_dir / "glue_results.json").write_text(json.dumps(report, indent=1) + "\n")
    log(format_summary(report))
    return report


def _export(model: SequenceClassifier, start: StartPoint, hf_dir: Path, log) -> None:
    from moetrain.export import export_to_hf

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    export_to_hf(state, start.model_cfg, start.moe_cfg, hf_dir, start.tokenizer_dir,
                 prefix=SequenceClassifier.export_layout.prefix, overwrite=True)  # the run's own hf/
    log(f"exported seed model to {hf_dir} (SwitchTransformersEncoderModel + moetrain_heads.safetensors)")


def format_summary(report: dict[str, Any]) -> str:
    """A small text table: one line per metric, mean ± std [min, max] over seeds."""
    lines = [f"{report['task']} dev, {len(report['runs'])} seed(s) — {report['start']}"]
    for key, s in report["summary"].items():
        base = report["majority_baseline"].get(key)
        lines.append(f"  {key:12s} {s['mean']:.4f} ± {s['std']:.4f}  [{s['min']:.4f}, {s['max']:.4f}]"
                     + (f"   majority baseline {base:.4f}" if base is not None else ""))
    return "\n".join(lines)
