"""The comma/glob file lists that data keys accept, and what each caller makes of a part naming nothing."""

from __future__ import annotations

import pytest

from moetrain.data.sources import DataError, expand_paths
from moetrain.data.text import TextDataError, expand_files
from moetrain.utils.file_lists import expand_file_list


@pytest.fixture
def files(tmp_path):
    for name in ("b.en", "a.en", "c.de"):
        (tmp_path / name).write_text("x\n")
    return tmp_path


def test_globs_expand_sorted_and_plain_parts_name_themselves(files):
    spec = f" {files}/*.en , ,{files}/c.de,{files}/missing.txt,{files}/*.fr"
    assert expand_file_list(spec) == [
        (f"{files}/*.en", [f"{files}/a.en", f"{files}/b.en"]),
        (f"{files}/c.de", [f"{files}/c.de"]),
        (f"{files}/missing.txt", [f"{files}/missing.txt"]),  # existence is the caller's question
        (f"{files}/*.fr", []),
    ]


def test_home_is_expanded(files, monkeypatch):
    monkeypatch.setenv("HOME", str(files))
    assert expand_file_list("~/*.en") == [("~/*.en", [f"{files}/a.en", f"{files}/b.en"])]


def test_each_caller_keeps_its_own_rule_for_a_part_naming_nothing(files):
    assert expand_paths(f"{files}/*.en,{files}/c.de") == [f"{files}/a.en", f"{files}/b.en", f"{files}/c.de"]
    with pytest.raises(DataError, match=r"\*\.fr: no file matches this pattern"):
        expand_paths(f"{files}/*.fr")
    assert [p.name for p in expand_files(f"{files}/*.en")] == ["a.en", "b.en"]
    with pytest.raises(TextDataError, match="missing.txt: no such file"):
        expand_files(f"{files}/missing.txt")
    with pytest.raises(TextDataError, match="is a directory"):
        expand_files(str(files))
