"""BLEU the way translation papers report it: sacreBLEU, and tokenised BLEU for older tables.

* :func:`sacre_bleu` - detokenised sacreBLEU (13a tokenisation inside sacreBLEU, mixed case)
  with its signature (``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.x``). This is
  the number to compare across systems.
* :func:`tokenized_bleu` - BLEU on tokenised text with hyphenated compounds split into
  ``a ##AT##-##AT## b``, the convention of the WMT'14 En-De results of Vaswani et al. 2017
  and of the Switch/SparseMixer fairseq setups (their ``compound_split_bleu`` script). Both
  sides are tokenised here (Moses via ``sacremoses`` when it is installed, else sacreBLEU's
  13a tokenizer, which differs from Moses in rare cases), compound-split, then scored with
  no further tokenisation. Use it only to compare with those papers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = ["BleuResult", "sacre_bleu", "tokenized_bleu", "compound_split", "bleu_report"]

_COMPOUND = re.compile(r"(\S)-(\S)")


@dataclass
class BleuResult:
    """One BLEU score with what is needed to reproduce it."""

    score: float
    signature: str
    precisions: list[float]
    brevity_penalty: float
    sys_len: int
    ref_len: int
    text: str  # sacreBLEU's one-line summary

    def as_dict(self) -> dict:
        return asdict(self)


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references; they must be line-aligned")


def _score(hyps: Sequence[str], refs: Sequence[str], tokenize: str, lowercase: bool = False,
           force: bool = False) -> BleuResult:
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize=tokenize, lowercase=lowercase, force=force)
    result = metric.corpus_score(list(hyps), [list(refs)])
    return BleuResult(float(result.score), str(metric.get_signature()), [float(p) for p in result.precisions],
                      float(result.bp), int(result.sys_len), int(result.ref_len), str(result))


def sacre_bleu(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a", lowercase: bool = False,
               force: bool = False) -> BleuResult:
    """Corpus BLEU of detokenised hypotheses against one detokenised reference each.

    Args:
        hyps: system outputs, one per line.
        refs: references, line-aligned with ``hyps``.
        tokenize: sacreBLEU tokenizer (``13a`` is the WMT standard; ``intl``, ``none``...).
        lowercase: case-insensitive BLEU (reported in the signature).
        force: silence sacreBLEU's "looks tokenized" warning (text whose words are really
            separated from punctuation, like the synthetic demo language).
    """
    _check(hyps, refs)
    return _score(hyps, refs, tokenize, lowercase, force)


def compound_split(text: str) -> str:
    """``Ohren-Arzt`` -> ``Ohren ##AT##-##AT## Arzt`` on tokenised text.

    One left-to-right pass of ``(\\S)-(\\S)``, with the same semantics as the Perl one-liner
    the published scores used. Matches do not overlap, so a one-character part between two
    hyphens is consumed by the first match (``a-b-c`` -> ``a ##AT##-##AT## b-c``). Kept on
    purpose: the point of this score is to be comparable with those tables.
    """
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", text)


def _tokenizer(lang: str):
    """``(tokenize(line) -> line, name)``: Moses when ``sacremoses`` is installed, else 13a."""
    try:
        from sacremoses import MosesTokenizer
    except ImportError:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        return Tokenizer13a(), "13a"
    moses = MosesTokenizer(lang=lang)
    return (lambda line: moses.tokenize(line, return_str=True, escape=False)), "moses"


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str = "de") -> BleuResult:
    """BLEU on tokenised, compound-split text (comparable with fairseq-era WMT'14 tables).

    Args:
        hyps / refs: detokenised text, line-aligned.
        lang: target language (Moses tokenisation rules when ``sacremoses`` is present).
    """
    _check(hyps, refs)
    tok, name = _tokenizer(lang)
    split_h = [compound_split(tok(h)) for h in hyps]
    split_r = [compound_split(tok(r)) for r in refs]
    result = _score(split_h, split_r, "none", force=True)  # tokenised on purpose
    result.signature += f"|pretok:{name}|compound_split:yes"
    return result


def bleu_report(hyps: Sequence[str], refs: Sequence[str], lang: str = "de", tokenized: bool = False,
                force: bool = False) -> dict:
    """``{"bleu", "bleu_signature", ...}`` for metrics files; adds ``tokenized_bleu`` on request."""
    sacre = sacre_bleu(hyps, refs, force=force)
    report = {"bleu": sacre.score, "bleu_signature": sacre.signature, "bleu_text": sacre.text,
              "bleu_brevity_penalty": sacre.brevity_penalty, "sys_len": sacre.sys_len, "ref_len": sacre.ref_len}
    if tokenized:
        tok = tokenized_bleu(hyps, refs, lang)
        report.update({"tokenized_bleu": tok.score, "tokenized_bleu_signature": tok.signature})
    return report
