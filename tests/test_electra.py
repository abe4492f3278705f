"""ELECTRA pretraining: text pipeline, masking, model, trainer run, resume, export, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moetrain import config as C
from moetrain.config import ConfigError, load_config
from moetrain.data.text import (
    TextDataError,
    TextSource,
    batch_plan,
    check_text_file,
    clean_line,
    load_text,
    mask_tokens,
    pack_sequences,
    synthetic_documents,
    train_text_tokenizer,
    write_synthetic_corpus,
)
from moetrain.models.electra import ElectraModel

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "configs" / "electra_tiny.yaml"

# A smaller model than configs/electra_tiny.yaml, so a few hundred steps take seconds.
TEST_OVERRIDES = [
    "model.d_model=32", "model.d_ff=64", "model.num_heads=2", "model.vocab_size=320", "data.vocab_size=320",
    "electra.seq_length=32", "electra.batch_size=16", "electra.valid_sequences=48", "train.optimizer=adamw",
    "train.schedule=inverse_sqrt",
    "train.lr=3e-3", "train.warmup_steps=20", "train.log_every=20", "train.eval_every=120", "train.save_every=120",
    "train.keep_last=0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("text") / "corpus.txt", 1200, seed=3)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    raw = load_text(TextSource("files", train_files=str(corpus)), str(tmp_path_factory.mktemp("cache")))
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = train_text_tokenizer([[clean_line(t) for t in raw["text"] if t.strip()]], 320, path)
    tok.path = path
    return tok


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [C.ElectraConfig, C.GlueConfig])
def test_every_new_field_has_a_docstring(cls):
    docs = C.field_docs(cls)
    assert not [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]


def test_electra_config_rules(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("task: electra\nelectra: {source: files}\nmodel: {arch: encoder}\n")
    with pytest.raises(ConfigError, match="electra.train_files"):
        load_config(path)
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(TINY, ["model.arch=encoder_decoder"])
    with pytest.raises(ConfigError, match="electra.mask_prob"):
        load_config(TINY, ["electra.mask_prob=1.5"])
    cfg = load_config(TINY)
    assert cfg.electra.rtd_weight == 50.0 and cfg.electra.mask_prob == 0.15


# --- text pipeline ---------------------------------------------------------------------------


def test_clean_line():
    assert clean_line("  a  1 @,@ 000 @-@ year\x00 old \u200b ") == "a 1,000-year old"
    assert clean_line(" \t ") == ""


def test_synthetic_text_is_deterministic():
    assert synthetic_documents(5, seed=1) == synthetic_documents(5, seed=1) != synthetic_documents(5, seed=2)


def test_pack_sequences_and_cache(corpus, tokenizer, tmp_path):
    cache = str(tmp_path / "cache")
    raw = load_text(TextSource("files", train_files=str(corpus)), cache)
    packed = pack_sequences(raw, tokenizer, 32, row_is_document=False)
    seqs = packed["input_ids"]
    assert len(seqs) > 100 and all(8 <= len(s) <= 32 for s in seqs)
    assert all(s[0] == tokenizer.cls_token_id and s[-1] == tokenizer.sep_token_id for s in seqs)
    assert sum(len(s) == 32 for s in seqs) > 0.9 * len(seqs)  # packed, not one sentence per row
    inner_seps = sum(s[1:-1].count(tokenizer.sep_token_id) for s in seqs)
    assert inner_seps > 0  # document boundaries (blank lines) are marked
    again = pack_sequences(load_text(TextSource("files", train_files=str(corpus)), cache), tokenizer, 32, False)
    assert again.cache_files == packed.cache_files  # second run reads the cached Arrow file


def test_batch_plan_shards_and_resumes():
    n, b, world = 103, 4, 3
    per_epoch = n // (b * world)
    plans = [list(zip(range(2 * per_epoch), batch_plan(n, b, r, world, seed=5))) for r in range(world)]
    epoch0 = np.concatenate([rows for r in range(world) for _, (e, rows, _) in plans[r] if e == 0])
    assert len(epoch0) == len(set(epoch0.tolist())) == per_epoch * b * world  # disjoint, no repeats
    ids = np.concatenate([sids for r in range(world) for _, (_, _, sids) in plans[r]])
    assert len(ids) == len(set(ids.tolist()))  # sample ids unique across epochs
    resumed = list(zip(range(3), batch_plan(n, b, 1, world, seed=5, start_step=per_epoch - 1)))
    for (_, got), (_, want) in zip(resumed, plans[1][per_epoch - 1:per_epoch + 2]):
        assert got[0] == want[0] and np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    with pytest.raises(TextDataError, match="fewer than one global batch"):
        next(batch_plan(5, 4, 0, 2, seed=0))


def test_mask_tokens_counts_and_determinism():
    ids = torch.randint(5, 300, (6, 40))
    ids[:, 0], ids[:, -1] = 3, 1
    ids[5, 20:] = 0
    candidates = (ids > 4)
    sample_ids = torch.arange(100, 106)
    masked, labels = mask_tokens(ids, candidates, sample_ids, mask_prob=0.15, mask_token_prob=0.85, mask_id=4, seed=7)
    picked = labels >= 0
    assert torch.equal(picked.sum(1), (candidates.sum(1).float() * 0.15).round().long())
    assert not (picked & ~candidates).any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    share = (masked[picked] == 4).float().mean()
    assert 0.6 < share <= 1.0
    # Row 2 alone, with the same sample id, is masked the same way (batch composition is irrelevant).
    m2, l2 = mask_tokens(ids[2:3], candidates[2:3], sample_ids[2:3], mask_prob=0.15, mask_token_prob=0.85,
                         mask_id=4, seed=7)
    assert torch.equal(m2[0], masked[2]) and torch.equal(l2[0], labels[2])


# --- model ---------------------------------------------------------------------------------


def tiny_model(**kwargs) -> ElectraModel:
    cfg = load_config(TINY, TEST_OVERRIDES)
    torch.manual_seed(0)
    return ElectraModel(cfg.model, cfg.moe, generator_width_fraction=0.5, **kwargs)


def test_model_shares_embeddings_and_does_not_backprop_through_sampling():
    model = tiny_model()
    assert not [n for n, _ in model.generator.named_parameters() if "embed" in n]  # shared, not copied
    ids = torch.randint(5, 300, (4, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3:6] = ids[:, 3:6]
    ids[:, 3:6] = 4
    out = model(ids, torch.ones_like(ids), labels, torch.arange(4))
    assert out.mlm_logits.shape == (12, 320) and out.rtd_logits.shape == (4, 16)
    assert not out.sampled.requires_grad
    F.binary_cross_entropy_with_logits(out.rtd_logits, out.rtd_labels).backward()
    gen_grads = [p.grad for n, p in model.generator.named_parameters()]
    assert all(g is None or not g.any() for g in gen_grads)  # RTD does not reach the generator
    assert model.discriminator.embed.weight.grad is not None
    model.zero_grad()
    out = model(ids, torch.ones_like(ids), labels, torch.arange(4))
    F.cross_entropy(out.mlm_logits, out.mlm_labels).backward()
    assert model.generator.head_dense.weight.grad.abs().sum() > 0
    assert model.discriminator.embed.weight.grad.abs().sum() > 0  # MLM trains the shared embedding too
    # Replacement labels: 1 exactly where the sample differs from the original.
    corrupted_differs = out.sampled != out.mlm_labels
    assert torch.equal(out.rtd_labels[labels >= 0].bool(), corrupted_differs)


def test_switch_generator_gets_its_own_moe_layers():
    model = tiny_model(generator_moe=True)
    assert model.moe_layer_names == ["discriminator.encoder.1", "generator.encoder.1"]
    ids = torch.randint(5, 300, (2, 8))
    labels = torch.where(torch.arange(8) % 4 == 1, ids, torch.full_like(ids, -100))
    assert len(model(ids, torch.ones_like(ids), labels).moe_stats) == 2


# --- bad input -------------------------------------------------------------------------------


def test_empty_blank_and_non_utf8_files_are_named(tmp_path):
    empty, blank, latin = tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "latin1.txt"
    empty.write_bytes(b"")
    blank.write_bytes(b"  \n\n \t\n")
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(TextDataError, match=r"empty\.txt: file is empty; expected UTF-8"):
        check_text_file(empty)
    with pytest.raises(TextDataError, match=r"blank\.txt: file holds only whitespace"):
        check_text_file(blank)
    with pytest.raises(TextDataError, match=r"latin1\.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        load_text(TextSource("files", train_files=f"{empty.parent}/latin*.txt"))
    with pytest.warns(UserWarning, match=r"latin1\.txt: 1 byte\(s\) are not UTF-8"):
        ds = load_text(TextSource("files", train_files=str(latin), encoding_errors="replace"), str(tmp_path / "c"))
    assert ds["text"] == ["caf\ufffd au lait"]
    with pytest.raises(TextDataError, match=r"nothing-\*\.txt: no such file"):
        load_text(TextSource("files", train_files=str(tmp_path / "nothing-*.txt")))


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, corpus, tokenizer):
    from moetrain.tasks.electra import ElectraTask

    cfg = load_config(TINY, TEST_OVERRIDES + ["model.vocab_size=100", "data.vocab_size=100",
                                              f"data.tokenizer={tokenizer.path}",
                                              "electra.source=files", f"electra.train_files={corpus}",
                                              f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(TextDataError, match=r"tokenizer has \d+ tokens but the model has 100 embedding rows"):
        ElectraTask(cfg, tmp_path / "run")


# --- pretraining through the trainer -----------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """240 steps of `moetrain train` on local text; checkpoints at 120 and 240."""
    from moetrain import cli

    out = tmp_path_factory.mktemp("electra") / "run"
    overrides = TEST_OVERRIDES + ["electra.source=files", f"electra.train_files={corpus}", "train.max_steps=240",
                                  f"data.cache_dir={out.parent / 'cache'}"]
    assert cli.main(["train", str(TINY), "--output-dir", str(out), "--set", *overrides]) == 0
    return out, overrides


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_rtd_accuracy_rises_above_the_all_original_baseline(pretrained):
    run, _ = pretrained
    train = records(run, "train")
    assert {"mlm_loss", "rtd_loss", "rtd_accuracy", "rtd_baseline_accuracy", "balance_loss"} <= set(train[-1])
    final = records(run, "eval")[-1]
    assert final["step"] == 240
    assert final["rtd_accuracy"] > final["rtd_baseline_accuracy"] + 0.03, final
    assert final["mlm_loss"] < train[0]["mlm_loss"] - 1.0  # the generator learns too
    assert (run / "checkpoints" / "step_00000240" / "portable" / "tokenizer" / "tokenizer.json").is_file()


def test_resume_reproduces_the_same_losses(pretrained):
    from moetrain import cli

    run, overrides = pretrained
    resumed = run.parent / "resumed"
    args = overrides + ["train.max_steps=180", f"train.resume={run / 'checkpoints' / 'step_00000120'}"]
    assert cli.main(["train", str(TINY), "--output-dir", str(resumed), "--set", *args]) == 0
    want = {r["step"]: r for r in records(run, "train")}
    got = records(resumed, "train")
    assert [r["step"] for r in got] == [140, 160, 180]
    for r in got:
        for key in ("loss", "mlm_loss", "rtd_loss", "rtd_accuracy"):
            assert r[key] == pytest.approx(want[r["step"]][key], rel=1e-6, abs=1e-7), (r["step"], key)


def test_resume_with_another_vocabulary_is_refused(pretrained, tmp_path):
    from moetrain.tasks.electra import ElectraTask

    run, overrides = pretrained
    train_text_tokenizer([["zebra yak quokka"] * 50, synthetic_documents(50, seed=9)], 200, tmp_path / "other")
    cfg = load_config(TINY, overrides + [f"train.resume={run / 'checkpoints' / 'step_00000120'}",
                                         f"data.tokenizer={tmp_path / 'other'}"])
    with pytest.raises(TextDataError, match="vocabulary does not match the checkpoint's tokenizer"):
        ElectraTask(cfg, tmp_path / "run")


def test_export_discriminator_to_hf(pretrained, tmp_path, capsys):
    from safetensors.torch import load_file

    from moetrain import cli

    run, _ = pretrained
    # `moetrain export` of an ELECTRA run exports the discriminator, never the generator.
    assert cli.main(["export", str(run), "--out", str(tmp_path / "hf"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "generator left out" in out and float(out.rsplit("max |moetrain - HF| = ", 1)[1]) < 1e-4
    heads = load_file(str(tmp_path / "hf" / "moetrain_heads.safetensors"))
    assert set(heads) == {"rtd_head.dense.weight", "rtd_head.dense.bias", "rtd_head.out.weight", "rtd_head.out.bias"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.mask_token == "[MASK]" and tok.pad_token_id == 0
