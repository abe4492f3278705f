"""``moetrain bench step``: one training step of moetrain's model against stock Hugging Face's.

    moetrain bench step --config configs/multi30k_switch.yaml [--batch-size 64] [--src-len 24] [--tgt-len 24]
                        [--repeats 10] [--warmup 3] [--precision fp32|bf16] [--profile DIR_OR_FILE] [--json FILE]
    python -m moetrain.bench.step --config ...          # the same

Two models of the recipe, side by side in one process, with the same weights:

    moetrain  the recipe's translation model (``moetrain.models.build_model``), its loss as the
              trainer computes it (``TranslationTask.loss``: cross-entropy + the weighted balance
              and z losses of every MoE layer)
    hf        ``transformers.SwitchTransformersForConditionalGeneration`` built from the config
              moetrain's exporter writes (``moetrain.hf_convert.hf_config_dict``: dropless
              ``expert_capacity``) and loaded with moetrain's weights through the exporter's
              mapping (``moetrain.hf_convert.to_hf``); its own loss (``labels`` and
              ``output_router_logits=True``: cross-entropy + its weighted z and balance losses)

A *step* is ``zero_grad(set_to_none=True)``, forward, loss, backward and ``torch.optim.AdamW``
(lr 1e-4, one parameter group, ``fused=True`` for both: moetrain's trainer uses it, and so does
HF's Trainer by default) on a fixed random batch of ``--batch-size`` sentences of ``--src-len``
source and ``--tgt-len`` target tokens, no padding. With ``--set train.compile=true`` moetrain's
blocks are compiled as the trainer compiles them (:mod:`moetrain.models.compile`). So that both compute the same
function, the recipe is loaded with :data:`FORCED` after the ``--set`` overrides: no dropout,
dropless routing (``moe.capacity_factor: null``), no router jitter, no label smoothing, fp32.

``--precision bf16`` runs both models' forward and loss under ``torch.autocast`` to bfloat16 over
fp32 weights (moetrain's trainer does this at ZeRO-0, HF's Trainer with ``bf16=True``); the
optimizer stays fp32. The recipe's ``train.precision`` is not used: the flag decides, for both.

Before timing, both models' cross-entropy on the batch must agree within :data:`LOSS_RTOL`
(relative; :data:`BF16_LOSS_RTOL` in bf16, where the two round differently), else the benchmark
stops: timing two different computations means nothing. The auxiliary losses are not compared (their formulas differ: HF averages the router statistics over
all layers' tokens at once, moetrain sums per-layer losses).

Timing: ``--warmup`` untimed steps of each, then ``--repeats`` rounds of one step each, the order
of the two alternating from round to round so that drifting machine load hits both alike; Python's
garbage collector is paused inside the timed region. Reported: median and minimum seconds per step,
tokens/s (``batch * (src_len + tgt_len)`` tokens per step) and the ratio moetrain / HF of
tokens/s (above 1: moetrain is faster).

FLOPs: the model FLOPs of a step are counted analytically (:func:`step_flops`), the same number
for both models: each matmul of the forward pass costs ``2 m n k``, the backward twice that
(gradients of both operands), so a step is ``6 x`` the forward multiply-adds (MACs)::

    per source token, per encoder layer:   4 d a          q, k, v, o projections (a = heads * d_kv)
                                         + 2 S a          attention scores and context over S keys
                                         + 2 d f          the FFN; in an MoE layer one expert (top-1)
                                         + d E            the router (MoE layers only)
    per target token, per decoder layer:   4 d a + 2 T a  self-attention (the full T x T, masked)
                                         + 2 d a + 2 S a  cross-attention q and o, scores and context
                                         + 2 d f (+ d E)  FFN (and router)
    per source token, per decoder layer:   2 d a          cross-attention k and v of the encoder output
    per target token:                      d V            the output projection (LM head)

    step FLOPs = 6 * B * (S * source MACs + T * target MACs)

Embedding lookups, norms, softmax, the optimizer and the other elementwise work add no MACs.
``torch.utils.flop_counter.FlopCounterMode`` also counts one step of each model as a cross-check
(it sees only the matmuls torch reports, e.g. not the fused CPU attention kernel, so it may count
less). Achieved GFLOP/s = model FLOPs / step time, printed next to the GFLOP/s of one large fp32
matmul measured in the same run (``--matmul-size``, best of 5, before and after the timed rounds;
bf16 with ``--precision bf16``): the fraction of the machine's matmul limit a step reaches.

``--profile`` runs one more step of each model under ``torch.profiler`` and prints the operators
with the most self time (CPU time; device time on a GPU); the full tables go to a text file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.bench.step_options import add_arguments  # for ``python -m moetrain.bench.step``
from moetrain.utils import cpu_share
from moetrain.utils.errors import UserError

__all__ = ["main", "AgreementError", "FORCED", "LOSS_RTOL", "BF16_LOSS_RTOL", "load_bench_config", "with_autocast",
           "make_batch", "build_models", "Contender", "moetrain_contender", "hf_contender", "check_agreement", "step_flops", "matmul_gflops"]

#: Applied after the user's ``--set``: both models must compute the same deterministic function.
FORCED = ("model.dropout_rate=0", "moe.capacity_factor=null", "moe.jitter_eps=0", "train.label_smoothing=0",
          "train.precision=fp32")
#: Largest relative difference of the two models' cross-entropy before timing.
LOSS_RTOL = 1e-4
#: The same under bf16 autocast: the two models round at different places (measured: ~3e-5).
BF16_LOSS_RTOL = 1e-3
#: ``--precision`` -> (autocast dtype, None for none; agreement tolerance).
PRECISIONS = {"fp32": (None, LOSS_RTOL), "bf16": (torch.bfloat16, BF16_LOSS_RTOL)}
#: AdamW's learning rate: small, so that routing (hence the work per expert) barely moves while timing.
LR = 1e-4
#: Operators printed per model with ``--profile`` (the file holds more).
PROFILE_ROWS = 15


class AgreementError(UserError, RuntimeError):
    """The two models do not compute the same loss on the batch; timing them would mean nothing."""


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------


def load_bench_config(path: str, overrides: list[str]):
    """The recipe with the user's overrides, then :data:`FORCED`; only translation models qualify."""
    from moetrain.config import load_config
    from moetrain.hf_convert import check_exportable

    cfg = load_config(path, [*overrides, *FORCED])
    if cfg.task != "translation" or cfg.model.arch != "encoder_decoder":
        raise UserError(f"{path} is a {cfg.task} recipe ({cfg.model.arch}); the benchmark measures translation "
                        "models (encoder-decoder), as HF's SwitchTransformersForConditionalGeneration")
    note = check_exportable(cfg.moe)  # raises for routing HF cannot run at all (top-k > 1, ...)
    if note is not None:
        raise UserError(f"moe.estimator {cfg.moe.estimator!r} computes another function than HF's router ({note}); "
                        "use an estimator HF reproduces exactly (e.g. --set moe.estimator=switch)")
    return cfg


def make_batch(cfg, batch_size: int, src_len: int, tgt_len: int, seed: int = 0) -> dict[str, Tensor]:
    """A random batch without padding in the collator's format (token ids above the special ids)."""
    gen = torch.Generator().manual_seed(seed)
    low, vocab = 3, cfg.model.vocab_size  # 0 pad, 1 eos, 2 unk: real text never starts with those
    labels = torch.randint(low, vocab, (batch_size, tgt_len), generator=gen)
    decoder_input_ids = torch.cat([torch.full((batch_size, 1), cfg.model.decoder_start_token_id), labels[:, :-1]], 1)
    return {
        "input_ids": torch.randint(low, vocab, (batch_size, src_len), generator=gen),
        "attention_mask": torch.ones(batch_size, src_len, dtype=torch.long),
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": torch.ones(batch_size, tgt_len, dtype=torch.long),
        "labels": labels,
        "sample_ids": torch.arange(batch_size),
    }


def build_models(cfg, with_hf: bool = True) -> tuple[nn.Module, nn.Module | None]:
    """moetrain's model, initialised as the trainer does, and HF's with the same weights (fp32, training mode)."""
    from moetrain.models import build_model
    from moetrain.models.compile import compile_blocks

    torch.manual_seed(cfg.train.seed)
    ours = build_model(cfg.model, cfg.moe, noise_seed=cfg.train.seed, init_seed=cfg.train.seed).float().train()
    hf = hf_model(cfg, ours.state_dict()) if with_hf else None
    if cfg.train.compile:  # as the trainer does with train.compile: true
        compile_blocks(ours)
    return ours, hf


def hf_model(cfg, state_dict: dict[str, Tensor]) -> nn.Module:
    """Stock ``SwitchTransformersForConditionalGeneration`` from the exporter's config and mapping."""
    import transformers

    from moetrain.hf_convert import hf_config_dict, to_hf

    config = transformers.SwitchTransformersConfig(**hf_config_dict(cfg.model, cfg.moe))
    hf = transformers.SwitchTransformersForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(to_hf(state_dict, cfg.model, cfg.moe), strict=False)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"HF model does not take the exporter's weights: missing {missing}, unexpected {unexpected}")
    for name in set(missing):  # tied aliases must really be the loaded embedding
        if hf.get_parameter(name) is not hf.shared.weight:
            raise RuntimeError(f"HF's {name} is not tied to shared.weight, and was not loaded")
    return hf.float().train()


@dataclass
class Contender:
    """One model with its loss and optimizer.

    Attributes:
        name: ``moetrain`` or ``hf``.
        model: the module (training mode).
        loss: forward + loss on the benchmark batch -> ``(loss to back-propagate, cross-entropy)``;
            with ``with_ce=False`` (the timed steps) the cross-entropy may be None, so that a
            model that does not report it apart pays nothing extra for it.
        loss_note: what ``loss`` includes, for the report.
    """

    name: str
    model: nn.Module
    loss: Callable[..., tuple[Tensor, Tensor | None]]
    loss_note: str
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        # Fused AdamW for both: moetrain's build_optimizer uses it, and so does HF's Trainer by
        # default (optim "adamw_torch_fused" with torch >= 2.8).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=True)

    def step(self) -> float:
        """One training step; returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.loss(with_ce=False)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def cross_entropy(self) -> float:
        """The cross-entropy on the batch (a forward pass only)."""
        with torch.no_grad():
            return float(self.loss(with_ce=True)[1])


def moetrain_contender(cfg, model: nn.Module, batch: dict[str, Tensor]) -> Contender:
    """moetrain's model with the trainer's translation loss (``TranslationTask.loss``)."""
    from moetrain.tasks.translation import TranslationTask

    # TranslationTask.loss reads only self.cfg; constructing the task would prepare the data
    # (tokenizer, corpus) the benchmark does not need.
    task = TranslationTask.__new__(TranslationTask)
    task.cfg = cfg

    def loss(with_ce: bool = True) -> tuple[Tensor, Tensor]:
        out = task.loss(model, batch)  # computes the cross-entropy for its logs anyway
        return out.loss, torch.tensor(out.logs["ce_loss"])

    return Contender("moetrain", model, loss,
                     "TranslationTask.loss: cross-entropy + balance_coef * sum(balance) + z_coef * sum(z)")


def hf_contender(hf: nn.Module, batch: dict[str, Tensor]) -> Contender:
    """HF's model with its own loss (``labels`` + ``output_router_logits``)."""

    def loss(with_ce: bool = True) -> tuple[Tensor, Tensor | None]:
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=batch["decoder_attention_mask"],
                 labels=batch["labels"], output_router_logits=True, use_cache=False)
        if not with_ce:  # HF's loss includes the router losses; its cross-entropy alone costs another
            return out.loss, None  # pass over the vocabulary, which the timed steps must not pay
        ce = F.cross_entropy(out.logits.detach().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        return out.loss, ce

    return Contender("hf", hf, loss, "HF's loss: cross-entropy + router_z_loss_coef * z + router_aux_loss_coef * aux")


def with_autocast(contender: Contender, device: torch.device, dtype: torch.dtype) -> Contender:
    """The contender with its forward and loss under ``torch.autocast`` to ``dtype`` (weights stay fp32)."""
    inner = contender.loss

    def loss(with_ce: bool = True) -> tuple[Tensor, Tensor | None]:
        with torch.autocast(device.type, dtype=dtype):
            return inner(with_ce=with_ce)

    contender.loss = loss
    return contender


def check_agreement(ours: Contender, hf: Contender, rtol: float = LOSS_RTOL) -> dict[str, float]:
    """Both models' cross-entropy on the batch; raises :class:`AgreementError` unless they agree."""
    a, b = ours.cross_entropy(), hf.cross_entropy()
    rel = abs(a - b) / max(abs(a), abs(b), 1e-12)
    if not rel <= rtol:  # NaN fails too
        raise AgreementError(
            f"the two models disagree on the batch: cross-entropy moetrain {a:.6f}, HF {b:.6f} "
            f"(relative difference {rel:.2e} > {rtol:g}); they do not compute the same function, so their times "
            "are not comparable (nothing was timed)")
    return {"moetrain_ce": a, "hf_ce": b, "rel_diff": rel, "tolerance": rtol}


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------


def step_flops(model_cfg, moe_cfg, batch_size: int, src_len: int, tgt_len: int) -> int:
    """Model FLOPs of one training step (forward + backward) of an encoder-decoder; see the module docstring."""
    from moetrain.models import is_sparse_layer

    d, a, f, vocab, experts = (model_cfg.d_model, model_cfg.num_heads * model_cfg.d_kv, model_cfg.d_ff,
                               model_cfg.vocab_size, moe_cfg.num_experts)

    def ffn(i: int) -> int:
        return 2 * d * f + (d * experts if is_sparse_layer(i, moe_cfg.sparse_step) else 0)

    source = sum(4 * d * a + 2 * src_len * a + ffn(i) for i in range(model_cfg.num_layers))
    source += model_cfg.num_decoder_layers * 2 * d * a  # cross-attention keys and values
    target = sum(4 * d * a + 2 * tgt_len * a + 2 * d * a + 2 * src_len * a + ffn(i)
                 for i in range(model_cfg.num_decoder_layers))
    target += d * vocab
    return 6 * batch_size * (src_len * source + tgt_len * target)


def counted_flops(contender: Contender) -> int | None:
    """Matmul FLOPs of one forward + backward as ``FlopCounterMode`` counts them (None if it fails)."""
    from torch.utils.flop_counter import FlopCounterMode

    contender.optimizer.zero_grad(set_to_none=True)
    try:
        with FlopCounterMode(display=False) as counter:
            contender.loss(with_ce=False)[0].backward()
    except Exception as err:  # noqa: BLE001 - a cross-check only; the analytic count stands
        print(f"(FlopCounterMode failed on {contender.name}: {type(err).__name__}: {err})", file=sys.stderr)
        return None
    finally:
        contender.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def matmul_gflops(n: int, device: torch.device, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of the fastest of ``repeats`` ``[n, n] @ [n, n]`` products in ``dtype`` (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out), device) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------
# Timing and profiling
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``run()``, without garbage collection inside."""
    gc.disable()
    try:
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        return time.perf_counter() - start
    finally:
        gc.enable()


def time_steps(contenders: list[Contender], warmup: int, repeats: int, device: torch.device,
               progress: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per step of each contender: ``warmup`` untimed rounds, then ``repeats`` timed ones,
    the order of the contenders reversed every other round."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for round_ in range(warmup + repeats):
        order = contenders if round_ % 2 == 0 else contenders[::-1]
        for contender in order:
            seconds = _timed(contender.step, device)
            if round_ >= warmup:
                times[contender.name].append(seconds)
            progress()
    return times


def profile_step(contender: Contender, device: torch.device, rows: int = 40) -> tuple[list[dict], str]:
    """One step under torch.profiler: the top ``rows`` operators by self time, and torch's table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        contender.step()
        _sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:rows]
    top = [{"name": e.key, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
           for e in ranked]
    return top, events.table(sort_by=attr, row_limit=rows)


def _format_top(name: str, top: list[dict], rows: int) -> str:
    total_ms = sum(r["self_ms"] for r in top) / max(sum(r["share"] for r in top), 1e-12)
    lines = [f"{name}: top {min(rows, len(top))} operators by self time (step total {total_ms:.1f} ms)",
             f"  {'operator':<48}{'self ms':>10}{'share':>8}{'calls':>8}"]
    lines += [f"  {r['name'][:47]:<48}{r['self_ms']:>10.2f}{r['share']:>7.1%}{r['calls']:>8}" for r in top[:rows]]
    return "\n".join(lines)


def _profile_path(target: str) -> Path:
    path = Path(target)
    if path.suffix == ".txt":
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    return path / "step_profile.txt"


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


def _summary(seconds: list[float], tokens: int, flops: int, matmul: float) -> dict:
    median, fastest = statistics.median(seconds), min(seconds)
    gflops, gflops_best = flops / median / 1e9, flops / fastest / 1e9
    return {"median_s": median, "min_s": fastest, "seconds": seconds,
            "tokens_per_s": tokens / median, "tokens_per_s_best": tokens / fastest,
            "gflops": gflops, "gflops_best": gflops_best,
            "fraction_of_matmul": gflops / matmul, "fraction_of_matmul_best": gflops_best / matmul}


def _print_report(report: dict) -> None:
    print(f"\n{'model':<10}{'median s':>10}{'min s':>9}{'tokens/s':>10}{'best tok/s':>12}{'GFLOP/s':>9}"
          f"{'x matmul':>10}{'best x':>8}")
    for name, r in report["models"].items():
        print(f"{name:<10}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s_best']:>12.0f}{r['gflops']:>9.1f}{r['fraction_of_matmul']:>10.1%}"
              f"{r['fraction_of_matmul_best']:>8.1%}")
    print(f"(median and min over {report['repeats']} interleaved steps each; GFLOP/s = "
          f"{report['model_flops_per_step'] / 1e9:.2f} GFLOP model FLOPs / median step; x matmul: share of the "
          f"{report['matmul']['gflops']:.1f} GFLOP/s of one {report['precision']} {report['matmul']['n']}^3 matmul)")
    ratio = report.get("ratio_moetrain_over_hf")
    if ratio:
        print(f"moetrain / HF tokens/s: {ratio['median']:.2f}x (median), {ratio['best']:.2f}x (best step)")


def main(args: argparse.Namespace) -> int:
    import transformers

    load_at_start = os.getloadavg()[0]
    cfg = load_bench_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    with_hf = not args.no_hf
    tokens = args.batch_size * (args.src_len + args.tgt_len)
    print(f"moetrain bench step: {args.config}, {_device_name(device)}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"forced after --set: {' '.join(FORCED)} (no dropout, dropless, no jitter, plain cross-entropy, fp32 "
          f"weights)" + ("; both models under bf16 autocast (--precision bf16)" if args.precision == "bf16" else ""))
    print(f"step: zero_grad + forward + loss + backward + fused AdamW (lr {LR:g}); batch {args.batch_size} x "
          f"({args.src_len} + {args.tgt_len}) = {tokens} tokens, no padding; moetrain blocks "
          + ("compiled (train.compile)" if cfg.train.compile else "eager"))

    ours_model, hf_net = build_models(cfg, with_hf)
    batch = make_batch(cfg, args.batch_size, args.src_len, args.tgt_len, seed=cfg.train.seed)
    if device.type != "cpu":
        batch = {k: v.to(device) for k, v in batch.items()}
    contenders = [moetrain_contender(cfg, ours_model.to(device), batch)]
    if with_hf:
        contenders.append(hf_contender(hf_net.to(device), batch))
    autocast, rtol = PRECISIONS[args.precision]
    if autocast is not None:
        contenders = [with_autocast(c, device, autocast) for c in contenders]
    dtype = autocast or torch.float32  # of the reference matmul
    check = None
    if with_hf:
        check = check_agreement(*contenders, rtol=rtol)
        print(f"loss check: cross-entropy moetrain {check['moetrain_ce']:.6f}, HF {check['hf_ce']:.6f} "
              f"(relative difference {check['rel_diff']:.1e} <= {rtol:g})")
    for c in contenders:
        print(f"  {c.name} step loss: {c.loss_note}")

    flops = step_flops(cfg.model, cfg.moe, args.batch_size, args.src_len, args.tgt_len)
    counted = {c.name: counted_flops(c) for c in contenders}
    counted_text = ", ".join(f"{n} {v / 1e9:.2f}" if v else f"{n} -" for n, v in counted.items())
    print(f"model FLOPs per step: {flops / 1e9:.2f} GFLOP (analytic, 6 x matmul MACs; FlopCounterMode counts "
          f"{counted_text} GFLOP)")

    matmul_before = matmul_gflops(args.matmul_size, device, dtype=dtype)
    total = (args.warmup + args.repeats) * len(contenders)
    done = [0]

    def progress() -> None:
        done[0] += 1
        print(f"\r  step {done[0]}/{total}", end="", file=sys.stderr, flush=True)

    cpu_start = cpu_share.sample()
    times = time_steps(contenders, args.warmup, args.repeats, device, progress)
    cpu_end = cpu_share.sample()
    print(file=sys.stderr)
    matmul = max(matmul_before, matmul_gflops(args.matmul_size, device, dtype=dtype))
    report = {
        "config": args.config, "overrides": list(args.overrides), "forced": list(FORCED),
        "device": _device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "batch_size": args.batch_size, "src_len": args.src_len,
        "tgt_len": args.tgt_len, "precision": args.precision, "tokens_per_step": tokens, "repeats": args.repeats,
        "warmup": args.warmup,
        "lr": LR, "model_flops_per_step": flops, "counted_flops_per_step": counted,
        "matmul": {"n": args.matmul_size, "gflops": matmul},
        "loss_check": check, "load_average_at_start": load_at_start,
        "cpu_others_share": cpu_share.others_share(cpu_start, cpu_end),
        "models": {c.name: {**_summary(times[c.name], tokens, flops, matmul), "loss": c.loss_note} for c in contenders},
    }
    if with_hf:
        ours, theirs = report["models"]["moetrain"], report["models"]["hf"]
        report["ratio_moetrain_over_hf"] = {"median": ours["tokens_per_s"] / theirs["tokens_per_s"],
                                            "best": ours["tokens_per_s_best"] / theirs["tokens_per_s_best"]}
    _print_report(report)
    print(cpu_share.describe(report["cpu_others_share"], cpu_end and cpu_end.cpus))

    if args.profile:
        path = _profile_path(args.profile)
        sections, report["profile"] = [], {"file": str(path)}
        for c in contenders:
            top, table = profile_step(c, device)
            report["profile"][c.name] = top
            print("\n" + _format_top(c.name, top, PROFILE_ROWS))
            sections.append(f"{_format_top(c.name, top, len(top))}\n\n{c.name}: torch.profiler table\n{table}")
        header = (f"moetrain bench step --config {args.config}: one step of each model under torch.profiler, "
                  f"{report['device']}, {report['threads']} threads, batch {args.batch_size} x "
                  f"({args.src_len} + {args.tgt_len})\n")
        path.write_text(header + "\n\n".join(sections) + "\n")
        print(f"\nprofile tables: {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m moetrain.bench.step", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
