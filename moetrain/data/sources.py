"""Raw parallel text: read it from the Hub or local files, then clean it with counts.

Every source returns the same thing, two aligned lists of strings (source side, target side):

    =========  ==================================================================================
    hub        ``datasets.load_dataset(hub_name, hub_config)``, rows ``{"translation": {"de",
               "en"}}`` (the WMT'14 schema). ``train_src``/``valid_src``/``test_src``, when set,
               are passed as ``data_files`` of that split, so a builder name (``parquet``,
               ``json``) with local files of the same schema goes through the same code.
    files      two aligned plain-text files per split, one sentence per line.
    tsv        one file per split, ``source<TAB>target`` per line.
    jsonl      one file per split, one object per line: ``{"translation": {src, tgt}}`` or
               ``{src_lang: ..., tgt_lang: ...}``.
    synthetic  :mod:`moetrain.data.synthetic` (the demo's generated language pair).
    =========  ==================================================================================

Bad input fails early with a :class:`DataError` naming the file and line: files of a pair
with different line counts, bytes that are not UTF-8, a TSV line without a tab, a JSONL line
that is not an object with both languages.

Cleaning (:func:`clean_text_pairs`, then :func:`length_filter` on token counts) drops empty
lines, duplicate pairs, over-long pairs and pairs whose length ratio is implausible, and
counts each in a :class:`CleaningReport`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moetrain.utils.errors import UserError
from moetrain.utils.file_lists import expand_file_list

from . import synthetic

__all__ = ["DataError", "CleaningReport", "SPLITS", "HUB_SPLITS", "read_lines", "read_parallel_files", "read_parallel_file_lists", "expand_paths",
           "read_tsv", "read_jsonl", "load_hub_split", "load_split", "clean_text_pairs", "length_filter",
           "source_fingerprint", "split_paths"]

#: Our split names; the Hub's WMT datasets call them train / validation / test.
SPLITS = ("train", "valid", "test")
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


class DataError(UserError, ValueError):
    """The input data is malformed; the message names the file and (1-based) line."""


@dataclass
class CleaningReport:
    """What cleaning did to one split. ``kept = read - empty - duplicate - too_long - bad_ratio``."""

    split: str
    read: int = 0
    empty: int = 0
    duplicate: int = 0
    too_long: int = 0
    bad_ratio: int = 0
    kept: int = 0

    def summary(self) -> str:
        return (f"{self.split}: read {self.read:,} pairs, kept {self.kept:,} (dropped: {self.empty:,} empty, "
                f"{self.duplicate:,} duplicate, {self.too_long:,} too long, {self.bad_ratio:,} length ratio)")

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a UTF-8 text file without their line endings (``\\n`` or ``\\r\\n``).

    Only ``\\n`` ends a line: ``str.splitlines`` would also split at U+2028, form feeds and
    other separators that occur inside real sentences and would misalign a parallel corpus.

    Raises:
        DataError: the bytes are not UTF-8 (the message names the line and byte column).
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                        "convert the file to UTF-8 or remove the line") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # byte-order mark
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def expand_paths(spec: str) -> list[str]:
    """``a.en,b.en`` or ``dir/*.en`` (or both, comma-separated) as a list of files, each glob sorted.

    Raises:
        DataError: a glob pattern that matches no file.
    """
    paths: list[str] = []
    for part, found in expand_file_list(spec):
        if not found:  # only a glob can name nothing
            raise DataError(f"{part}: no file matches this pattern")
        paths += found
    return paths


def read_parallel_file_lists(src_spec: str, tgt_spec: str) -> tuple[list[str], list[str]]:
    """Aligned file pairs given as comma lists or globs (``news*.en`` with ``news*.de``), in order.

    The n-th source file pairs with the n-th target file, and their names without the language
    suffix must agree (``newstest2012.en`` with ``newstest2012.de``), so a missing file cannot
    shift every later pair.
    """
    srcs, tgts = expand_paths(src_spec), expand_paths(tgt_spec)
    if len(srcs) != len(tgts):
        raise DataError(f"{src_spec} names {len(srcs)} file(s) but {tgt_spec} names {len(tgts)}; "
                        f"each source file needs its target file")
    src, tgt = [], []
    for a, b in zip(srcs, tgts):
        if len(srcs) > 1 and Path(a).with_suffix("").name != Path(b).with_suffix("").name:
            raise DataError(f"{a} is paired with {b}: names differ before the language suffix "
                            f"(list the files in the same order)")
        more_src, more_tgt = read_parallel_files(a, b)
        src += more_src
        tgt += more_tgt
    return src, tgt


def read_parallel_files(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Two aligned plain-text files, one sentence per line.

    Raises:
        DataError: a file is not UTF-8, or the files have different line counts (the message
            names the first line that has no counterpart).
    """
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        longer, shorter = (src_path, tgt_path) if len(src) > len(tgt) else (tgt_path, src_path)
        n = min(len(src), len(tgt))
        raise DataError(f"{longer}:{n + 1}: misaligned parallel files: {src_path} has {len(src):,} lines but "
                        f"{tgt_path} has {len(tgt):,}; line {n + 1} of {longer} has no counterpart in {shorter}")
    return src, tgt


def read_tsv(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``source<TAB>target`` per line (further columns are ignored).

    Raises:
        DataError: a non-empty line without a tab, or bytes that are not UTF-8.
    """
    src, tgt = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            src.append("")
            tgt.append("")
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{path}:{number}: expected 'source<TAB>target', found no tab in {line[:60]!r}")
        src.append(fields[0])
        tgt.append(fields[1])
    return src, tgt


def read_jsonl(path: str | os.PathLike, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """One JSON object per line: ``{"translation": {src_lang: .., tgt_lang: ..}}`` or flat.

    Raises:
        DataError: invalid JSON, a missing language key, or bytes that are not UTF-8.
    """
    src, tgt = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
        pair = row.get("translation", row) if isinstance(row, dict) else None
        if not isinstance(pair, dict) or not isinstance(pair.get(src_lang), str) or not isinstance(pair.get(tgt_lang), str):
            raise DataError(f"{path}:{number}: expected an object with string fields '{src_lang}' and "
                            f"'{tgt_lang}' (optionally under 'translation'), got {line[:80]!r}")
        src.append(pair[src_lang])
        tgt.append(pair[tgt_lang])
    return src, tgt


# ---------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------


def load_hub_split(name: str, config: str | None, split: str, src_lang: str, tgt_lang: str, *,
                   data_files: str | list[str] | None = None, cache_dir: str | None = None):
    """One split of a Hub translation dataset as a ``datasets.Dataset`` with ``src``/``tgt``.

    This is the only place that calls ``datasets.load_dataset``. With ``data_files`` it
    reads local files of the Hub schema, e.g. ``load_hub_split("parquet", None, "train",
    "en", "de", data_files="wmt14-train.parquet")``; tests use exactly that.

    Args:
        name: dataset name (``wmt14``) or a ``datasets`` builder (``parquet``, ``json``).
        config: its configuration (``de-en``), or None.
        split: ``train``, ``valid`` or ``test`` (mapped to the Hub's ``validation``).
        src_lang / tgt_lang: keys inside the ``translation`` column.
        data_files: local files for this split (only then is ``split`` ignored by the builder).
        cache_dir: ``datasets`` cache directory (None = its default).
    """
    import datasets

    try:
        if data_files is not None:
            ds = datasets.load_dataset(name, config, data_files={"data": data_files}, split="data",
                                       cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(name, config, split=HUB_SPLITS[split], cache_dir=cache_dir)
    except (ConnectionError, OSError) as err:
        if data_files is not None:
            raise
        raise hub_unreachable(err, "data.hub_name", name, config,
                              "data.source: files with data.train_src/train_tgt (and valid/test)") from err
    if "translation" not in ds.column_names:
        raise DataError(f"{name}{'/' + config if config else ''} ({split}): expected a 'translation' column "
                        f"with '{src_lang}'/'{tgt_lang}' keys, found columns {ds.column_names}")

    def pick(batch):
        rows = batch["translation"]
        try:
            return {"src": [r[src_lang] for r in rows], "tgt": [r[tgt_lang] for r in rows]}
        except (KeyError, TypeError):
            raise DataError(f"{name} ({split}): a 'translation' entry lacks '{src_lang}' or '{tgt_lang}': "
                            f"{rows[0]!r:.120}") from None

    return ds.map(pick, batched=True, batch_size=10_000, remove_columns=ds.column_names, desc="select languages")


# ---------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------


def split_paths(data_cfg, split: str) -> tuple[str | None, str | None]:
    """``(src, tgt)`` paths the config gives for a split (``train``/``valid``/``test``)."""
    return getattr(data_cfg, f"{split}_src"), getattr(data_cfg, f"{split}_tgt")


def load_split(data_cfg, split: str, seed: int = 1) -> tuple[list[str], list[str]] | None:
    """The raw pairs of one split as ``(sources, targets)``; None if the config has none.

    Args:
        data_cfg: ``DataConfig`` (``source`` picks the reader).
        split: ``train``, ``valid`` or ``test``.
        seed: seeds the synthetic language (``train.seed``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; expected one of {SPLITS}")
    src_path, tgt_path = split_paths(data_cfg, split)
    source = data_cfg.source
    if source == "synthetic":
        return _synthetic_split(data_cfg, split, seed)
    if source == "hub":
        if src_path is None and split != "train" and data_cfg.hub_name in ("parquet", "json", "csv", "arrow"):
            return None
        ds = load_hub_split(data_cfg.hub_name, data_cfg.hub_config, split, data_cfg.src_lang, data_cfg.tgt_lang,
                            data_files=src_path, cache_dir=data_cfg.cache_dir)
        return ds["src"], ds["tgt"]
    if src_path is None:
        return None
    if source == "files":
        if tgt_path is None:
            raise DataError(f"data.{split}_tgt is required with data.source 'files' (data.{split}_src={src_path})")
        return read_parallel_file_lists(src_path, tgt_path)
    if source == "tsv":
        return read_tsv(src_path)
    if source == "jsonl":
        return read_jsonl(src_path, data_cfg.src_lang, data_cfg.tgt_lang)
    raise ValueError(f"unknown data.source '{source}'")


def local_data_roots() -> list[Path]:
    """Where local copies of public data sets are looked for: ``../shared/data`` of the working
    directory and of the repository (the shipped recipes point there)."""
    roots = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"]
    seen, out = set(), []
    for root in roots:
        if root.is_dir() and root.resolve() not in seen:
            seen.add(root.resolve())
            out.append(root)
    return out


def hub_unreachable(err: BaseException, key: str, name: str, config: str | None, use: str) -> DataError:
    """A one-line error for a Hub dataset that could not be loaded (offline, unknown name), naming
    local directories under ``../shared/data`` that hold the same data, if any."""
    stem = name.rsplit("/", 1)[-1].lower().rstrip("0123456789") or name.lower()
    words = {w for w in (stem, (config or "").lower()) if len(w) >= 3}
    dirs = [d for root in local_data_roots() for d in sorted(root.iterdir()) if d.is_dir()]
    exact = [d for d in dirs if config and len(config) >= 3 and config.lower() in d.name.lower()]
    local = exact or [d for d in dirs if any(w in d.name.lower() for w in words)]
    if local:
        def show(d: Path) -> str:
            rel = os.path.relpath(d)
            return rel if rel.startswith("../shared/") or not rel.startswith("..") else str(d.resolve())

        shown = ", ".join(show(d) for d in local)
        hint = f"; local files of this data exist in {shown}: use {use}"
    else:
        hint = "; check the name, or the network (HF_HUB_OFFLINE=1 uses the local cache only)"
    reason = " ".join(str(err).split())[:200]
    label = f"{name}" + (f" ({config})" if config else "")
    return DataError(f"{key}: cannot load the Hub dataset {label}: {type(err).__name__}: {reason}{hint}")


def _synthetic_split(data_cfg, split: str, seed: int) -> tuple[list[str], list[str]]:
    train_src, train_tgt, _ = synthetic.generate_pairs(seed, data_cfg.synthetic_num_train, "train")
    if split == "train":
        return train_src, train_tgt
    # Held out: no evaluation source sentence occurs in training.
    src, tgt, _ = synthetic.generate_pairs(seed, data_cfg.synthetic_num_valid, split, exclude=set(train_src))
    return src, tgt


def source_fingerprint(data_cfg, split: str, seed: int = 1) -> str:
    """A short hash that changes when the raw data of a split changes (keys the caches).

    Local files: path, size and modification time. Hub: name, config and (for local data
    files) their stats. Synthetic: generator version, seed and sizes.
    """
    src_path, tgt_path = split_paths(data_cfg, split)
    parts: list = [data_cfg.source, split, data_cfg.src_lang, data_cfg.tgt_lang]
    if data_cfg.source == "synthetic":
        parts += [synthetic.VERSION, seed, data_cfg.synthetic_num_train, data_cfg.synthetic_num_valid]
    else:
        if data_cfg.source == "hub":
            parts += [data_cfg.hub_name, data_cfg.hub_config]
        paths = [p for spec in (src_path, tgt_path) if spec is not None
                 for p in (expand_paths(spec) if data_cfg.source == "files" else [spec])]
        for path in paths:
            if path is not None and os.path.exists(path):
                st = os.stat(path)
                parts += [os.path.abspath(path), st.st_size, st.st_mtime_ns]
            else:
                parts.append(path)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------


def clean_text_pairs(src: list[str], tgt: list[str], split: str, dedup: bool = True
                     ) -> tuple[list[str], list[str], CleaningReport]:
    """Strip whitespace, drop pairs with an empty side and (when ``dedup``) repeated pairs.

    The first occurrence of a duplicate pair is kept, so the order of the data is preserved.
    """
    report = CleaningReport(split, read=len(src))
    seen: set[bytes] = set()
    out_src, out_tgt = [], []
    for s, t in zip(src, tgt):
        s, t = s.strip(), t.strip()
        if not s or not t:
            report.empty += 1
            continue
        if dedup:
            key = hashlib.blake2b(f"{s}\t{t}".encode(), digest_size=12).digest()
            if key in seen:
                report.duplicate += 1
                continue
            seen.add(key)
        out_src.append(s)
        out_tgt.append(t)
    report.kept = len(out_src)
    return out_src, out_tgt, report


def length_filter(src_len: np.ndarray, tgt_len: np.ndarray, max_length: int, max_ratio: float,
                  report: CleaningReport) -> np.ndarray:
    """Indices of pairs within ``max_length`` tokens per side and ``max_ratio`` between sides.

    Lengths are token counts including EOS. Updates ``report`` (``too_long`` is counted
    first: a pair that is both too long and unbalanced counts as too long).
    """
    src_len, tgt_len = np.asarray(src_len), np.asarray(tgt_len)
    too_long = (src_len > max_length) | (tgt_len > max_length)
    ratio = np.maximum(src_len, tgt_len) / np.maximum(np.minimum(src_len, tgt_len), 1)
    bad_ratio = ~too_long & (ratio > max_ratio)
    report.too_long += int(too_long.sum())
    report.bad_ratio += int(bad_ratio.sum())
    keep = np.flatnonzero(~too_long & ~bad_ratio)
    report.kept = int(keep.size)
    return keep
