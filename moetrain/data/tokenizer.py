"""A shared source/target subword vocabulary, trained offline with HF ``tokenizers``.

One vocabulary covers both languages (the model ties its input and output embeddings).
It is saved as a ``PreTrainedTokenizerFast`` directory, so ``AutoTokenizer.from_pretrained``
loads it and the HF export ships it unchanged. T5's special-token layout is kept::

    0 <pad>   (also the decoder start token)
    1 </s>    (appended to every source and target by the post-processor)
    2 <unk>

Pre-tokenisation is SentencePiece-style (``Metaspace``: spaces become ``▁`` and are part of
the pieces), so decoding restores the original spacing without language-specific
detokenisation rules.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["PAD", "EOS", "UNK", "SPECIAL_TOKENS", "train_tokenizer", "load_tokenizer", "tokenizer_fingerprint"]

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]  # ids 0, 1, 2 in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                    kind: str = "bpe", limit_alphabet: int = 1000):
    """Train a subword vocabulary on ``texts`` and save it as an HF tokenizer directory.

    Args:
        texts: sentences of both languages (any iterable; it is consumed once).
        vocab_size: size including the special tokens. BPE may stop earlier when the data
            has fewer distinct merges (small synthetic languages).
        out_dir: destination; receives ``tokenizer.json``, ``tokenizer_config.json`` and
            ``special_tokens_map.json``.
        kind: ``bpe`` or ``unigram``.
        limit_alphabet: at most this many initial characters (rare characters become
            ``<unk>``; keeps noisy web text from filling the vocabulary).

    Returns:
        The saved ``PreTrainedTokenizerFast``.
    """
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      limit_alphabet=limit_alphabet, show_progress=False)
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                          unk_token=UNK, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind '{kind}'; expected 'bpe' or 'unigram'")
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, f"special token {token} got id {tok.token_to_id(token)}, expected {i}"
    # "</s>" after every sequence, as in T5; pairs are never encoded together.
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)])
    return _save(tok, Path(out_dir))


def _save(tok: Tokenizer, out_dir: Path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer directory written by :func:`train_tokenizer` (or any HF tokenizer).

    Raises:
        FileNotFoundError: ``path`` is not a directory holding a tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer here (expected tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """Hash of ``tokenizer.json``: keys the tokenised-data cache."""
    digest = hashlib.sha256(Path(path, "tokenizer.json").read_bytes())
    return digest.hexdigest()[:16]
