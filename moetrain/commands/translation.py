"""``moetrain evaluate`` and ``moetrain translate``: the translation task's commands.

    moetrain evaluate CHECKPOINT [--src FILE --ref FILE] [--tokenized-bleu] [--average-last N]
    moetrain translate CHECKPOINT|HF_DIR --input FILE --output FILE

``CHECKPOINT`` is a portable checkpoint (``.../step_X/portable``), a step directory or a run
directory (its latest checkpoint); ``HF_DIR`` is a ``moetrain export`` output. Both load the
model once through :meth:`moetrain.tasks.translation.Translator.load`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moetrain.utils.argtypes import at_least, float_at_least
from moetrain.utils.errors import UserError

__all__ = ["add_evaluate_arguments", "main_evaluate", "add_translate_arguments", "main_translate"]


def _add_decoding_arguments(parser) -> None:
    parser.add_argument("--beam", type=at_least(1), default=None, help="beam size (default: the checkpoint's train.beam_size, or 4)")
    parser.add_argument("--lenpen", type=float_at_least(0), default=None,
                        help="length penalty alpha (default: train.length_penalty, or 0.6)")
    parser.add_argument("--max-length", dest="max_length", type=at_least(1), default=None,
                        help="longest output in tokens (default: train.max_decode_length, or 256)")
    parser.add_argument("--max-tokens", dest="max_tokens", type=at_least(1), default=4096,
                        help="source-token budget of one translation batch (default: 4096); with the "
                             "beam it bounds the memory of one batch")
    parser.add_argument("--max-source-length", dest="max_source_length", type=at_least(2), default=None,
                        metavar="N",
                        help="longer source lines are truncated to N tokens, with one warning counting them "
                             "(default: the checkpoint's data.max_length, or 1024 for an HF directory)")
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
    parser.add_argument("--average-last", dest="average_last", type=at_least(0), default=0, metavar="N",
                        help="average the weights of the run's last N checkpoints first")
    _add_decoding_arguments(parser)


def add_translate_arguments(parser) -> None:
    """``moetrain translate CHECKPOINT|HF_DIR --input FILE --output FILE``."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="portable checkpoint, run directory or HF directory")
    parser.add_argument("--input", required=True, help="source sentences, one per line ('-' = stdin)")
    parser.add_argument("--output", required=True, help="where to write the translations ('-' = stdout)")
    parser.add_argument("--average-last", dest="average_last", type=at_least(0), default=0, metavar="N",
                        help="average the weights of the run's last N checkpoints first")
    _add_decoding_arguments(parser)


#: Source cap for an HF directory (no run config to take data.max_length from).
DEFAULT_MAX_SOURCE_LENGTH = 1024


def _decoding(args, cfg) -> dict[str, Any]:
    t = cfg.train if cfg is not None else None
    max_source = args.max_source_length or (cfg.data.max_length if cfg is not None else DEFAULT_MAX_SOURCE_LENGTH)
    if max_source > args.max_tokens:
        from moetrain.config import ConfigError

        flag = "--max-source-length" if args.max_source_length else "data.max_length of the checkpoint"
        raise ConfigError(f"--max-tokens: must be >= the longest source ({flag} = {max_source}), got {args.max_tokens}")
    return {"beam_size": args.beam if args.beam is not None else (t.beam_size if t else 4),
            "length_penalty": args.lenpen if args.lenpen is not None else (t.length_penalty if t else 0.6),
            "max_length": args.max_length if args.max_length is not None else (t.max_decode_length if t else 256),
            "max_tokens": args.max_tokens, "max_source_length": max_source, "progress": args.progress}


def _read(path: str) -> list[str]:
    from moetrain.data.sources import read_lines

    return sys.stdin.read().splitlines() if path == "-" else read_lines(path)


def _eval_pairs(args, cfg) -> tuple[list[str], list[str], str]:
    """``(sources, references, name)`` from ``--src/--ref`` or the checkpoint's config."""
    if args.src is not None:
        src, ref = _read(args.src), _read(args.ref)
        if len(src) != len(ref):
            raise UserError(f"--ref: {args.ref} has {len(ref)} lines but --src {args.src} has {len(src)}; "
                            "expected one reference per source line")
        return src, ref, Path(args.src).name
    if cfg is None:
        raise UserError(f"{args.checkpoint} is an HF directory, which has no data config: pass --src and --ref")
    from moetrain.data.sources import load_split

    from .common import _expand

    for split in ("test", "valid"):
        for side in ("src", "tgt"):
            spec = getattr(cfg.data, f"{split}_{side}") if cfg.data.source != "synthetic" else None
            for path in _expand(spec) if spec else []:
                if not Path(path).is_file():
                    raise UserError(f"data.{split}_{side} of the checkpoint's config: no such file: {path} "
                                    "(pass --src and --ref, or restore the file)")
        pairs = load_split(cfg.data, split, cfg.train.seed)
        if pairs is not None:
            return list(pairs[0]), list(pairs[1]), split
    raise UserError("the checkpoint's config names no test or validation data (data.test_src, "
                    "data.valid_src): pass --src and --ref")


def _check_args(args, *, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
    """File and device options, checked before the model is loaded (one line each)."""
    if "src" in inputs and (args.src is None) != (args.ref is None):
        raise UserError("give both --src and --ref, or neither (then the checkpoint's test/valid set is used)")
    for flag in inputs:
        value = getattr(args, flag)
        if value is None or value == "-":
            continue
        path = Path(value)
        if not path.exists():
            raise UserError(f"--{flag}: no such file: {value}")
        if not path.is_file():
            raise UserError(f"--{flag}: {value} is a directory; expected a text file, one sentence per line")
    for flag in outputs:
        value = getattr(args, flag)
        if value is None or value == "-":
            continue
        path = Path(value)
        if path.is_dir():
            raise UserError(f"--{flag}: {value} is a directory; expected a file name")
        if not path.parent.is_dir():
            raise UserError(f"--{flag}: directory {path.parent} does not exist")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device: unknown device '{args.device}'; expected cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is available (torch {torch.__version__}); "
                            "use --device cpu")


def main_evaluate(args) -> int:
    """``moetrain evaluate``: translate a test set and print sacreBLEU (+ signature); write JSON."""
    from moetrain.eval.bleu import bleu_report
    from moetrain.tasks.translation import Translator

    _check_args(args, inputs=("src", "ref"), outputs=("output", "json"))
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


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def main_translate(args) -> int:
    """``moetrain translate``: translate a file line by line."""
    from moetrain.tasks.translation import Translator

    _check_args(args, inputs=("input",), outputs=("output",))
    translator, cfg = Translator.load(args.checkpoint, args.average_last, args.device)
    hyps = translator.translate(_read(args.input), **_decoding(args, cfg))
    text = "".join(h + "\n" for h in hyps)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"translations: {args.output} ({len(hyps)} lines)", file=sys.stderr)
    return 0
