"""Pretraining text: load, clean, train a vocabulary, pack into fixed-length sequences, batch.

ELECTRA (Clark et al. 2020, https://arxiv.org/abs/2003.10555) pretrains on plain text packed
into fixed-length sequences. This module turns any text ``datasets`` can read into such
sequences and serves them as resumable, rank-sharded micro-batches::

    raw = load_text(TextSource("files", train_files="corpus/*.txt"), cache_dir)   # column "text"
    tok = train_text_tokenizer(iter_text(raw), 8000, run_dir / "tokenizer")      # AutoTokenizer loads it
    seqs = pack_sequences(raw, tok, seq_length=128, row_is_document=False)        # column "input_ids"
    for epoch, rows, sample_ids in batch_plan(len(seqs), 32, rank, world, seed, start_step): ...

Sources: ``files`` (local plain-text files, one row per line; a blank line ends a document),
``hub`` (a Hub corpus by name, e.g. ``wikimedia/wikipedia``, one row per document) and
``synthetic`` (:func:`synthetic_documents`, sentences from a small English-like grammar that
the package writes itself, for tests and offline smoke runs).

Caching: loading and packing go through ``datasets`` (Arrow files under the cache directory);
the packing step's fingerprint hashes the source fingerprint, the tokenizer file and the
sequence length, so a second run reuses the packed sequences and any change rebuilds them.

Vocabulary layout (BERT-style, with T5's pad 0 / eos 1 so the HF export's checks hold)::

    0 [PAD]   1 [SEP] (= eos)   2 [UNK]   3 [CLS]   4 [MASK]

Masking (:func:`mask_tokens`) is a pure function of ``(seed, sample id, position)`` via the
counter-based hash of :mod:`moetrain.moe.noise`: a sequence is masked the same way whichever
rank holds it, and a resumed run replays exactly the same masks.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import random
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from moetrain.utils.atomic import publish_modes
from moetrain.utils.errors import UserError
from moetrain.utils.file_lists import expand_file_list

__all__ = [
    "TextDataError", "TextSource", "SPECIAL_TOKENS", "PAD", "SEP", "UNK", "CLS", "MASK", "expand_files",
    "check_text_file", "load_text", "clean_line", "iter_text", "synthetic_documents", "write_synthetic_corpus",
    "train_text_tokenizer", "check_tokenizer", "pack_sequences", "batch_plan", "batches_per_epoch",
    "pad_batch", "mask_tokens",
]

PAD, SEP, UNK, CLS, MASK = "[PAD]", "[SEP]", "[UNK]", "[CLS]", "[MASK]"
SPECIAL_TOKENS = [PAD, SEP, UNK, CLS, MASK]  # ids 0..4 in this order

#: Bump when packing changes its output (part of the cache fingerprint).
PACK_VERSION = 1
#: Stream id of the masking draws in the counter-based hash (routing uses 1..5).
_MASK_STREAM = 101


class TextDataError(UserError, ValueError):
    """Unusable text input; the message names the file and what was expected."""


@dataclass(frozen=True)
class TextSource:
    """Where pretraining text comes from (plain arguments; ``ElectraConfig`` maps onto it).

    Attributes:
        kind: ``files``, ``hub`` or ``synthetic``.
        train_files: comma-separated paths or glob patterns (``files``).
        hub_name / hub_config / hub_split / text_column: the Hub corpus (``hub``).
        max_documents: keep only the first rows (``None`` = all).
        encoding_errors: ``strict`` (a non-UTF-8 file is an error) or ``replace`` (undecodable
            bytes become U+FFFD, with a warning naming the file and the count).
    """

    kind: str
    train_files: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    text_column: str = "text"
    max_documents: int | None = None
    encoding_errors: str = "strict"


# ---------------------------------------------------------------------------
# Loading and cleaning
# ---------------------------------------------------------------------------


def expand_files(spec: str) -> list[Path]:
    """Comma-separated paths / glob patterns -> sorted existing files.

    Raises:
        TextDataError: a pattern matches nothing, or names a directory.
    """
    files: list[Path] = []
    for part, matches in expand_file_list(spec):
        if not matches or not all(Path(m).exists() for m in matches):
            raise TextDataError(f"{part}: no such file; expected UTF-8 plain-text files (paths or glob patterns)")
        for m in matches:
            if Path(m).is_dir():
                raise TextDataError(f"{m}: is a directory; expected UTF-8 plain-text files (use a glob like {m}/*.txt)")
            files.append(Path(m))
    if not files:
        raise TextDataError(f"'{spec}': no files given; expected comma-separated paths or glob patterns")
    return files


def check_text_file(path: Path, errors: str = "strict", chunk_size: int = 1 << 20) -> int:
    """Fail early, naming the file, on an empty, blank or non-UTF-8 text file.

    ``datasets`` would otherwise stop deep inside its Arrow writer with a bare
    ``UnicodeDecodeError`` (or silently build an empty dataset).

    Args:
        errors: ``strict`` raises on the first undecodable byte; ``replace`` counts them.

    Returns:
        The number of undecodable bytes (always 0 with ``strict``).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset, has_text, bad = 0, False, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                where = offset + err.start
                raise TextDataError(f"{path}: not valid UTF-8 (byte 0x{chunk[err.start]:02x} at offset {where}); "
                                    "expected UTF-8 plain text — re-encode the file (e.g. `iconv -f latin1 -t "
                                    f"utf-8 {path.name}`) or set electra.encoding_errors: replace") from None
            bad += text.count("\ufffd") if errors == "replace" else 0
            has_text = has_text or bool(text.strip())
            if not chunk:
                break
            offset += len(chunk)
    if offset == 0:
        raise TextDataError(f"{path}: file is empty; expected UTF-8 plain text with at least one non-blank line")
    if not has_text:
        raise TextDataError(f"{path}: file holds only whitespace; expected UTF-8 plain text with at least one "
                            "non-blank line")
    return bad


def load_text(source: TextSource, cache_dir: str | None = None):
    """The raw text as a ``datasets.Dataset`` with one string column ``text``.

    ``files``: one row per line (blank lines kept; they end documents). ``hub``: one row per
    document of ``hub_name``/``hub_config``/``hub_split``; ``hub_name`` may also be a local
    dataset directory. Every file is checked first (:func:`check_text_file`).
    """
    import datasets

    if source.kind == "files":
        files = expand_files(source.train_files or "")
        for path in files:
            bad = check_text_file(path, source.encoding_errors)
            if bad:
                warnings.warn(f"{path}: {bad} byte(s) are not UTF-8; read as U+FFFD (electra.encoding_errors: "
                              "replace)", stacklevel=2)
        ds = datasets.load_dataset("text", data_files=[str(p) for p in files], split="train", cache_dir=cache_dir,
                                   encoding_errors=source.encoding_errors)
    elif source.kind == "hub":
        args = [source.hub_name] + ([source.hub_config] if source.hub_config else [])
        ds = datasets.load_dataset(*args, split=source.hub_split, cache_dir=cache_dir)
        if source.text_column not in ds.column_names:
            raise TextDataError(f"{source.hub_name}: no column '{source.text_column}' (columns: {ds.column_names}); "
                                "set electra.text_column")
        ds = ds.select_columns([source.text_column])
        if source.text_column != "text":
            ds = ds.rename_column(source.text_column, "text")
    else:
        raise ValueError(f"load_text: unknown source kind '{source.kind}' (synthetic text is written to files first)")
    if source.max_documents is not None:
        ds = ds.select(range(min(source.max_documents, len(ds))))
    if len(ds) == 0:
        raise TextDataError(f"{source.train_files or source.hub_name}: no text rows; expected at least one document")
    return ds


# WikiText's tokenisation marks (" @-@ ", " @,@ ", " @.@ ") inside numbers and compounds.
_WIKITEXT_AT = re.compile(r" @([-,.])@ ")
_SPACES = re.compile(r"\s+")
# C0/C1 control characters and zero-width / bidi format marks (tab and newline are whitespace).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060\ufeff]")


def clean_line(text: str) -> str:
    """NFKC, undo WikiText's ``@-@`` marks, drop control characters, collapse whitespace.

    A line that is blank after cleaning comes back as ``""`` (a document boundary).
    """
    text = unicodedata.normalize("NFKC", text)
    text = _WIKITEXT_AT.sub(r"\1", text)
    text = _CONTROL.sub("", text)
    return _SPACES.sub(" ", text).strip()


def iter_text(ds, batch_size: int = 1000) -> Iterator[list[str]]:
    """Cleaned, non-blank rows of a text dataset in batches (tokenizer training input)."""
    for start in range(0, len(ds), batch_size):
        rows = ds[start:start + batch_size]["text"]
        yield [t for t in (clean_line(r) for r in rows) if t]


# ---------------------------------------------------------------------------
# A tiny grammar: offline text for tests and smoke runs
# ---------------------------------------------------------------------------

# Each topic has its own nouns and verbs, so a sentence's topic is predictable from its
# neighbours (something for the generator and the discriminator to learn from context).
_TOPICS = {
    "farm": (["farmer", "horse", "cow", "goat", "barn", "field", "tractor", "sheep"],
             ["feeds", "watches", "follows", "cleans", "visits"], ["green", "muddy", "quiet", "old"]),
    "sea": (["sailor", "boat", "whale", "wave", "harbor", "captain", "fish", "island"],
            ["sails", "sees", "reaches", "leaves", "crosses"], ["blue", "cold", "wild", "distant"]),
    "city": (["driver", "train", "street", "tower", "market", "doctor", "bank", "bridge"],
             ["builds", "enters", "passes", "repairs", "opens"], ["busy", "tall", "bright", "noisy"]),
    "school": (["teacher", "student", "book", "lesson", "class", "pencil", "library", "exam"],
               ["reads", "writes", "studies", "explains", "finds"], ["new", "long", "hard", "small"]),
}
_DETS = ["the", "a", "every", "one"]
_PREPS = ["near", "behind", "with", "under"]
_ADVERBS = ["slowly", "often", "never", "always", "quickly"]


def _noun_phrase(rng: random.Random, nouns: list[str], adjs: list[str]) -> str:
    words = [rng.choice(_DETS)]
    if rng.random() < 0.5:
        words.append(rng.choice(adjs))
    words.append(rng.choice(nouns))
    if rng.random() < 0.25:
        words += [rng.choice(_PREPS), "the", rng.choice(nouns)]
    return " ".join(words)


def _sentence(rng: random.Random, topic: str) -> str:
    nouns, verbs, adjs = _TOPICS[topic]
    subject, obj = _noun_phrase(rng, nouns, adjs), _noun_phrase(rng, nouns, adjs)
    verb = rng.choice(verbs)
    adverb = rng.choice(_ADVERBS) + " " if rng.random() < 0.3 else ""
    if rng.random() < 0.2:  # relative clause
        obj += f" that {rng.choice(verbs)} the {rng.choice(nouns)}"
    sentence = f"{subject} {adverb}{verb} {obj}"
    return sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "!"])


def synthetic_documents(num_documents: int, seed: int = 0) -> list[str]:
    """``num_documents`` paragraphs of 3-8 sentences, each paragraph on one topic."""
    rng = random.Random(seed * 1_000_003 + 11)
    topics = sorted(_TOPICS)
    return [" ".join(_sentence(rng, topic) for _ in range(rng.randint(3, 8)))
            for topic in (rng.choice(topics) for _ in range(num_documents))]


def write_synthetic_corpus(path: Path, num_documents: int, seed: int = 0) -> Path:
    """Write :func:`synthetic_documents` as a text file (documents separated by blank lines).

    Written atomically and only when missing, so concurrent ranks and repeated runs agree.
    """
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n\n".join(synthetic_documents(num_documents, seed)) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------


def train_text_tokenizer(texts: Iterable[list[str]], vocab_size: int, out_dir: str | os.PathLike,
                         kind: str = "wordpiece", lowercase: bool = True):
    """Train a WordPiece or unigram vocabulary and save it where ``AutoTokenizer`` loads it.

    Args:
        texts: batches of cleaned strings (consumed once).
        vocab_size: size including the 5 special tokens.
        out_dir: destination directory (written atomically: temporary sibling, then rename).
        kind: ``wordpiece`` (BERT/ELECTRA) or ``unigram`` (SentencePiece-style, Metaspace).
        lowercase: lowercase (and strip accents, for WordPiece) before splitting.

    Returns:
        The saved ``PreTrainedTokenizerFast``: ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)  # accents stripped iff lowercase
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                            limit_alphabet=1000, show_progress=False)
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
                                          show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind '{kind}'; expected 'wordpiece' or 'unigram'")
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, f"special token {token} got id {tok.token_to_id(token)}, expected {i}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, 3), (SEP, 1)])
    return _save_tokenizer(tok, Path(out_dir))


def _save_tokenizer(tok, out_dir: Path):
    import shutil
    import tempfile

    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=SEP, sep_token=SEP, unk_token=UNK,
                                 cls_token=CLS, mask_token=MASK)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf.save_pretrained(str(tmp))
        publish_modes(tmp)  # mkdtemp makes 0700
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf


def check_tokenizer(tokenizer, where: str | os.PathLike, vocab_size: int, pad_token_id: int) -> None:
    """The tokenizer fits a model with ``vocab_size`` rows and has the special tokens we need.

    Raises:
        TextDataError: naming ``where`` (the tokenizer directory) and what was expected.
    """
    if len(tokenizer) > vocab_size:
        raise TextDataError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model has "
                            f"{vocab_size} embedding rows (model.vocab_size); expected a vocabulary of at most "
                            f"{vocab_size} tokens — the tokenizer does not belong to this model")
    missing = [name for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id")
               if getattr(tokenizer, name, None) is None]
    if missing:
        raise TextDataError(f"{where}: tokenizer lacks {', '.join(n[:-9] for n in missing)} token(s); expected "
                            f"{', '.join(SPECIAL_TOKENS)} (train one with moetrain.data.text.train_text_tokenizer)")
    if tokenizer.pad_token_id != pad_token_id:
        raise TextDataError(f"{where}: tokenizer pad id is {tokenizer.pad_token_id} but model.pad_token_id is "
                            f"{pad_token_id}; expected them to agree")


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------


def _tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def pack_sequences(ds, tokenizer, seq_length: int, row_is_document: bool, num_proc: int | None = None):
    """Tokenize rows and pack them into ``[CLS] ... [SEP]`` sequences of ``seq_length`` tokens.

    Consecutive rows are concatenated (hard-wrapped lines join back into paragraphs); a
    document boundary (a blank row in ``files`` mode, the end of every row when
    ``row_is_document``) inserts a ``[SEP]``. Each map batch (1000 rows) packs on its own,
    so its last, shorter sequence is kept and padded later; sequences shorter than 8 tokens
    are dropped.

    Returns:
        A ``datasets.Dataset`` with one column ``input_ids`` (lists of at most
        ``seq_length`` ids), cached under the fingerprint of (rows, tokenizer, length).
    """
    if seq_length < 8:
        raise ValueError(f"seq_length must be >= 8, got {seq_length}")
    cls_id, sep_id, body = tokenizer.cls_token_id, tokenizer.sep_token_id, seq_length - 2
    # A private copy of the Rust tokenizer: no per-call Python overhead, and no padding or
    # truncation left switched on by an earlier call through the HF wrapper.
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    fingerprint = hashlib.sha256(
        f"{ds._fingerprint}|{_tokenizer_hash(tokenizer)}|{seq_length}|{row_is_document}|{PACK_VERSION}".encode()
    ).hexdigest()[:16]

    def pack(batch):
        texts = [clean_line(t) for t in batch["text"]]
        encoded = backend.encode_batch(texts, add_special_tokens=False)
        out, current = [], []
        for ids in (e.ids for e in encoded):
            if ids:
                current.extend(ids)
                while len(current) >= body:
                    out.append([cls_id] + current[:body] + [sep_id])
                    current = current[body:]
                    if current and current[0] == sep_id:
                        current = current[1:]
            if (row_is_document or not ids) and current and current[-1] != sep_id:
                current.append(sep_id)  # document boundary
        if current and current[-1] == sep_id:
            current = current[:-1]
        if len(current) >= 6:
            out.append([cls_id] + current + [sep_id])
        return {"input_ids": out}

    return ds.map(pack, batched=True, batch_size=1000, remove_columns=ds.column_names, new_fingerprint=fingerprint,
                  num_proc=num_proc if num_proc and num_proc > 1 else None, desc="packing text")


# ---------------------------------------------------------------------------
# Batching: sharded, resumable, deterministic
# ---------------------------------------------------------------------------


def batches_per_epoch(num_sequences: int, batch_size: int, dp_world: int) -> int:
    """Full micro-batches each rank gets per epoch (the partial remainder is skipped)."""
    return num_sequences // (batch_size * dp_world)


def batch_plan(num_sequences: int, batch_size: int, dp_rank: int, dp_world: int, seed: int,
               start_step: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Endless ``(epoch, row indices [B], sample ids [B])`` for one data-parallel rank.

    Epoch ``e`` visits a permutation drawn from ``(seed, e)``; global micro-batch ``g`` takes
    rows ``perm[g*B*W : (g+1)*B*W]`` and rank ``r`` its ``r``-th slice of ``B``. Starting at
    ``start_step`` micro-batches in continues exactly where a run stopped. Sample ids
    ``epoch * num_sequences + row`` are unique over the run (they key masking, sampling and
    routing noise).

    Raises:
        TextDataError: fewer sequences than one global batch.
    """
    per_epoch = batches_per_epoch(num_sequences, batch_size, dp_world)
    if per_epoch == 0:
        raise TextDataError(f"only {num_sequences} packed sequences, fewer than one global batch of "
                            f"{batch_size} x {dp_world} rank(s); expected more text or a smaller electra.batch_size")
    epoch, step = divmod(start_step, per_epoch)
    while True:
        perm = np.random.default_rng([seed, epoch]).permutation(num_sequences)
        for g in range(step, per_epoch):
            start = (g * dp_world + dp_rank) * batch_size
            rows = perm[start:start + batch_size]
            yield epoch, rows, rows.astype(np.int64) + epoch * num_sequences
        epoch, step = epoch + 1, 0


def pad_batch(sequences: list[list[int]], seq_length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids [B, seq_length], attention_mask [B, seq_length])`` (fixed shapes)."""
    ids = torch.full((len(sequences), seq_length), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.as_tensor(seq[:seq_length], dtype=torch.long)
    return ids, (ids != pad_id).long()


def mask_tokens(input_ids: Tensor, candidates: Tensor, sample_ids: Tensor, *, mask_prob: float,
                mask_token_prob: float, mask_id: int, seed: int) -> tuple[Tensor, Tensor]:
    """ELECTRA/BERT masking: pick ``max(1, round(mask_prob * n))`` candidate positions per row.

    Of the picked positions, a ``mask_token_prob`` share becomes ``[MASK]`` and the rest keep
    their token (ELECTRA: 85% / 15%); the generator predicts all picked positions.

    Args:
        input_ids: ``[B, L]`` token ids.
        candidates: ``[B, L]`` bool, positions that may be masked (real, non-special tokens).
        sample_ids: ``[B]`` global sample ids; with ``seed`` they fix the draws.

    Returns:
        ``(masked_ids [B, L], labels [B, L])`` with labels ``-100`` at unpicked positions.
    """
    from moetrain.models.switch import global_token_ids
    from moetrain.moe.noise import counter_uniform

    b, length = input_ids.shape
    token_ids = global_token_ids(sample_ids.to(input_ids.device), length)
    u = counter_uniform(seed, 0, 0, _MASK_STREAM, token_ids.reshape(-1), 2).view(b, length, 2)
    num = candidates.sum(dim=1)
    k = torch.where(num > 0, (num.float() * mask_prob).round().clamp(min=1), torch.zeros_like(num.float())).long()
    scores = torch.where(candidates, u[..., 0], torch.full_like(u[..., 0], 2.0))  # non-candidates sort last
    rank = scores.argsort(dim=1).argsort(dim=1)
    picked = candidates & (rank < k[:, None])
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(picked & (u[..., 1] < mask_token_prob), torch.full_like(input_ids, mask_id), input_ids)
    return masked, labels
