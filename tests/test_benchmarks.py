"""The scripts under benchmarks/: they skip cleanly without data and run end to end on small files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_multi30k_skips_without_data(tmp_path, capsys):
    bench = _load("multi30k_bleu")
    assert bench.main(["--data", str(tmp_path / "absent")]) == 0
    assert "skipped, no data at" in capsys.readouterr().out


def test_multi30k_runs_both_estimators_on_local_files(tmp_path, capsys):
    """The Multi30k layout filled with generated pairs: both recipes train, translate, score."""
    from moetrain.data.synthetic import generate_pairs

    data = tmp_path / "m30k"
    data.mkdir()
    train_src, train_tgt, _ = generate_pairs(0, 200, "train")
    for name, split, n in (("train", "train", 200), ("val", "valid", 10), ("test_2016_flickr", "test", 12)):
        src, tgt, _ = generate_pairs(0, n, split, exclude=None if split == "train" else set(train_src))
        (data / f"{name}.en").write_text("".join(s + "\n" for s in src))
        (data / f"{name}.de").write_text("".join(t + "\n" for t in tgt))
    small = ["model.d_model=32", "model.d_ff=64", "model.d_kv=8", "model.num_layers=2", "model.num_decoder_layers=2",
             "model.vocab_size=640", "data.vocab_size=600", "data.num_workers=0", "data.max_tokens=512",
             "train.eval_every=0", "train.save_every=0", "train.beam_size=2", "train.max_decode_length=20",
             f"data.cache_dir={tmp_path / 'cache'}"]
    bench = _load("multi30k_bleu")
    out = tmp_path / "results.json"
    code = bench.main(["--data", str(data), "--steps", "3", "--out", str(tmp_path / "runs"), "--json", str(out),
                       "--set", *small])
    assert code == 0
    results = json.loads(out.read_text())
    assert [r["estimator"] for r in results] == ["switch", "sparsemixer"]
    for r in results:
        assert 0.0 <= r["bleu"] <= 100.0 and r["steps"] == 3 and "nrefs:1" in r["signature"]
        assert (Path(r["run_dir"]) / "checkpoints" / "latest").is_file()
    assert "Multi30k test_2016_flickr" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(p.stem for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_scripts_import(script):
    assert callable(_load(script).main)


def test_electra_glue_skips_without_data_and_rejects_unknown_tasks(tmp_path, capsys):
    bench = _load("electra_glue")
    assert bench.main(["--shared", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 0
    assert "electra_glue benchmark skipped" in capsys.readouterr().out
    assert bench.main(["--shared", str(tmp_path), "--tasks", "rte,qqp", "--out", str(tmp_path / "out")]) == 2
    assert "unknown task(s) ['qqp']" in capsys.readouterr().err


def test_electra_glue_quick_on_shared_data(tmp_path, capsys):
    """Pretraining with Adafactor under a time budget, then fine-tuning both inits on CoLA (MCC)."""
    shared = REPO.parent / "shared" / "data"
    if not (shared / "glue-cola").is_dir():
        pytest.skip("shared data absent")
    # Its own process, as users run it: in-process training would leave this process's
    # MASTER_PORT and process group behind for the tests that launch ranks later.
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/electra_glue.py", "--quick", "--tasks", "cola", "--minutes", "0.5",
                           "--curve-every", "10", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    steps = summary["pretraining"]["steps"]
    intermediate = {f"cola/step_{s:08d}" for s in range(10, steps, 10)}  # --curve-every 10; the final is "pretrained"
    assert steps <= 30 and set(summary["finetuning"]) == {"cola/pretrained", "cola/random"} | intermediate
    curve = (out / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,task,metric") and len(curve) == 2 + len(intermediate)
    assert curve[-1].startswith(f"{steps},cola,mcc,") and (out / "curve.png").stat().st_size > 0
    # A second invocation on the same --out resumes: nothing is retrained or re-fine-tuned.
    again = subprocess.run([sys.executable, "benchmarks/electra_glue.py", "--quick", "--tasks", "cola", "--minutes", "0.5",
                            "--curve-every", "10", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["pretraining"]["steps"] == steps and resumed["finetuning"] == summary["finetuning"]
    config = (out / "pretrain" / "config.yaml").read_text()
    assert "optimizer: adafactor" in config and "max_minutes: 0.5" in config
    text = (out / "results.md").read_text()
    assert "| COLA | mcc |" in text and "gain vs 2 std" in text
