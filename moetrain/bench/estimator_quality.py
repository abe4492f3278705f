"""``moetrain bench estimator-quality``: each estimator's router gradient against the exact one.

    moetrain bench estimator-quality configs/tiny.yaml [--layer NAME] [--batches 4] [--draws 8]
    moetrain bench estimator-quality runs/demo --estimators switch reinmax --json quality.json

The model is a portable checkpoint's (trained weights) or a recipe's, freshly initialised. It runs
``--batches`` real training batches of the recipe's task (training mode: dropout and the model's own
estimator routing as in training); for the chosen MoE layer each batch's input and dL/dy are
captured and every estimator is compared with the exact gradient of the expected-output objective
(:mod:`moetrain.moe.grad_quality`; the definition is in docs/estimators.md, "Gradient quality").
The table shows the mean and standard deviation over batches of the per-draw cosine and relative
error, and of the same for the mean gradient over ``--draws`` draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from moetrain.bench.estimator_quality_options import add_arguments  # for ``python -m``
from moetrain.utils.errors import UserError

__all__ = ["main", "summarise"]

METRICS = ("cosine", "rel_error", "cosine_of_mean", "rel_error_of_mean")


def main(args: argparse.Namespace) -> int:
    import torch

    from moetrain.moe import moe_layers, set_routing_step
    from moetrain.moe.grad_quality import LayerCapture, build_top1_estimators, compare_estimators, estimator_settings
    from moetrain.tasks import build_task
    from moetrain.train.trainer import _to_device  # the trainer's batch mover

    cfg, weights, origin = _load(args.source, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    tables, tokens = [], []
    with tempfile.TemporaryDirectory(prefix="moetrain-quality-") as scratch:
        task = build_task(cfg, scratch)
        model = task.build_model(ep_size=1)
        if weights is not None:
            model.load_state_dict(weights)
        model.to(device).train()
        names = {m: n for n, m in model.named_modules() if m in set(moe_layers(model))}
        name, layer = _pick_layer(names, args.layer)
        estimators = build_top1_estimators(args.estimators, layer.num_experts, layer.d_model,
                                           **estimator_settings(cfg.moe))
        for i, batch in zip(range(args.batches), task.train_batches(0, 1, 0)):
            set_routing_step(model, i)
            with LayerCapture(layer) as cap:
                task.loss(model, _to_device(batch, device)).loss.backward()
            model.zero_grad(set_to_none=True)
            tables.append(compare_estimators(layer, cap.captures[-1], estimators, args.draws, step=i))
            tokens.append(int(cap.captures[-1].x.shape[0]))
    summary = summarise(tables)
    print(f"moetrain bench estimator-quality: {args.source} ({origin}), layer {name}, {len(tables)} batch(es) "
          f"x {args.draws} draw(s), {sum(tokens) / len(tokens):.0f} tokens/batch")
    print("target: exact d/dlogits of E_{D~softmax(logits)} <dL/dy, p_D f_D(x)> (loss linearised at the layer "
          "output; all experts evaluated)")
    print(format_table(summary, args.draws))
    if args.json:
        Path(args.json).write_text(json.dumps({"source": args.source, "origin": origin, "layer": name,
                                               "draws": args.draws, "tokens": tokens, "summary": summary,
                                               "batches": tables}, indent=1))
    return 0


def summarise(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{estimator: {metric: {"mean", "std", "n"}}}`` over batches (std with n - 1; 0 for one batch).

    Batches whose value is undefined (NaN: an exact gradient of zero) are left out and ``n`` says how
    many remain; with none left, mean and std are NaN.
    """
    out = {}
    for name in tables[0]:
        out[name] = {}
        for metric in METRICS:
            values = [t[name][metric] for t in tables if math.isfinite(t[name][metric])]
            if not values:
                out[name][metric] = {"mean": math.nan, "std": math.nan, "n": 0}
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            out[name][metric] = {"mean": mean, "std": math.sqrt(var), "n": len(values)}
    return out


def format_table(summary: dict, draws: int) -> str:
    heads = ("cosine", "rel. error", f"cosine (mean of {draws})", f"rel. error (mean of {draws})")
    lines = [f"{'estimator':<16}" + "".join(f"{h:>24}" for h in heads)]
    for name, row in summary.items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" if row[m]["n"] else "n/a (zero exact gradient)"
                 for m in METRICS]
        lines.append(f"{name:<16}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def _load(source: str, overrides: list[str]):
    """(config, weights or None, "random init" / "checkpoint at step N")."""
    from moetrain.config import load_config

    path = Path(source)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_config(path, overrides), None, "random init"
    from moetrain.checkpoint_format import TOKENIZER, read_portable

    if overrides:
        raise UserError(f"{source}: --set applies to a recipe (a .yaml file), not to a checkpoint")
    ckpt = read_portable(path)
    cfg = ckpt.cfg
    if (ckpt.path / TOKENIZER).exists():  # the checkpoint's own tokenizer, not a retrained one
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(ckpt.path / TOKENIZER)))
    step = ckpt.state.step if ckpt.state is not None else "?"
    return cfg, ckpt.weights, f"checkpoint at step {step}"


def _pick_layer(names: dict, wanted: str | None):
    if not names:
        raise UserError("the model has no MoE layer: nothing to compare (check moe.sparse_step and model.num_layers)")
    if wanted is None:
        layer, name = next(iter(names.items()))
        return name, layer
    for layer, name in names.items():
        if name == wanted:
            return name, layer
    raise UserError(f"--layer: no MoE layer named {wanted!r}; "
                     f"MoE layers: {', '.join(names.values())}")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m moetrain.bench.estimator_quality",
                                  description=__doc__.split("\n\n")[0])
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
