"""GLUE classification data from the Hub (through ``datasets``) or local TSV / JSON-lines files.

    spec = GLUE_TASKS["mrpc"]
    train = load_glue_file(spec, "../shared/data/glue-mrpc/train.tsv")     # columns text_a, text_b, label
    dev = load_glue_hub(spec, "nyu-mll/glue", "validation")

Every source is normalised to the Hub schema's meaning: columns ``text_a`` (and ``text_b``
for pair tasks) and an integer ``label`` whose ids follow the Hub's ``ClassLabel`` order
(RTE: 0 entailment, 1 not_entailment; MRPC: 0 not_equivalent, 1 equivalent; ...).

Local formats, as released:

* GLUE TSV with a header (``sentence1``/``sentence2``/``label``, MRPC's ``#1 String``/
  ``#2 String``/``Quality``, MNLI's ``gold_label``, ...). Read as UTF-8 with an optional
  BOM (MRPC's files start with one) and with quoting disabled (MRPC has unbalanced quotes);
* CoLA's header-less TSV (source, label, original mark, sentence);
* JSON lines, e.g. SuperGLUE/jiant RTE (``premise``, ``hypothesis``, ``label`` as strings).

Labels may be ids (``0``/``1``) or names (``entailment``). A missing column or an unknown
label raises :class:`GlueDataError` naming the file (and line) and what was expected.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetrain.utils.errors import UserError

__all__ = ["GlueDataError", "GlueTaskSpec", "GLUE_TASKS", "load_glue", "load_glue_file", "load_glue_hub"]


class GlueDataError(UserError, ValueError):
    """A GLUE file or dataset that does not fit the task; the message names it."""


@dataclass(frozen=True)
class GlueTaskSpec:
    """How one GLUE task looks in every source.

    Attributes:
        name: the task (also the Hub configuration name).
        text_columns: Hub names of the text columns (one, or two for pair tasks).
        label_names: class names in Hub id order.
        dev_split: the Hub split used as dev (MNLI: ``validation_matched``).
        aliases: other accepted names per Hub text column (local formats).
        label_columns: accepted names of the label column.
        headerless: ``(text column indices, label index, number of columns)`` of a header-less
            TSV (CoLA), or None.
    """

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    dev_split: str = "validation"
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    label_columns: tuple[str, ...] = ("label",)
    headerless: tuple[tuple[int, ...], int, int] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2


GLUE_TASKS: dict[str, GlueTaskSpec] = {
    "rte": GlueTaskSpec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                        aliases={"sentence1": ("premise",), "sentence2": ("hypothesis",)}),
    "mrpc": GlueTaskSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                         aliases={"sentence1": ("#1 String",), "sentence2": ("#2 String",)},
                         label_columns=("label", "Quality")),
    "sst2": GlueTaskSpec("sst2", ("sentence",), ("negative", "positive")),
    "cola": GlueTaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), headerless=((3,), 1, 4)),
    "qnli": GlueTaskSpec("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    "qqp": GlueTaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"),
                        label_columns=("label", "is_duplicate")),
    "mnli": GlueTaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                         dev_split="validation_matched",
                         aliases={"premise": ("sentence1",), "hypothesis": ("sentence2",)},
                         label_columns=("label", "gold_label")),
    "wnli": GlueTaskSpec("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
}


def _expected(spec: GlueTaskSpec) -> str:
    cols = [" or ".join(repr(n) for n in (c, *spec.aliases.get(c, ()))) for c in spec.text_columns]
    label = " or ".join(repr(n) for n in spec.label_columns)
    layout = ""
    if spec.headerless is not None:
        layout = f", or the header-less {spec.headerless[2]}-column {spec.name.upper()} layout"
    return f"columns {', '.join(cols)} and {label}{layout}"


def _label_id(value: Any, spec: GlueTaskSpec, where: str) -> int:
    """A label id from an id (int or digit string) or a class name."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int) and 0 <= value < spec.num_labels:
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) < spec.num_labels:
            return int(text)
        if text in spec.label_names:
            return spec.label_names.index(text)
    names = ", ".join(f"{i}/{n}" for i, n in enumerate(spec.label_names))
    raise GlueDataError(f"{where}: unknown {spec.name} label {value!r}; expected one of {names}")


def _column_map(names: list[str], spec: GlueTaskSpec, where: str) -> tuple[list[str], str]:
    """Which of ``names`` hold the text columns and the label; GlueDataError if any is missing."""
    texts, missing = [], []
    for col in spec.text_columns:
        found = next((n for n in (col, *spec.aliases.get(col, ())) if n in names), None)
        texts.append(found)
        if found is None:
            missing.append(col)
    label = next((n for n in spec.label_columns if n in names), None)
    if label is None:
        missing.append(spec.label_columns[0])
    if missing:
        raise GlueDataError(f"{where}: missing column(s) {missing} for {spec.name}; found {names}; "
                            f"expected {_expected(spec)}")
    return texts, label


def _to_dataset(rows: list[tuple[list[str], int]], spec: GlueTaskSpec):
    import datasets

    data = {"text_a": [r[0][0] for r in rows]}
    if spec.is_pair:
        data["text_b"] = [r[0][1] for r in rows]
    data["label"] = [r[1] for r in rows]
    return datasets.Dataset.from_dict(data)


def _read_jsonl(path: Path, spec: GlueTaskSpec) -> list[tuple[list[str], int]]:
    rows, columns = [], None
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GlueDataError(f"{where}: not valid JSON ({err.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise GlueDataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            if columns is None or any(c not in record for c in (*columns[0], columns[1])):
                columns = _column_map(list(record), spec, where)
            texts, label = columns
            rows.append(([str(record[c]) for c in texts], _label_id(record[label], spec, where)))
    return rows


def _read_tsv(path: Path, spec: GlueTaskSpec) -> list[tuple[list[str], int]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        table = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    table = [row for row in table if any(cell.strip() for cell in row)]
    if not table:
        raise GlueDataError(f"{path}: no rows; expected a TSV with {_expected(spec)}")
    header = table[0]
    known = {c for col in spec.text_columns for c in (col, *spec.aliases.get(col, ()))} | set(spec.label_columns)
    if known & set(header):
        texts, label = _column_map(header, spec, str(path))
        idx_text, idx_label, first = [header.index(c) for c in texts], header.index(label), 1
    elif spec.headerless is not None and len(header) == spec.headerless[2]:
        (idx_text, idx_label, _), first = (list(spec.headerless[0]), spec.headerless[1], None), 0
    else:
        raise GlueDataError(f"{path}: missing column(s): the first row {header[:6]} is not a {spec.name} header; "
                            f"expected {_expected(spec)}")
    need = max(*idx_text, idx_label) + 1
    rows = []
    for lineno, row in enumerate(table[first:], first + 1):
        where = f"{path}:{lineno}"
        if len(row) < need:
            raise GlueDataError(f"{where}: {len(row)} tab-separated field(s), expected at least {need} "
                                f"({_expected(spec)})")
        rows.append(([row[i] for i in idx_text], _label_id(row[idx_label], spec, where)))
    return rows


def load_glue_file(spec: GlueTaskSpec, path: str | os.PathLike):
    """A local GLUE file (``.jsonl``/``.json``: JSON lines; anything else: TSV) as a Dataset.

    Raises:
        GlueDataError: missing file, not UTF-8, missing columns, unknown labels, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise GlueDataError(f"{path}: no such file; expected a {spec.name} TSV or JSON-lines file")
    try:
        rows = _read_jsonl(path, spec) if path.suffix in (".jsonl", ".json") else _read_tsv(path, spec)
    except UnicodeDecodeError as err:
        raise GlueDataError(f"{path}: not valid UTF-8 (byte offset {err.start}); expected UTF-8 text") from None
    if not rows:
        raise GlueDataError(f"{path}: no examples; expected {_expected(spec)}")
    return _to_dataset(rows, spec)


def load_glue_hub(spec: GlueTaskSpec, hub_name: str, split: str, cache_dir: str | None = None):
    """One split from the Hub (``hub_name`` with configuration ``spec.name``) as a Dataset.

    ``hub_name`` may be a local dataset directory in the Hub schema (e.g. ``train.jsonl`` and
    ``validation.jsonl`` files); it is then loaded without a configuration name.
    """
    import datasets

    local = Path(hub_name).is_dir()
    args = [hub_name] if local else [hub_name, spec.name]
    try:
        ds = datasets.load_dataset(*args, split=split, cache_dir=cache_dir)
    except (ConnectionError, OSError) as err:
        if local:
            raise
        from moetrain.data.sources import hub_unreachable

        raise hub_unreachable(err, "glue.hub_name", hub_name, spec.name,
                              "glue.source: files with glue.train_file and glue.dev_file "
                              "(configs/glue_rte.yaml does)") from err
    where = f"{hub_name} ({'' if local else spec.name + ', '}split {split})"
    texts, label = _column_map(ds.column_names, spec, where)
    rows = []
    for i, record in enumerate(ds):
        rows.append(([str(record[c]) for c in texts], _label_id(record[label], spec, f"{where} row {i}")))
    if not rows:
        raise GlueDataError(f"{where}: no examples")
    return _to_dataset(rows, spec)


def load_glue(task: str, source: str, *, hub_name: str = "nyu-mll/glue", train_file: str | None = None,
              dev_file: str | None = None, cache_dir: str | None = None):
    """``(spec, train, dev)`` for ``task`` from ``source`` (``hub`` or ``files``)."""
    if task not in GLUE_TASKS:
        raise GlueDataError(f"unknown GLUE task '{task}'; expected one of {', '.join(GLUE_TASKS)}")
    spec = GLUE_TASKS[task]
    if source == "files":
        if train_file is None or dev_file is None:
            raise GlueDataError("glue.source 'files' needs glue.train_file and glue.dev_file")
        return spec, load_glue_file(spec, train_file), load_glue_file(spec, dev_file)
    if source == "hub":
        return spec, load_glue_hub(spec, hub_name, "train", cache_dir), load_glue_hub(spec, hub_name, spec.dev_split,
                                                                                        cache_dir)
    raise GlueDataError(f"unknown GLUE source '{source}'; expected 'hub' or 'files'")
