"""The BLEU wrappers agree with sacreBLEU called directly."""

from __future__ import annotations

import pytest
import sacrebleu

from moetrain.eval.bleu import bleu_report, compound_split, sacre_bleu, tokenized_bleu

HYPS = ["Die Katze sitzt auf der Matte.", "Ein Hals-Nasen-Ohren-Arzt kam heute.", "Das ist gut!"]
REFS = ["Die Katze saß auf der Matte.", "Ein Hals-Nasen-Ohren-Arzt kam gestern.", "Das ist sehr gut!"]


def test_sacre_bleu_matches_sacrebleu():
    ours = sacre_bleu(HYPS, REFS)
    theirs = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert ours.precisions == pytest.approx(theirs.precisions)
    assert ours.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert sacre_bleu(REFS, REFS).score == pytest.approx(100.0)
    lower = sacre_bleu([h.lower() for h in HYPS], REFS, lowercase=True)
    assert lower.score == pytest.approx(ours.score) and "case:lc" in lower.signature


def test_compound_split():
    assert compound_split("Ohren-Arzt") == "Ohren ##AT##-##AT## Arzt"
    assert compound_split("Hals-Nasen-Ohren") == "Hals ##AT##-##AT## Nasen ##AT##-##AT## Ohren"
    # Non-overlapping matches, like the Perl one-liner of the published scores.
    assert compound_split("a-b-c") == "a ##AT##-##AT## b-c"
    assert compound_split("a - b -c d-") == "a - b -c d-"  # only hyphens between two characters


def test_tokenized_bleu_is_split_then_untokenized_bleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    result = tokenized_bleu(HYPS, REFS)
    if "pretok:13a" in result.signature:
        tok = Tokenizer13a()
        expected = sacrebleu.corpus_bleu([compound_split(tok(h)) for h in HYPS],
                                         [[compound_split(tok(r)) for r in REFS]], tokenize="none")
        assert result.score == pytest.approx(expected.score)
    assert "compound_split:yes" in result.signature and "tok:none" in result.signature
    # Splitting compounds into ##AT## tokens turns one matched word into several matched n-grams.
    assert result.score > sacre_bleu(HYPS, REFS).score


def test_report_and_errors():
    report = bleu_report(HYPS, REFS, tokenized=True)
    assert set(report) >= {"bleu", "bleu_signature", "tokenized_bleu", "tokenized_bleu_signature"}
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        sacre_bleu(HYPS[:2], REFS)
