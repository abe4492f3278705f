"""Training metrics: what the loop accumulates, how ranks combine it, where it is written.

Three sinks, all on rank 0:

* ``<run dir>/metrics.jsonl``: one JSON object per logged step (``"type": "train"``) and per
  evaluation (``"type": "eval"``). Train records hold at least ``step``, ``loss``, ``lr``,
  ``tokens_per_second``; also ``grad_norm``, ``samples_per_second``, ``mfu``, the task's own
  logs and, per MoE layer, ``moe: [{layer, load, max_load, mean_load, max_load_ratio,
  dead_experts, dropped_fraction, router_entropy, balance_loss, z_loss}]`` (router health, see
  :func:`_layer_record`); a single-process run also logs ``cpu_others``, the share of the
  machine's CPUs other processes used during the window (:mod:`moetrain.utils.cpu_share`: a
  timing taken beside another job is not the code's speed). With ``train.grad_quality_every``
  also ``"type": "grad_quality"`` records (``step``, ``layer``, ``estimators: {name: {cosine, rel_error, ...}}``). Appended to, so a resumed run continues the same file; on resume the
  records past the restored step (written after that checkpoint by the run that stopped, and about
  to be replayed) are dropped first, so every step appears once (:func:`drop_records_after`).
* ``<run dir>/tensorboard/``: the same numbers as scalars (``train/*``, ``eval/*``,
  ``moe/<layer>/*``; ``max_load_ratio`` is ``load_max_x_uniform`` there) plus a histogram of each
  layer's expert load fractions (one value per expert: all at 1/E is perfect balance, a spike at 0
  is dead experts); a resumed run writes a purge marker at the restored step, so TensorBoard drops
  the stopped run's later events.
* a tqdm progress bar (loss, tokens/s, lr, ETA, expert load) when stderr is a terminal,
  else one plain line per logged step (launcher logs stay readable).

Averages are token-weighted over every micro-batch of every rank since the last log.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.utils import cpu_share
from moetrain.utils.atomic import write_text_synced

__all__ = ["WindowStats", "MetricsLogger", "flops_per_token", "peak_flops", "drop_records_after"]


class WindowStats:
    """Sums over the micro-batches of one logging window on this rank.

    Sums stay on the device (float64) until :meth:`reduce`, so recording a micro-batch never
    waits for the GPU.
    """

    _MOE_KEYS = ("balance_loss", "z_loss", "router_entropy", "dropped_fraction")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)  # token-weighted sums of loss and logs
        self.weight = 0  # sum of the per-micro-batch weights used in ``sums``
        self.tokens = 0
        self.samples = 0
        self.moe: list[dict[str, Any]] = []
        self.start = time.perf_counter()
        self.cpu = cpu_share.sample()  # what else the machine ran during the window (None off Linux)

    def add(self, out, num_samples: int) -> None:
        """Record one micro-batch's :class:`~moetrain.tasks.base.LossOutput`."""
        n = max(int(out.num_tokens), 1)
        self.weight += n
        self.tokens += int(out.num_tokens)
        self.samples += num_samples
        self.sums["loss"] = self.sums["loss"] + out.loss.detach().double() * n
        for key, value in out.logs.items():
            self.sums[key] = self.sums[key] + value * n
        for i, stats in enumerate(out.moe_stats):
            if i == len(self.moe):
                self.moe.append({"load": 0, "tokens": 0, **{key: 0.0 for key in self._MOE_KEYS}})
            acc, m = self.moe[i], max(stats.num_tokens, 1)
            acc["load"] = acc["load"] + stats.tokens_per_expert.detach()
            acc["tokens"] += m
            for key in self._MOE_KEYS:
                acc[key] = acc[key] + getattr(stats, key).detach().double() * m

    def part(self) -> dict[str, Any]:
        """This rank's window as Python numbers and CPU tensors (the one device sync)."""
        moe = [{"load": acc["load"].cpu(), "tokens": acc["tokens"], **{k: float(acc[k]) for k in self._MOE_KEYS}}
               for acc in self.moe]
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "weight": self.weight, "tokens": self.tokens,
                "samples": self.samples, "moe": moe}

    def reduce(self, rank: int, world_size: int) -> dict[str, Any] | None:
        """Combine every rank's window on rank 0 (collective). None on other ranks."""
        parts = [self.part()]
        if world_size > 1:
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(parts[0], gathered, dst=0)
            parts = gathered
        if rank != 0:
            return None
        return _merge_windows(parts)


def _merge_windows(parts: list[dict]) -> dict[str, Any]:
    sums: dict[str, float] = defaultdict(float)
    weight, tokens, samples = 0, 0, 0
    moe: list[dict[str, Any]] = []
    for part in parts:
        tokens += part["tokens"]
        samples += part["samples"]
        weight += part["weight"]
        for key, value in part["sums"].items():
            sums[key] += value
        for i, acc in enumerate(part["moe"]):
            if i == len(moe):
                moe.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in acc.items()})
            else:
                for key, value in acc.items():
                    moe[i][key] = moe[i][key] + value
    means = {k: v / max(weight, 1) for k, v in sums.items()}
    return {"means": means, "tokens": tokens, "samples": samples, "moe": [_layer_record(acc) for acc in moe]}


def _layer_record(acc: dict[str, Any]) -> dict[str, Any]:
    """One MoE layer's router health over a logging window, from its sums over every rank.

    * ``load``: fraction of the window's processed routes each expert took (sums to 1);
    * ``max_load`` / ``mean_load``: the largest and the mean of those fractions (the mean is 1/E
      whenever anything was routed, so the pair reads without knowing E);
    * ``max_load_ratio``: ``max_load / mean_load``, the busiest expert as a multiple of a uniform
      share (1.0 is perfect balance; the progress bar's ``max_load 1.00x``; 0 if nothing was routed);
    * ``dead_experts``: experts that processed no route in the whole window on any rank. Counted
      here, from the token counts summed over micro-batches and ranks: an expert idle on one rank
      or in one micro-batch is normal, idle everywhere for a window is a collapsed router.
    * ``dropped_fraction``, ``router_entropy``, ``balance_loss``, ``z_loss``: token-weighted means.
    """
    m = max(acc["tokens"], 1)
    counts = acc["load"].double()
    load = counts / counts.sum().clamp(min=1)
    max_load = float(load.max()) if load.numel() else 0.0
    mean_load = float(load.mean()) if load.numel() else 0.0
    return {"load": load.tolist(), "max_load": max_load, "mean_load": mean_load,
            "max_load_ratio": max_load / mean_load if mean_load > 0 else 0.0,
            "dead_experts": int((counts == 0).sum()),
            **{k: acc[k] / m for k in WindowStats._MOE_KEYS}}


def flops_per_token(model: nn.Module, top_k: int | None = None) -> float:
    """Training FLOPs per token, ``6 x active parameters`` (forward 2, backward 4).

    Active parameters are every non-expert parameter plus ``top_k`` experts per MoE layer.
    Attention's ``seq^2`` term and embedding lookups are not separated out: an estimate
    for MFU, the same for every run of a model.
    """
    from deepspeed.moe.layer import MoE

    expert_ids = set()
    active = 0.0
    for module in model.modules():
        if isinstance(module, MoE):
            experts = list(module.deepspeed_moe.experts.parameters())
            expert_ids.update(id(p) for p in experts)
            per_expert = sum(p.numel() for p in experts) / max(module.num_local_experts, 1)
            active += per_expert * (top_k or getattr(module, "top_k", 1))
    active += sum(p.numel() for p in model.parameters() if id(p) not in expert_ids)
    return 6.0 * active


#: Dense bf16/fp16 tensor-core peak per GPU (FLOP/s), by a substring of the device name.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "V100": 125e12, "A6000": 155e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU; None when unknown (CPU).

    ``MOETRAIN_PEAK_FLOPS`` overrides it (e.g. for a GPU missing from the table).
    """
    if os.environ.get("MOETRAIN_PEAK_FLOPS"):
        return float(os.environ["MOETRAIN_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value if precision in ("bf16", "fp16") else value / 2  # fp32 runs on TF32 units
    return None


class MetricsLogger:
    """Writes train and eval records on rank 0; a no-op on the other ranks.

    Args:
        out_dir: the run directory.
        is_main: rank 0.
        max_steps / start_step: for the progress bar and ETA.
        layer_names: names of the MoE layers, in the order tasks report their stats.
        budget_seconds: training time left under ``train.max_minutes`` (caps the ETA); None = none.
        resumed: the run continues from a checkpoint at ``start_step``: records past it are dropped.
    """

    def __init__(self, out_dir: Path, is_main: bool, max_steps: int, start_step: int,
                 layer_names: list[str] | None = None, budget_seconds: float | None = None,
                 resumed: bool = False):
        self.is_main = is_main
        self.max_steps = max_steps
        self.start_step = start_step
        self.layer_names = layer_names or []
        self.t0 = time.perf_counter()
        self.deadline = None if budget_seconds is None else self.t0 + max(budget_seconds, 0.0)
        self.bar = self.tb = self.jsonl = None
        if not is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            dropped = drop_records_after(out_dir / "metrics.jsonl", start_step)
            if dropped:
                print(f"moetrain: metrics.jsonl: dropped {dropped} record(s) past step {start_step} (written after "
                      f"that checkpoint; the resumed run writes them again)", flush=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier run's events from the restored step on, so
            # its curves, like metrics.jsonl's, show each step once after a resume.
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None)
        except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
            self.tb = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0, unit="step")

    # -- records ----------------------------------------------------------------------------

    def log_train(self, step: int, record: dict[str, Any]) -> None:
        """One train record (``step``, ``loss``, ``lr``, ``tokens_per_second``, ...)."""
        if not self.is_main:
            return
        record = {"type": "train", "step": step, **record}
        for i, layer in enumerate(record.get("moe", [])):
            layer["layer"] = self._layer_name(i)
        self._write(record)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",) and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, step)
            for layer in record.get("moe", []):
                self._tb_layer(layer, step)
        self._show(step, record)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self._write({"type": "eval", "step": step, **metrics})
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"eval/{key}", value, step)
        self.message(f"eval step {step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def log_record(self, record: dict[str, Any]) -> None:
        """Any other record (e.g. ``"type": "grad_quality"``), to metrics.jsonl only."""
        if self.is_main:
            self._write(record)

    def advance(self, step: int) -> None:
        """The bar shows ``step`` optimizer steps done."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        """A line that does not break the progress bar (rank 0 only)."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for sink in (self.bar, self.tb, self.jsonl):
            if sink is not None:
                sink.close()

    # -- helpers ----------------------------------------------------------------------------

    def _layer_name(self, i: int) -> str:
        return self.layer_names[i] if i < len(self.layer_names) else f"layer_{i}"

    def _write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record, default=_json_default) + "\n")

    def _tb_layer(self, layer: dict[str, Any], step: int) -> None:
        prefix = f"moe/{layer['layer']}"
        load = torch.tensor(layer["load"])
        for key in ("dropped_fraction", "router_entropy", "balance_loss", "z_loss", "max_load", "mean_load",
                    "dead_experts"):
            if layer.get(key) is not None:  # records written by hand (tests, old code) may lack some
                self.tb.add_scalar(f"{prefix}/{key}", layer[key], step)
        if load.numel():
            self.tb.add_scalar(f"{prefix}/load_max_x_uniform", float(load.max() * load.numel()), step)
            self.tb.add_scalar(f"{prefix}/load_min_x_uniform", float(load.min() * load.numel()), step)
            self.tb.add_histogram(f"{prefix}/load", load, step)
            if load.numel() <= 32:  # one curve per expert stays readable up to here
                for j, value in enumerate(load.tolist()):
                    self.tb.add_scalar(f"{prefix}/load/expert_{j}", value, step)

    def _show(self, step: int, record: dict[str, Any]) -> None:
        loads = [max(layer["load"]) * len(layer["load"]) for layer in record.get("moe", []) if layer["load"]]
        parts = {"loss": _fmt(record["loss"]), "tok/s": f"{record['tokens_per_second']:.0f}",
                 "lr": f"{record['lr']:.2e}"}
        if loads:
            parts["max_load"] = f"{max(loads):.2f}x"  # busiest expert vs a uniform share
        if self.bar is not None:
            self.bar.set_postfix(parts, refresh=False)
            return
        done = step - self.start_step
        now = time.perf_counter()
        eta = (now - self.t0) / max(done, 1) * (self.max_steps - step)
        if self.deadline is not None:
            eta = min(eta, max(self.deadline - now, 0.0))  # train.max_minutes ends the run first
        print(f"step {step}/{self.max_steps} " + " ".join(f"{k} {v}" for k, v in parts.items())
              + f" eta {_duration(eta)}", flush=True)


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite ``path`` atomically without the records whose ``step`` is past ``step``, and without
    a torn last line (a process killed mid-write). Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_text_synced(path, "".join(x + "\n" for x in kept))
    return dropped


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
