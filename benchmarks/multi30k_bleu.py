"""Multi30k En->De: train the Switch and the SparseMixer recipe, report test_2016_flickr BLEU.

    python benchmarks/multi30k_bleu.py                         # full recipes (60 minutes each: train.max_minutes)
    python benchmarks/multi30k_bleu.py --steps 300 --set train.eval_every=0   # a quick look
    python benchmarks/multi30k_bleu.py --estimators switch sparsemixer reinmax --json out.json

Each estimator trains in its own process (``moetrain train``, so DeepSpeed starts fresh), from
``configs/multi30k_<estimator>.yaml`` when that file exists and otherwise from the Switch recipe
with ``moe.estimator`` overridden. Then the last checkpoint translates test_2016_flickr with
beam search and sacreBLEU scores it. Without ``../shared/data/multi30k`` the script says so and
exits 0, so it can sit in a benchmark sweep on machines without the data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "multi30k"


def data_overrides(data: Path) -> list[str]:
    """``--set`` items that point a recipe at a Multi30k directory other than the default."""
    return [f"data.{split}_{side}={data / f'{name}.{lang}'}"
            for split, name in (("train", "train"), ("valid", "val"), ("test", "test_2016_flickr"))
            for side, lang in (("src", "en"), ("tgt", "de"))]


def train_and_score(estimator: str, out_root: Path, steps: int | None, overrides: list[str],
                    data: Path = DATA) -> dict:
    """Train one recipe in a subprocess, then score its last checkpoint on the test set."""
    from moetrain.eval.bleu import sacre_bleu
    from moetrain.data.sources import read_lines
    from moetrain.tasks.translation import Translator

    config = REPO / "configs" / f"multi30k_{estimator}.yaml"
    sets = list(overrides) + (data_overrides(data) if data != DATA else [])
    if not config.is_file():
        config = REPO / "configs" / "multi30k_switch.yaml"
        sets.append(f"moe.estimator={estimator}")
    if steps is not None:
        sets.append(f"train.max_steps={steps}")
    run = out_root / estimator
    command = [sys.executable, "-m", "moetrain.cli", "train", str(config), "--output-dir", str(run)]
    if sets:
        command += ["--set", *sets]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    train_seconds = time.perf_counter() - start

    translator, cfg = Translator.load(run)
    src, ref = read_lines(data / "test_2016_flickr.en"), read_lines(data / "test_2016_flickr.de")
    hyps = translator.translate(src, beam_size=cfg.train.beam_size, length_penalty=cfg.train.length_penalty,
                                max_length=cfg.train.max_decode_length, progress=False)
    bleu = sacre_bleu(hyps, ref)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    steps = json.loads((latest / "trainer_state.json").read_text())["step"]  # a time budget may end it early
    return {"estimator": estimator, "bleu": round(bleu.score, 2), "signature": bleu.signature,
            "steps": steps, "train_seconds": round(train_seconds, 1), "run_dir": str(run)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimators", nargs="+", default=["switch", "sparsemixer"])
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps of both recipes")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-multi30k"), help="run directories go here")
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    parser.add_argument("--data", type=Path, default=DATA,
                        help=f"Multi30k directory: train/val/test_2016_flickr .en/.de (default: {DATA})")
    args = parser.parse_args(argv)

    if not (args.data / "train.en").is_file():
        print(f"multi30k_bleu: skipped, no data at {args.data}")
        return 0
    results = [train_and_score(e, Path(args.out), args.steps, args.overrides, args.data) for e in args.estimators]
    print(f"\nMulti30k test_2016_flickr, En->De, sacreBLEU ({results[0]['signature']})")
    print(f"{'estimator':<16}{'BLEU':>8}{'steps':>8}{'train s':>10}")
    for r in results:
        print(f"{r['estimator']:<16}{r['bleu']:>8.2f}{r['steps']:>8}{r['train_seconds']:>10.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
