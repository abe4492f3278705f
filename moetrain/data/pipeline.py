"""From a ``DataConfig`` to tokenised, cleaned, cached splits and padded batches.

    data = prepare_translation_data(cfg.data, seed=cfg.train.seed, run_dir=out_dir)
    data.tokenizer                     # PreTrainedTokenizerFast (shared En/De vocabulary)
    data.train.collate(indices)        # dict of tensors, see TokenizedSplit.collate
    data.train.src_len                 # [N] token counts for the batcher

Steps, each cached so a second run (or another rank) reuses the first one's work:

1. **Tokenizer** (``data.tokenizer`` = null): trained on the cleaned training text of both
   languages. Cached under ``<cache>/tokenizers/<hash of the training data, vocab size>``
   and copied into ``<run dir>/tokenizer`` (checkpoints and the HF export ship that copy).
2. **Splits**: read (:mod:`moetrain.data.sources`), text-cleaned (empty lines; duplicates
   in train), tokenised with ``datasets.map`` (``num_workers`` processes), length-filtered
   (train only: ``max_length``, ``max_length_ratio``) and saved with ``save_to_disk`` under
   ``<cache>/tokenized/<key>``. The key hashes the raw data's fingerprint, the tokenizer
   file and the cleaning settings, so changing any of them rebuilds the split.

Token ids are read back as flat ``int32`` arrays straight from the memory-mapped Arrow
files (no Python lists per sentence), and each split's :class:`CleaningReport` is kept
next to it. Builds run under a file lock: when several ranks start together the first
builds, the others wait and load.

The cache root is ``data.cache_dir``, else ``$MOETRAIN_CACHE``, else ``~/.cache/moetrain``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moetrain.utils.atomic import publish_modes

from .sources import CleaningReport, clean_text_pairs, length_filter, load_split, source_fingerprint
from .tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

__all__ = ["PIPELINE_VERSION", "RaggedIds", "TokenizedSplit", "TranslationData", "cache_root",
           "prepare_translation_data", "prepare_split", "prepare_tokenizer", "collate_pairs"]

#: Bump when cleaning or tokenisation changes, so old caches are not reused.
PIPELINE_VERSION = 1

IGNORE_INDEX = -100  # label value of padding (skipped by the loss)


def cache_root(data_cfg) -> Path:
    """Where tokenizers and tokenised splits are cached."""
    root = data_cfg.cache_dir or os.environ.get("MOETRAIN_CACHE") or Path.home() / ".cache" / "moetrain"
    return Path(root)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class _Lock:
    """``filelock.FileLock`` on ``path.lock`` (filelock ships with ``datasets``)."""

    def __init__(self, path: Path):
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(path) + ".lock")

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


# ---------------------------------------------------------------------------
# Token storage and batches
# ---------------------------------------------------------------------------


@dataclass
class RaggedIds:
    """Variable-length id sequences as one flat array: sequence ``i`` is
    ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray   # [total] int32
    offsets: np.ndarray  # [N + 1] int64

    @classmethod
    def from_arrow(cls, column) -> "RaggedIds":
        """From a pyarrow ``list<int32>`` (chunked) column, without per-row Python objects."""
        import pyarrow as pa

        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if isinstance(array, pa.ChunkedArray):  # zero chunks
            array = pa.array([], type=column.type)
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.values.to_numpy(zero_copy_only=False)
        return cls(values[offsets[0]:offsets[-1]], offsets - offsets[0])

    @classmethod
    def from_lists(cls, seqs: list[list[int]]) -> "RaggedIds":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def padded(self, indices: np.ndarray, pad: int, start: int | None = None) -> np.ndarray:
        """``[len(indices), L]`` int64 rows, padded with ``pad``; with ``start``, each row is
        ``start`` followed by the sequence without its last token (teacher forcing)."""
        lengths = self.lengths[indices]
        width = max(int(lengths.max()) if len(indices) else 0, 1)
        out = np.full((len(indices), width), pad, dtype=np.int64)
        for row, (i, n) in enumerate(zip(indices.tolist(), lengths.tolist())):
            seq = self.values[self.offsets[i]:self.offsets[i] + n]
            if start is None:
                out[row, :n] = seq
            else:
                out[row, 0] = start
                out[row, 1:n] = seq[:-1]
        return out


def collate_pairs(src: RaggedIds, tgt: RaggedIds, indices: np.ndarray, sample_ids: np.ndarray,
                  pad_id: int = 0, decoder_start_id: int = 0) -> dict[str, torch.Tensor]:
    """One padded batch (tensors ``[B, S]`` / ``[B, T]``; B may be 0 for an empty batch).

    Returns:
        ``input_ids``, ``attention_mask`` (1 = token), ``decoder_input_ids`` (start token,
        then the target shifted right), ``decoder_attention_mask``, ``labels`` (the target,
        ``-100`` at padding) and ``sample_ids`` (``[B]`` global ids for the routing noise).
    """
    indices = np.asarray(indices, dtype=np.int64)
    input_ids = torch.from_numpy(src.padded(indices, pad_id))
    labels = torch.from_numpy(tgt.padded(indices, IGNORE_INDEX))
    decoder_input_ids = torch.from_numpy(tgt.padded(indices, pad_id, start=decoder_start_id))
    src_len = torch.from_numpy(src.lengths[indices])
    tgt_len = torch.from_numpy(tgt.lengths[indices])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < src_len[:, None]).long()
    decoder_attention_mask = (torch.arange(labels.shape[1])[None, :] < tgt_len[:, None]).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
        "labels": labels,
        "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
    }


@dataclass
class TokenizedSplit:
    """One cleaned, tokenised split.

    Attributes:
        name: ``train`` / ``valid`` / ``test``.
        src / tgt: token ids (EOS appended) of each pair.
        src_text / tgt_text: the cleaned text (a memory-mapped Arrow column; index it or
            call ``list()``); references for BLEU.
        report: what cleaning dropped.
        id_offset: added to positions to form global sample ids (keeps splits apart).
    """

    name: str
    src: RaggedIds
    tgt: RaggedIds
    src_text: object
    tgt_text: object
    report: CleaningReport
    id_offset: int = 0

    def __len__(self) -> int:
        return len(self.src)

    @property
    def src_len(self) -> np.ndarray:
        return self.src.lengths

    @property
    def tgt_len(self) -> np.ndarray:
        return self.tgt.lengths

    def collate(self, indices, pad_id: int = 0, decoder_start_id: int = 0) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        return collate_pairs(self.src, self.tgt, indices, indices + self.id_offset, pad_id, decoder_start_id)


@dataclass
class TranslationData:
    """The tokenizer and the prepared splits of one run (``valid``/``test`` may be None)."""

    tokenizer: object
    tokenizer_dir: Path
    train: TokenizedSplit | None
    valid: TokenizedSplit | None
    test: TokenizedSplit | None

    def reports(self) -> list[CleaningReport]:
        return [s.report for s in (self.train, self.valid, self.test) if s is not None]


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def prepare_tokenizer(data_cfg, seed: int, run_dir: str | os.PathLike | None,
                      log: Callable[[str], None] = print) -> tuple[object, Path]:
    """The run's tokenizer: ``data.tokenizer`` when set, else trained (and cached).

    Returns:
        ``(tokenizer, directory)``; a trained one is copied to ``<run_dir>/tokenizer``.
    """
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer), Path(data_cfg.tokenizer)
    key = _hash("tokenizer", PIPELINE_VERSION, source_fingerprint(data_cfg, "train", seed), data_cfg.vocab_size)
    cached = cache_root(data_cfg) / "tokenizers" / key
    with _Lock(cached):
        if not (cached / "tokenizer.json").is_file():
            raw = load_split(data_cfg, "train", seed)
            if raw is None:
                raise ValueError("no training data to train a tokenizer on; set data.tokenizer or the training files")
            src, tgt, _ = clean_text_pairs(*raw, split="train", dedup=False)
            log(f"data: training a {data_cfg.vocab_size}-token BPE vocabulary on {len(src):,} sentence pairs")
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
            train_tokenizer(_interleave(src, tgt), data_cfg.vocab_size, tmp)
            _replace_dir(tmp, cached)
    out = cached
    if run_dir is not None:
        out = Path(run_dir) / "tokenizer"
        with _Lock(cached):
            if not (out / "tokenizer.json").is_file() or tokenizer_fingerprint(out) != tokenizer_fingerprint(cached):
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=out.parent))
                shutil.copytree(cached, tmp, dirs_exist_ok=True)
                _replace_dir(tmp, out)
    return load_tokenizer(out), out


def _interleave(src: list[str], tgt: list[str]):
    for s, t in zip(src, tgt):
        yield s
        yield t


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary directory into place (replacing an older one)."""
    publish_modes(tmp)  # mkdtemp makes 0700
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _encode(batch, tokenizer):
    return {"src_ids": tokenizer(batch["src"], add_special_tokens=True)["input_ids"],
            "tgt_ids": tokenizer(batch["tgt"], add_special_tokens=True)["input_ids"]}


def prepare_split(data_cfg, split: str, tokenizer, tokenizer_dir: Path, seed: int = 1,
                  log: Callable[[str], None] = print) -> TokenizedSplit | None:
    """Load one split from the cache, building it first if needed; None if the config has none."""
    import datasets

    is_train = split == "train"
    filters = (data_cfg.max_length, data_cfg.max_length_ratio) if is_train else None
    key = _hash("split", PIPELINE_VERSION, source_fingerprint(data_cfg, split, seed), split,
                tokenizer_fingerprint(tokenizer_dir), filters)
    path = cache_root(data_cfg) / "tokenized" / key
    with _Lock(path):
        if not (path / "report.json").is_file():
            raw = load_split(data_cfg, split, seed)
            if raw is None:
                return None
            src, tgt, report = clean_text_pairs(*raw, split=split, dedup=is_train)
            with _quiet_datasets(len(src) < 100_000):  # progress bars only where they help
                _tokenize_and_save(data_cfg, split, src, tgt, report, tokenizer, key, path)
            log(f"data: {report.summary()} -> {path}")
    ds = datasets.load_from_disk(str(path))
    report = CleaningReport(**json.loads((path / "report.json").read_text()))
    table = ds.data
    src_text, tgt_text = table.column("src"), table.column("tgt")
    if split != "train":  # small: plain lists of references
        src_text, tgt_text = src_text.to_pylist(), tgt_text.to_pylist()
    return TokenizedSplit(split, RaggedIds.from_arrow(table.column("src_ids")),
                          RaggedIds.from_arrow(table.column("tgt_ids")), src_text, tgt_text, report)


class _quiet_datasets:
    """Hide ``datasets``' progress bars inside the block when ``quiet`` (restored after)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        import datasets

        self.was_disabled = datasets.is_progress_bar_enabled() is False
        if self.quiet:
            datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        if self.quiet and not self.was_disabled:
            datasets.enable_progress_bars()


def _tokenize_and_save(data_cfg, split: str, src: list[str], tgt: list[str], report: CleaningReport,
                       tokenizer, key: str, path: Path) -> None:
    """Tokenise the cleaned text, length-filter (train only), save under ``path`` atomically."""
    import datasets

    ds = datasets.Dataset.from_dict({"src": src, "tgt": tgt})
    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string"),
                                  "src_ids": datasets.List(datasets.Value("int32")),
                                  "tgt_ids": datasets.List(datasets.Value("int32"))})
    # Worker processes pay off only on real corpora (each one re-imports the tokenizer).
    workers = data_cfg.num_workers if data_cfg.num_workers > 1 and len(ds) >= 10_000 else None
    ds = ds.map(_encode, batched=True, batch_size=1000, num_proc=workers, features=features,
                fn_kwargs={"tokenizer": tokenizer}, desc=f"tokenize {split}", new_fingerprint=_hash(key, "map"))
    if split == "train":
        lengths = (RaggedIds.from_arrow(ds.data.column("src_ids")).lengths,
                   RaggedIds.from_arrow(ds.data.column("tgt_ids")).lengths)
        keep = length_filter(*lengths, data_cfg.max_length, data_cfg.max_length_ratio, report)
        if keep.size < len(ds):
            ds = ds.select(keep).flatten_indices()
    if len(ds) == 0:
        raise ValueError(f"{split}: no sentence pair left after cleaning ({report.summary()})")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    ds.save_to_disk(str(tmp))
    (tmp / "report.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    _replace_dir(tmp, path)


def prepare_translation_data(data_cfg, seed: int = 1, run_dir: str | os.PathLike | None = None,
                             splits: tuple[str, ...] = ("train", "valid"),
                             log: Callable[[str], None] | None = None) -> TranslationData:
    """Tokenizer plus the requested splits, built or loaded from the cache.

    Args:
        data_cfg: ``DataConfig``.
        seed: ``train.seed`` (the synthetic language depends on it).
        run_dir: receives ``tokenizer/`` (a copy of the cached one) and ``data_report.json``.
        splits: which of ``train``/``valid``/``test`` to prepare.
        log: where progress lines go (default: stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tokenizer, tokenizer_dir = prepare_tokenizer(data_cfg, seed, run_dir, log)
    prepared = {name: None for name in ("train", "valid", "test")}
    offset = 0
    for name in splits:
        part = prepare_split(data_cfg, name, tokenizer, tokenizer_dir, seed, log)
        if part is not None:
            part.id_offset = offset  # distinct global sample ids across splits
            offset += len(part)
        prepared[name] = part
    data = TranslationData(tokenizer, tokenizer_dir, **prepared)
    if run_dir is not None:
        report = {r.split: r.as_dict() for r in data.reports()}
        _write_json(Path(run_dir) / "data_report.json", report)
    return data


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
