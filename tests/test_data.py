"""Translation data: sources (incl. the Hub code path on local files), cleaning, tokenizer, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moetrain.config import DataConfig
from moetrain.data.sources import (
    CleaningReport,
    DataError,
    clean_text_pairs,
    length_filter,
    load_hub_split,
    load_split,
    read_jsonl,
    read_parallel_files,
    read_tsv,
    source_fingerprint,
)

PAIRS = [("A small dog.", "Ein kleiner Hund."), ("Two cats sleep.", "Zwei Katzen schlafen."),
         ("Hello world", "Hallo Welt")]


def _write(path, lines, newline="\n"):
    path.write_text("".join(line + newline for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def parallel_files(tmp_path):
    return (_write(tmp_path / "train.en", [s for s, _ in PAIRS]), _write(tmp_path / "train.de", [t for _, t in PAIRS]))


# -- sources -------------------------------------------------------------------------------


def test_parallel_files_and_crlf(tmp_path, parallel_files):
    src, tgt = read_parallel_files(*parallel_files)
    assert list(zip(src, tgt)) == PAIRS
    crlf = _write(tmp_path / "crlf.en", [s for s, _ in PAIRS], newline="\r\n")
    assert read_parallel_files(crlf, parallel_files[1])[0] == src


def test_line_separators_inside_a_sentence_do_not_split(tmp_path):
    # U+2028 and form feeds occur in web text; str.splitlines would misalign the corpus.
    src = _write(tmp_path / "a.en", ["one\u2028still one", "two\x0ctwo"])
    tgt = _write(tmp_path / "a.de", ["eins", "zwei"])
    assert read_parallel_files(src, tgt)[0] == ["one\u2028still one", "two\x0ctwo"]


def test_misaligned_files_name_file_and_line(tmp_path, parallel_files):
    short = _write(tmp_path / "short.de", ["Ein kleiner Hund.", "Zwei Katzen schlafen."])
    with pytest.raises(DataError, match=r"train\.en:3: misaligned.*3 lines.*has 2"):
        read_parallel_files(parallel_files[0], short)


def test_undecodable_bytes_name_file_and_line(tmp_path, parallel_files):
    bad = tmp_path / "bad.de"
    bad.write_bytes("Ein Hund.\nZwei Katzen.\n".encode() + b"Gr\xfc\xdfe\n")  # latin-1, not UTF-8
    with pytest.raises(DataError, match=r"bad\.de:3: not valid UTF-8 \(byte 0xfc at column 3\)"):
        read_parallel_files(parallel_files[0], str(bad))


def test_tsv(tmp_path):
    path = _write(tmp_path / "train.tsv", [f"{s}\t{t}" for s, t in PAIRS] + ["", "extra\tcols\tignored"])
    src, tgt = read_tsv(path)
    assert list(zip(src, tgt))[:3] == PAIRS and src[3] == tgt[3] == "" and (src[4], tgt[4]) == ("extra", "cols")
    broken = _write(tmp_path / "broken.tsv", ["a\tb", "no tab here"])
    with pytest.raises(DataError, match=r"broken\.tsv:2: expected 'source<TAB>target'"):
        read_tsv(broken)


def test_jsonl_both_layouts_and_errors(tmp_path):
    rows = [{"translation": {"en": s, "de": t}} for s, t in PAIRS[:2]] + [{"en": PAIRS[2][0], "de": PAIRS[2][1]}]
    path = _write(tmp_path / "train.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    assert list(zip(*read_jsonl(path, "en", "de"))) == PAIRS
    bad = _write(tmp_path / "bad.jsonl", [json.dumps(rows[0]), "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_jsonl(bad, "en", "de")
    missing = _write(tmp_path / "missing.jsonl", [json.dumps({"translation": {"en": "x", "fr": "y"}})])
    with pytest.raises(DataError, match=r"missing\.jsonl:1: expected an object with string fields 'en' and 'de'"):
        read_jsonl(missing, "en", "de")


def _hub_rows():
    return [{"translation": {"de": t, "en": s}} for s, t in PAIRS]


def test_hub_path_on_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "wmt14-train.parquet"
    pq.write_table(pa.Table.from_pylist(_hub_rows()), path)
    ds = load_hub_split("parquet", None, "train", "en", "de", data_files=str(path), cache_dir=str(tmp_path / "hf"))
    assert list(zip(ds["src"], ds["tgt"])) == PAIRS
    # The same through the config, as `data.source: hub` runs it.
    cfg = DataConfig(source="hub", hub_name="parquet", train_src=str(path), cache_dir=str(tmp_path / "hf"))
    assert list(zip(*load_split(cfg, "train"))) == PAIRS
    assert load_split(cfg, "valid") is None  # a local builder with no file for the split


def test_hub_path_on_local_jsonl_reverse_direction(tmp_path):
    path = _write(tmp_path / "valid.jsonl", [json.dumps(r, ensure_ascii=False) for r in _hub_rows()])
    cfg = DataConfig(source="hub", hub_name="json", valid_src=path, src_lang="de", tgt_lang="en",
                     cache_dir=str(tmp_path / "hf"))
    assert list(zip(*load_split(cfg, "valid"))) == [(t, s) for s, t in PAIRS]


def test_hub_schema_error(tmp_path):
    path = _write(tmp_path / "x.jsonl", [json.dumps({"en": "a", "de": "b"})])
    with pytest.raises(DataError, match="expected a 'translation' column"):
        load_hub_split("json", None, "train", "en", "de", data_files=path, cache_dir=str(tmp_path / "hf"))


def test_load_split_sources(tmp_path, parallel_files):
    files = DataConfig(source="files", train_src=parallel_files[0], train_tgt=parallel_files[1])
    assert list(zip(*load_split(files, "train"))) == PAIRS
    assert load_split(files, "test") is None
    tsv = DataConfig(source="tsv", train_src=_write(tmp_path / "t.tsv", [f"{s}\t{t}" for s, t in PAIRS]))
    assert list(zip(*load_split(tsv, "train"))) == PAIRS


def test_several_files_by_list_or_glob(tmp_path):
    a = (_write(tmp_path / "news1.en", ["one", "two"]), _write(tmp_path / "news1.de", ["eins", "zwei"]))
    b = (_write(tmp_path / "news2.en", ["three"]), _write(tmp_path / "news2.de", ["drei"]))
    listed = DataConfig(source="files", train_src=f"{a[0]},{b[0]}", train_tgt=f"{a[1]},{b[1]}")
    globbed = DataConfig(source="files", train_src=str(tmp_path / "news*.en"), train_tgt=str(tmp_path / "news*.de"))
    want = [("one", "eins"), ("two", "zwei"), ("three", "drei")]
    assert list(zip(*load_split(listed, "train"))) == want == list(zip(*load_split(globbed, "train")))
    assert source_fingerprint(listed, "train") == source_fingerprint(globbed, "train")
    _write(tmp_path / "news1.en", ["one", "two", "new"])  # the cache key follows every file
    _write(tmp_path / "news1.de", ["eins", "zwei", "neu"])
    assert source_fingerprint(globbed, "train") != source_fingerprint(listed, "valid")
    with pytest.raises(DataError, match="names 2 file.s. but .* names 1"):
        load_split(DataConfig(source="files", train_src=f"{a[0]},{b[0]}", train_tgt=a[1]), "train")
    with pytest.raises(DataError, match="news1.en is paired with .*news2.de: names differ"):
        load_split(DataConfig(source="files", train_src=f"{a[0]},{b[0]}", train_tgt=f"{b[1]},{a[1]}"), "train")
    with pytest.raises(DataError, match=r"nothing\*.en: no file matches this pattern"):
        load_split(DataConfig(source="files", train_src=str(tmp_path / "nothing*.en"), train_tgt=a[1]), "train")


# -- cleaning --------------------------------------------------------------------------------


def test_cleaning_counts():
    src = ["a b", "  ", "a b", "c", "d ", "e", "a b"]
    tgt = ["x y", "x", "x y", "", "z", "w", "x  y"]
    out_src, out_tgt, report = clean_text_pairs(src, tgt, "train")
    assert (out_src, out_tgt) == (["a b", "d", "e", "a b"], ["x y", "z", "w", "x  y"])
    assert (report.read, report.empty, report.duplicate, report.kept) == (7, 2, 1, 4)
    _, _, no_dedup = clean_text_pairs(src, tgt, "valid", dedup=False)
    assert (no_dedup.duplicate, no_dedup.kept) == (0, 5)


def test_length_filter_counts():
    report = CleaningReport("train", read=6, kept=6)
    src = np.array([3, 10, 2, 9, 4, 1])
    tgt = np.array([3, 2, 9, 9, 3, 3])
    keep = length_filter(src, tgt, max_length=9, max_ratio=2.5, report=report)
    # 10 > max_length; 2 vs 9 and 10 vs 2 unbalanced (10 vs 2 counts as too long); 1 vs 3 ratio 3.
    assert keep.tolist() == [0, 3, 4]
    assert (report.too_long, report.bad_ratio, report.kept) == (1, 2, 3)
    assert "kept 3" in report.summary()


# -- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from moetrain.data.tokenizer import train_tokenizer

    texts = [s for pair in PAIRS for s in pair] * 20 + ["Größe, Übermaß – „Anführungszeichen“ 12.5%"]
    tok = train_tokenizer(texts, 300, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    assert loaded.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    for text in texts[-1:] + [p for pair in PAIRS for p in pair]:
        ids = loaded(text)["input_ids"]
        assert ids[-1] == 1 and ids.count(1) == 1  # EOS appended once
        assert loaded.decode(ids, skip_special_tokens=True) == text
    assert tok("Hallo Welt")["input_ids"] == loaded("Hallo Welt")["input_ids"]
    assert 0 not in loaded("Hallo Welt")["input_ids"]


def test_unigram_tokenizer(tmp_path):
    from moetrain.data.tokenizer import load_tokenizer, train_tokenizer

    texts = [s for pair in PAIRS for s in pair] * 20
    train_tokenizer(texts, 60, tmp_path / "uni", kind="unigram")
    tok = load_tokenizer(tmp_path / "uni")
    assert tok.decode(tok("Zwei Katzen schlafen.")["input_ids"], skip_special_tokens=True) == "Zwei Katzen schlafen."
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


# -- synthetic language ------------------------------------------------------------------------


def test_synthetic_generator_is_deterministic_and_held_out():
    from moetrain.data.synthetic import SENTENCE_TYPES, generate_pairs

    a = generate_pairs(3, 300)
    assert a == generate_pairs(3, 300)
    assert a[0] != generate_pairs(4, 300)[0]
    assert set(a[2]) == set(SENTENCE_TYPES)
    assert len(set(a[0])) == 300  # distinct sources
    valid = generate_pairs(3, 50, "valid", exclude=set(a[0]))
    assert not set(valid[0]) & set(a[0])
    for src, tgt, kind in zip(*a):
        assert src and tgt and src.endswith((".", "?")) and tgt[-1] == src[-1]


# -- pipeline: tokenised splits, cache -------------------------------------------------------


def test_pipeline_builds_caches_and_reports(tmp_path, parallel_files):
    from moetrain.data.pipeline import prepare_translation_data

    src = [s for s, _ in PAIRS] * 3 + ["", "one two three four five six seven eight nine ten eleven twelve", "x"]
    tgt = [t for _, t in PAIRS] * 3 + ["leer", "eins", "ein zwei drei vier fünf sechs sieben acht neun zehn"]
    cfg = DataConfig(source="files", train_src=_write(tmp_path / "t.en", src), train_tgt=_write(tmp_path / "t.de", tgt),
                     valid_src=parallel_files[0], valid_tgt=parallel_files[1], vocab_size=200, max_length=12,
                     max_length_ratio=3.0, num_workers=0, cache_dir=str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    logs: list[str] = []
    data = prepare_translation_data(cfg, run_dir=run, log=logs.append)
    train = data.train.report
    assert (train.read, train.empty, train.duplicate) == (12, 1, 6)
    assert train.too_long + train.bad_ratio == 2 and train.kept == len(data.train) == 3
    assert len(data.valid) == 3 and str(data.valid.tgt_text[1]) == PAIRS[1][1]
    assert json.loads((run / "data_report.json").read_text())["train"]["kept"] == 3
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert any("kept 3" in line for line in logs)

    batch = data.train.collate(np.array([0, 2]))
    tok = data.tokenizer
    ids = tok(PAIRS[0][1])["input_ids"]
    assert batch["labels"][0, :len(ids)].tolist() == ids
    assert batch["decoder_input_ids"][0, :len(ids)].tolist() == [0] + ids[:-1]
    assert batch["attention_mask"][0].sum() == len(tok(PAIRS[0][0])["input_ids"])
    assert (batch["labels"] == -100).eq(batch["decoder_attention_mask"] == 0).all()
    assert batch["sample_ids"].tolist() == [0, 2]
    assert data.valid.collate(np.array([0]))["sample_ids"].tolist() == [3]  # offset past train ids

    # Second run: everything comes from the cache (no log lines); a changed filter rebuilds.
    logs.clear()
    again = prepare_translation_data(cfg, run_dir=run, log=logs.append)
    assert logs == [] and np.array_equal(again.train.src.values, data.train.src.values)
    cfg.max_length = 40
    prepare_translation_data(cfg, run_dir=run, log=logs.append)
    assert len(logs) == 1 and "train" in logs[0]


def test_empty_batch_collates():
    from moetrain.data.pipeline import RaggedIds, collate_pairs

    ids = RaggedIds.from_lists([[5, 6, 1], [7, 1]])
    batch = collate_pairs(ids, ids, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert batch["input_ids"].shape == (0, 1) and batch["labels"].shape == (0, 1)
