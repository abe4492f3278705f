"""The shipped real-data recipes start, train and stop at their time budget on the shared data.

The README shows ``moetrain train configs/multi30k_switch.yaml`` and ``configs/wmt_news_switch.yaml``;
each runs here as that command line with a tiny budget and a 16-sentence dev set (the full dev sets
take minutes of beam search). Skipped when ``../shared/data`` is absent (a user's clone).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import child_env

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

RECIPES = {
    "multi30k_switch.yaml": ("multi30k/val.en", "multi30k/val.de"),
    "wmt_news_switch.yaml": ("wmt-newstest2013/newstest2013.en", "wmt-newstest2013/newstest2013.de"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_until_its_time_budget(tmp_path, recipe):
    src, tgt = (SHARED / p for p in RECIPES[recipe])
    if not src.is_file():
        pytest.skip(f"{src} not found (shared data absent)")
    small = []
    for path in (src, tgt):
        lines = path.read_text(encoding="utf-8").split("\n")[:16]
        small.append(tmp_path / f"dev{path.suffix}")
        small[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "moetrain.cli", "train", f"configs/{recipe}", "--output-dir", str(run),
               "--set", f"data.valid_src={small[0]}", f"data.valid_tgt={small[1]}", "data.test_src=null",
               "data.test_tgt=null", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
               "train.max_minutes=0.002", "train.log_every=1", "train.max_decode_length=20"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "time budget train.max_minutes=0.002 spent after step" in proc.stdout + proc.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert 1 <= len(train) <= 3 and all(r["loss"] > 0 for r in train)  # stopped by the 0.12 s budget
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [train[-1]["step"]] and "bleu" in evals[0]
    state = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
                        / "trainer_state.json").read_text())
    assert state["step"] == train[-1]["step"] and state["train_seconds"] >= 0.12
