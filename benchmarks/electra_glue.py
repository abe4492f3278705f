"""Does ELECTRA pretraining help? Small pretraining on shared text, then GLUE dev scores against random init.

    python benchmarks/electra_glue.py --out runs/bench-electra-glue --minutes 45    # the issue-10 measurement
    python benchmarks/electra_glue.py --out runs/bench --steps 400 --tasks rte,mrpc  # a shorter look
    python benchmarks/electra_glue.py --out /tmp/bench --quick                       # a 2-minute smoke run
    python benchmarks/electra_glue.py --out runs/curve --minutes 45 --curve-every 1000 # gain vs pretraining steps

1. Pretrain a small Switch ELECTRA (discriminator d=64, 4 layers, two 8-expert Switch layers;
   dense generator at half width) on the Gutenberg prose and WikiText-2 files in
   ``../shared/data`` (about 5.7 MB of text) with a WordPiece vocabulary of 8000, through the
   regular trainer (``moetrain.train.trainer.train``).
   Pretraining uses ``--optimizer`` (default Adafactor, relative step 1e-2, as the translation
   recipes: under AdamW T5's N(0, 1) tied embedding learns ~16x slower) for ``--steps`` steps or
   ``--minutes`` minutes (``train.max_minutes``), whichever ends first.
2. Fine-tune its discriminator on ``--tasks`` (RTE accuracy, MRPC F1/accuracy, SST-2 accuracy,
   CoLA MCC), and the same architecture with the same vocabulary from random weights, with
   identical settings and seeds (``moetrain.tasks.glue.finetune``).
3. Write ``results.json`` and ``results.md`` (a table) in ``--out`` and print the table.
   Rerunning with the same ``--out`` resumes: pretraining continues from its latest checkpoint
   (within the same time budget) and finished fine-tuning settings are read back, not rerun.
   With ``--curve-every N`` pretraining keeps a checkpoint every N steps and each one is
   fine-tuned as well: ``curve.csv`` and ``curve.png`` show the GLUE gain over random init
   against pretraining steps (where a small budget shows no gain yet, where it starts).

The shared data is read in place (never copied). When ``../shared/data`` (or ``--shared``)
lacks any of the inputs, the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: GLUE task -> (train file, dev file) under the shared data directory.
GLUE_FILES = {"rte": ("glue-rte/train.jsonl", "glue-rte/val.jsonl"),
              "mrpc": ("glue-mrpc/train.tsv", "glue-mrpc/dev.tsv"),
              "sst2": ("glue-sst2/train.tsv", "glue-sst2/dev.tsv"),
              "cola": ("glue-cola/in_domain_train.tsv", "glue-cola/in_domain_dev.tsv")}
#: The metrics shown per task (the first is the task's main metric).
SHOWN = {"rte": ["accuracy"], "mrpc": ["f1", "accuracy"], "sst2": ["accuracy"], "cola": ["mcc", "accuracy"]}
PRETRAIN_TEXT = ["gutenberg-nltk-prose", "wikitext-2-raw-valid-test"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "runs" / "bench-electra-glue"), help="output directory")
    p.add_argument("--shared", default=str(REPO_ROOT.parent / "shared" / "data"), help="shared data directory")
    p.add_argument("--steps", type=int, default=400, help="pretraining steps at most (default 400)")
    p.add_argument("--minutes", type=float, default=None, help="pretraining time budget (train.max_minutes)")
    p.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"],
                   help="pretraining optimizer (default adafactor)")
    p.add_argument("--pretrain-lr", type=float, default=None,
                   help="pretraining rate (default 1e-2 relative step for adafactor, 1e-3 for adamw)")
    p.add_argument("--tasks", default="rte,mrpc", help="comma-separated GLUE tasks of rte,mrpc,sst2,cola")
    p.add_argument("--max-train-examples", type=int, default=None,
                   help="cap each task's training set (SST-2 has 67k sentences)")
    p.add_argument("--batch-size", type=int, default=16, help="pretraining sequences per step (default 16)")
    p.add_argument("--seq-length", type=int, default=128, help="pretraining sequence length (default 128)")
    p.add_argument("--estimator", default="switch", help="router gradient estimator (default switch)")
    p.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds per setting (default 2)")
    p.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs (default 2)")
    p.add_argument("--ft-optimizer", default="adafactor", choices=["adafactor", "adamw"],
                   help="fine-tuning optimizer (default adafactor: plain adamw leaves the T5 embedding "
                        "untrained, docs/electra.md 'Fine-tuning protocol')")
    p.add_argument("--lr", type=float, default=None,
                   help="fine-tuning learning rate (default 1e-2 relative step for adafactor, 3e-4 for adamw)")
    p.add_argument("--pooling", default="mean", choices=["mean", "first"], help="sentence pooling (default mean)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadiest on a shared CPU)")
    p.add_argument("--curve-every", type=int, default=0,
                   help="also fine-tune the checkpoint of every N pretraining steps (gain-vs-steps curve)")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 300 training examples, 1 seed")
    return p.parse_args(argv)


def pretrain(args, out: Path, shared: Path):
    from moetrain.config import load_config, save_config
    from moetrain.train.trainer import train

    files = f"{shared}/gutenberg-nltk-prose/*.txt,{shared}/wikitext-2-raw-valid-test/wiki.*.raw"
    overrides = [
        "model.d_model=64", "model.d_ff=256", "model.d_kv=32", "model.num_heads=2", "model.num_layers=4",
        "model.vocab_size=8192", "moe.num_experts=8", f"moe.estimator={args.estimator}", "data.vocab_size=8000",
        f"data.cache_dir={out / 'cache'}", "electra.source=files", f"electra.train_files={files}",
        "electra.encoding_errors=replace",  # chesterton-ball.txt holds 5 Latin-1 bytes ("Bruneti\xe8re")
        f"electra.seq_length={args.seq_length}", f"electra.batch_size={args.batch_size}", "electra.valid_sequences=256",
        "electra.generator_width_fraction=0.5", f"train.max_steps={args.steps}", "train.log_every=25",
        "train.eval_every=0", f"train.save_every={args.curve_every}", f"train.keep_last={0 if args.curve_every else 1}",
        f"train.optimizer={args.optimizer}",
    ]
    if args.optimizer == "adafactor":  # T5's: relative step, constant; needs ZeRO-0
        overrides += [f"train.lr={args.pretrain_lr or 1e-2}", "train.warmup_steps=0", "train.schedule=constant",
                      "parallel.zero_stage=0"]
    else:
        overrides += [f"train.lr={args.pretrain_lr or 1e-3}", f"train.warmup_steps={max(1, args.steps // 10)}",
                      "train.schedule=linear"]
    if args.minutes is not None:
        overrides.append(f"train.max_minutes={args.minutes}")
    run = out / "pretrain"
    if (run / "checkpoints" / "latest").exists():
        # Interrupted earlier (a session ended): continue, the time budget counts the earlier part.
        overrides.append("train.resume=latest")
    cfg = load_config(REPO_ROOT / "configs" / "electra_tiny.yaml", overrides)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    t0 = time.perf_counter()
    train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["type"] == "eval"][-1]
    first = next(r for r in records if r["type"] == "train")
    from moetrain.checkpoint_format import TrainerState, list_checkpoints

    # The step of the final checkpoint (train records are logged only every train.log_every steps).
    state = TrainerState.from_json(list_checkpoints(run / "checkpoints")[-1] / "trainer_state.json")
    # Training seconds summed over every invocation (a resumed or finished run adds little here).
    return run, {"seconds": state.train_seconds, "wall_seconds_this_call": time.perf_counter() - t0,
                 "steps": state.step, "first_train": first, "final_eval": final}


def finetune_all(args, out: Path, shared: Path, starts: dict[str, Path | None]) -> dict:
    """Fine-tune every task from every start point; ``None`` = random init (architecture and
    vocabulary from the final pretrained checkpoint). Keys are ``task/start``."""
    from moetrain.config import load_config
    from moetrain.tasks.glue import finetune

    final = starts["pretrained"]
    results = {}
    for task in args.tasks.split(","):
        train_file, dev_file = GLUE_FILES[task]
        for name, start in starts.items():
            overrides = [f"glue.pretrained={start or final}", f"glue.random_init={start is None}",
                         f"glue.train_file={shared / train_file}", f"glue.dev_file={shared / dev_file}",
                         f"glue.num_seeds={1 if args.quick else args.seeds}", f"glue.epochs={args.epochs}",
                         f"glue.optimizer={args.ft_optimizer}", f"glue.pooling={args.pooling}",
                         f"glue.lr={args.lr or (1e-2 if args.ft_optimizer == 'adafactor' else 3e-4)}", "glue.batch_size=32", "glue.max_length=128"]
            if args.quick:
                overrides += ["glue.max_train_examples=300", "glue.max_dev_examples=200"]
            elif args.max_train_examples:
                overrides.append(f"glue.max_train_examples={args.max_train_examples}")
            cfg = load_config(REPO_ROOT / "configs" / f"glue_{task}.yaml", overrides)
            done = out / f"{task}-{name}" / "bench_report.json"
            if done.is_file():  # finished in an earlier invocation with the same --out
                results[f"{task}/{name}"] = json.loads(done.read_text())
                continue
            t0 = time.perf_counter()
            report = finetune(cfg, done.parent)
            report["seconds"] = time.perf_counter() - t0
            done.write_text(json.dumps(report, indent=1) + "\n")
            results[f"{task}/{name}"] = report
    return results


def curve_points(run: Path) -> dict[str, Path]:
    """The intermediate checkpoints of the pretraining run, ``step_N`` -> directory."""
    from moetrain.checkpoint_format import list_checkpoints

    return {path.name: path for path in list_checkpoints(run / "checkpoints")}


def curve_rows(results: dict, tasks: list[str], steps: dict[str, int]) -> list[dict]:
    """One row per (pretraining step, task): the main metric's gain over random init and its 2-std bar."""
    rows = []
    for name, step in sorted(steps.items(), key=lambda kv: kv[1]):
        for task in tasks:
            metric = SHOWN[task][0]
            p, r = results[f"{task}/{name}"]["summary"][metric], results[f"{task}/random"]["summary"][metric]
            rows.append({"step": step, "task": task, "metric": metric, "pretrained": p["mean"],
                         "pretrained_std": p["std"], "random": r["mean"], "random_std": r["std"],
                         "gain": p["mean"] - r["mean"], "two_std": 2 * max(p["std"], r["std"])})
    return rows


def write_curve(rows: list[dict], out: Path) -> None:
    """``curve.csv`` (the numbers) and ``curve.png`` (gain per task with the 2-std band)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        x = [r["step"] for r in mine]
        line, = ax.plot(x, [r["gain"] for r in mine], marker="o", label=f"{task.upper()} {mine[0]['metric']}")
        ax.fill_between(x, [-r["two_std"] for r in mine], [r["two_std"] for r in mine], color=line.get_color(), alpha=0.12)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("pretraining steps")
    ax.set_ylabel("pretrained - random init (shaded: 2 std)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)


def table(pre: dict, results: dict, tasks: list[str]) -> str:
    ev = pre["final_eval"]
    lines = [
        f"Pretraining: {pre['steps']} steps in {pre['seconds'] / 60:.1f} min; validation RTD accuracy "
        f"{ev['rtd_accuracy']:.4f} (all-original baseline {ev['rtd_baseline_accuracy']:.4f}), generator MLM "
        f"accuracy {ev['generator_accuracy']:.4f}, MLM loss {pre['first_train']['mlm_loss']:.2f} -> "
        f"{ev['mlm_loss']:.2f}",
        "",
        "| task | metric | majority class | random init (mean ± std) | pretrained (mean ± std) | seeds | gain vs 2 std |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        pre_r, rnd_r = results[f"{task}/pretrained"], results[f"{task}/random"]
        for metric in SHOWN[task]:
            p, r = pre_r["summary"][metric], rnd_r["summary"][metric]
            # The criterion: the pretrained mean beats random init by more than two standard
            # deviations (the larger of the two settings' seed std).
            gain = p["mean"] - r["mean"]
            spread = 2 * max(p["std"], r["std"])
            lines.append(f"| {task.upper()} | {metric} | {pre_r['majority_baseline'][metric]:.4f} | "
                         f"{r['mean']:.4f} ± {r['std']:.4f} | {p['mean']:.4f} ± {p['std']:.4f} | {p['n']} | "
                         f"{gain:+.4f} {'>' if gain > spread else '<='} {spread:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    shared = Path(args.shared).resolve()
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in GLUE_FILES]
    if unknown:
        print(f"electra_glue: unknown task(s) {unknown}; choose from {sorted(GLUE_FILES)}", file=sys.stderr)
        return 2
    needed = PRETRAIN_TEXT + [f for t in tasks for f in GLUE_FILES[t]]
    missing = [n for n in needed if not (shared / n).exists()]
    if missing:
        print(f"electra_glue benchmark skipped: {shared} lacks {', '.join(missing)}")
        return 0
    if args.quick:
        args.steps, args.seeds, args.epochs = 30, 1, 1.0
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run, pre = pretrain(args, out, shared)
    intermediate = curve_points(run) if args.curve_every else {}
    intermediate.popitem() if intermediate else None  # the final checkpoint is "pretrained"
    steps = {name: int(name.split("_")[1]) for name in intermediate}
    results = finetune_all(args, out, shared, {"pretrained": run, **intermediate, "random": None})
    text = table(pre, results, tasks)
    if args.curve_every:
        rows = curve_rows(results, tasks, {**steps, "pretrained": pre["steps"]})
        write_curve(rows, out)
        text += "\n\n" + "\n".join(
            ["| pretraining step | task | metric | gain over random init | 2 std |", "|---|---|---|---|---|"]
            + [f"| {r['step']} | {r['task'].upper()} | {r['metric']} | {r['gain']:+.4f} | {r['two_std']:.4f} |"
               for r in rows])
    summary = {"args": vars(args), "pretraining": pre, "total_seconds": time.perf_counter() - t0,
               "finetuning": {k: {"summary": v["summary"], "majority_baseline": v["majority_baseline"],
                                  "seconds": v["seconds"], "start": v["start"]} for k, v in results.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"total {summary['total_seconds'] / 60:.1f} min; results in {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
