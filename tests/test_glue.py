"""GLUE: metrics, the local and Hub data formats, bad files, fine-tuning from random and pretrained weights."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
import torch

from moetrain.config import load_config
from moetrain.data.glue import GLUE_TASKS, GlueDataError, load_glue, load_glue_file
from moetrain.data.text import TextDataError, synthetic_documents, train_text_tokenizer
from moetrain.eval.glue_metrics import accuracy, f1_binary, glue_metrics, matthews_corrcoef, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"


# --- metrics -------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # tp 2, fp 1, fn 1, tn 2
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 2 - 1 * 1) / (3 * 3 * 3 * 3) ** 0.5)
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction
    assert matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert f1_binary([0, 0], [0, 0]) == 0.0
    mrpc = glue_metrics("mrpc", preds, labels)
    assert set(mrpc) == {"accuracy", "f1", "f1_acc_mean"}
    assert set(glue_metrics("cola", preds, labels)) == {"accuracy", "mcc"}
    with pytest.raises(ValueError, match="predictions for"):
        accuracy([1], [1, 0])


def test_summarize_gives_mean_and_spread():
    s = summarize([{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.6}])["accuracy"]
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.7, 3)


# --- data formats ------------------------------------------------------------------------------


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding=encoding)
    return path


def test_local_formats_as_released(tmp_path):
    mrpc = write(tmp_path / "mrpc.tsv", """
        Quality\t#1 ID\t#2 ID\t#1 String\t#2 String
        1\t11\t12\tHe said "yes.\tHe agreed.
        0\t13\t14\tThe stock fell.\tRain is wet.
    """, encoding="utf-8-sig")  # BOM and an unbalanced quote, as in the GLUE files
    ds = load_glue_file(GLUE_TASKS["mrpc"], mrpc)
    assert ds["label"] == [1, 0] and ds[0]["text_a"] == 'He said "yes.' and ds[0]["text_b"] == "He agreed."

    cola = write(tmp_path / "cola.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    ds = load_glue_file(GLUE_TASKS["cola"], cola)
    assert ds["label"] == [1, 0] and ds["text_a"] == ["The cat sat.", "Cat the sat."]

    rte = tmp_path / "rte.jsonl"
    rte.write_text("\n".join(json.dumps(r) for r in [
        {"premise": "A dog runs.", "hypothesis": "An animal runs.", "label": "entailment", "idx": 0},
        {"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "label": "not_entailment", "idx": 1}]) + "\n")
    ds = load_glue_file(GLUE_TASKS["rte"], rte)
    assert ds["label"] == [0, 1] and ds[1]["text_b"] == "A cat sleeps."

    glue_rte = write(tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n")
    assert load_glue_file(GLUE_TASKS["rte"], glue_rte)["label"] == [1]

    sst = write(tmp_path / "sst.tsv", "sentence\tlabel\nit 's great . \t1\nbad \t0\n")
    assert load_glue_file(GLUE_TASKS["sst2"], sst)["label"] == [1, 0]


@pytest.mark.parametrize("task,path,rows,positives", [
    ("rte", "glue-rte/val.jsonl", 277, 131), ("mrpc", "glue-mrpc/dev.tsv", 408, 279),
    ("cola", "glue-cola/in_domain_dev.tsv", 527, 365), ("sst2", "glue-sst2/dev.tsv", 872, 444)])
def test_shared_glue_files_parse(task, path, rows, positives):
    if not (SHARED / path).is_file():
        pytest.skip(f"{SHARED / path} not present")
    ds = load_glue_file(GLUE_TASKS[task], SHARED / path)
    assert len(ds) == rows and sum(ds["label"]) == positives  # counts from the PROVENANCE files


def test_bad_glue_files_name_the_file_and_the_expectation(tmp_path):
    no_label = write(tmp_path / "nolabel.tsv", "sentence1\tsentence2\nA\tB\n")
    with pytest.raises(GlueDataError, match=r"nolabel\.tsv: missing column\(s\) \['label'\] for rte.*expected"):
        load_glue_file(GLUE_TASKS["rte"], no_label)
    jsonl = tmp_path / "nohyp.jsonl"
    jsonl.write_text(json.dumps({"premise": "A", "label": "entailment"}) + "\n")
    with pytest.raises(GlueDataError, match=r"nohyp\.jsonl:1: missing column\(s\) \['sentence2'\]"):
        load_glue_file(GLUE_TASKS["rte"], jsonl)
    unknown = write(tmp_path / "unknown.tsv", "sentence\tlabel\ngood\t1\nmeh\tneutral\n")
    with pytest.raises(GlueDataError, match=r"unknown\.tsv:3: unknown sst2 label 'neutral'; expected one of "
                                            r"0/negative, 1/positive"):
        load_glue_file(GLUE_TASKS["sst2"], unknown)
    out_of_range = write(tmp_path / "range.tsv", "sentence\tlabel\ngood\t2\n")
    with pytest.raises(GlueDataError, match="unknown sst2 label '2'"):
        load_glue_file(GLUE_TASKS["sst2"], out_of_range)
    short = write(tmp_path / "short.tsv", "gj04\t1\t\tFine.\ngj04\t0\n")
    with pytest.raises(GlueDataError, match="the first row|short.tsv:2: 2 tab-separated field"):
        load_glue_file(GLUE_TASKS["cola"], short)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("sentence\tlabel\ncaf\u00e9\t1\n".encode("latin-1"))
    with pytest.raises(GlueDataError, match=r"latin\.tsv: not valid UTF-8"):
        load_glue_file(GLUE_TASKS["sst2"], latin)
    with pytest.raises(GlueDataError, match=r"absent\.tsv: no such file"):
        load_glue_file(GLUE_TASKS["sst2"], tmp_path / "absent.tsv")


def test_hub_code_path_on_a_local_directory_in_hub_schema(tmp_path):
    hub = tmp_path / "glue_rte"
    hub.mkdir()
    for split, n in (("train", 6), ("validation", 3)):
        rows = [{"sentence1": f"premise {i}", "sentence2": f"hypothesis {i}", "label": i % 2, "idx": i}
                for i in range(n)]
        (hub / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec, train, dev = load_glue("rte", "hub", hub_name=str(hub), cache_dir=str(tmp_path / "cache"))
    assert (len(train), len(dev)) == (6, 3) and train["label"] == [0, 1, 0, 1, 0, 1]
    assert train[2]["text_a"] == "premise 2" and dev[1]["text_b"] == "hypothesis 1"
    (hub / "validation.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 7}) + "\n")
    with pytest.raises(GlueDataError, match=r"glue_rte \(split validation\) row 0: unknown rte label 7"):
        load_glue("rte", "hub", hub_name=str(hub), cache_dir=str(tmp_path / "cache2"))


# --- fine-tuning ---------------------------------------------------------------------------------

POSITIVE, NEGATIVE = ["wonderful", "great", "lovely", "superb"], ["terrible", "awful", "boring", "dreadful"]


def sentiment_file(path: Path, n: int, seed: int) -> Path:
    """SST-2-format rows: a grammar sentence with one sentiment word somewhere; 60% positive."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for doc in synthetic_documents(n, seed):
        words = doc.split(".")[0].lower().split()
        label = int(rng.random() < 0.6)
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        lines.append(f"{' '.join(words)} .\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


RECIPE = """
name: glue-test
task: glue
model: {{arch: encoder, vocab_size: 320, d_model: 32, d_ff: 64, d_kv: 16, num_heads: 2, num_layers: 2,
        dropout_rate: 0.0}}
moe: {{num_experts: 4, estimator: switch}}
data: {{vocab_size: 320}}
glue: {{task: sst2, source: files, train_file: {train}, dev_file: {dev}, num_seeds: 2, lr: 2e-3, epochs: 3,
        batch_size: 16, max_length: 32, pooling: mean}}
"""


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    train, dev = sentiment_file(root / "train.tsv", 400, 1), sentiment_file(root / "dev.tsv", 150, 2)
    recipe = root / "glue.yaml"
    recipe.write_text(RECIPE.format(train=train, dev=dev))
    return recipe


def test_finetune_from_random_init_beats_the_majority_class(sentiment, tmp_path):
    from moetrain import cli

    out = tmp_path / "run"
    assert cli.main(["finetune", str(sentiment), "--output-dir", str(out)]) == 0
    report = json.loads((out / "glue_results.json").read_text())
    assert report["main_metric"] == "accuracy" and len(report["runs"]) == 2
    majority = report["majority_baseline"]["accuracy"]
    assert 0.5 < majority < 0.75
    assert report["summary"]["accuracy"]["mean"] > majority + 0.15, report["summary"]
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # trained on the task's text
    assert len(report["runs"][0]["epochs"]) == 3


@pytest.fixture(scope="module")
def checkpoint(sentiment, tmp_path_factory):
    """A portable ELECTRA checkpoint (untrained weights), as the trainer writes it."""
    from moetrain.checkpoint_format import save_portable
    from moetrain.models.electra import ElectraModel

    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(sentiment, ["task=electra"])
    texts = [synthetic_documents(200, seed=4), [f"{w} ." for w in POSITIVE + NEGATIVE] * 5]
    train_text_tokenizer(texts, 320, root / "tokenizer")
    torch.manual_seed(0)
    model = ElectraModel(cfg.model, cfg.moe, generator_width_fraction=0.5)
    save_portable(model.state_dict(), cfg, root / "tokenizer", root / "portable")
    return root, model


def test_finetune_starts_from_the_checkpoint_and_exports(sentiment, checkpoint, tmp_path):
    from transformers import SwitchTransformersEncoderModel

    from moetrain.tasks.glue import finetune, load_start_point

    root, model = checkpoint
    cfg = load_config(sentiment, [f"glue.pretrained={root / 'portable'}", "glue.num_seeds=1", "glue.epochs=1",
                                  "glue.export_hf=true"])
    start = load_start_point(cfg, tmp_path)
    want = model.discriminator.state_dict()
    assert start.encoder_state.keys() == want.keys()
    assert all(torch.equal(start.encoder_state[k], want[k]) for k in want)
    report = finetune(cfg, tmp_path / "run", log=lambda *_: None)
    assert report["start"].startswith("pretrained")
    hf = SwitchTransformersEncoderModel.from_pretrained(str(tmp_path / "run" / "hf"))
    assert hf.config.num_experts == 4
    assert (tmp_path / "run" / "hf" / "moetrain_heads.safetensors").is_file()

    random_cfg = load_config(sentiment, [f"glue.pretrained={root / 'portable'}", "glue.random_init=true"])
    assert load_start_point(random_cfg, tmp_path).encoder_state is None


def test_a_vocabulary_that_does_not_match_the_checkpoint_is_refused(sentiment, checkpoint, tmp_path):
    from moetrain.tasks.glue import load_start_point

    root, _ = checkpoint
    train_text_tokenizer([synthetic_documents(100, seed=8)], 150, tmp_path / "other")
    cfg = load_config(sentiment, [f"glue.pretrained={root / 'portable'}", f"data.tokenizer={tmp_path / 'other'}"])
    with pytest.raises(TextDataError, match=r"other: vocabulary does not match the checkpoint's tokenizer"):
        load_start_point(cfg, tmp_path)


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("adafactor", torch.optim.Adafactor)])
def test_finetune_optimizer_and_lr_scale_reach_the_parameter_groups(sentiment, name, kind):
    """glue.optimizer picks the class; glue.lr_scale gives the embedding its own rate, which the
    schedule scales like every other group's (so warmup and decay keep the ratio)."""
    from moetrain.models.electra import SequenceClassifier
    from moetrain.models.switch import SwitchEncoderModel
    from moetrain.tasks.glue import _optimizer

    cfg = load_config(sentiment, [f"glue.optimizer={name}", "glue.lr=1e-3", "glue.lr_scale={\"embed\": 10}"])
    model = SequenceClassifier(SwitchEncoderModel(cfg.model, cfg.moe), 2)
    opt, sched = _optimizer(model, cfg.glue, total=10, warmup=2)
    assert type(opt) is kind
    embed = model.backbone.embed.weight
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(embed)] == pytest.approx(10 * rate[id(model.head.out.weight)])
    assert rate[id(model.head.out.weight)] == pytest.approx(1e-3 * 0.5)  # warmup step 0 of 2
    opt.step()  # no gradients: changes nothing, keeps the scheduler's call order
    sched.step()
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(embed)] == pytest.approx(1e-2) and rate[id(model.head.out.weight)] == pytest.approx(1e-3)


def test_finetune_config_errors_name_the_key(sentiment):
    from moetrain.utils.dataclass_yaml import ConfigError

    with pytest.raises(ConfigError, match="glue.optimizer"):
        load_config(sentiment, ["glue.optimizer=sgd"])
    with pytest.raises(ConfigError, match=r"glue.lr_scale.embed.*> 0"):
        load_config(sentiment, ["glue.lr_scale={\"embed\": 0}"])
