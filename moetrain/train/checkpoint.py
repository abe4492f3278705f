"""Checkpoints: atomic saves, exact resume, and a portable form keyed by global expert id.

Layout under ``<run dir>/checkpoints/``::

    step_00001000/
      engine/                 DeepSpeed's own files (engine.save_checkpoint): per-rank ZeRO
                              optimizer shards, one file per global expert, the LR scheduler
      rng/rank_00000.pt       each rank's RNG states (DeepSpeed does not save them)
      trainer_state.json      step, data position, best metric, topology it was written on
      portable/               topology-free copy, read by ``moetrain export`` too:
        config.yaml             the resolved run config
        model.safetensors       full fp32 state dict as an ep_size=1 model names it
                                (expert keys carry GLOBAL ids: ...deepspeed_experts.<g>...)
        optimizer.pt            optimizer state tensors per parameter name (AdamW moments or
                                Adafactor's factored moments), step, optimizer name, LR scheduler
        trainer_state.json      as above
        tokenizer/              copy of the task's ``tokenizer_dir`` (when it has one)
    latest                    name of the newest complete checkpoint (written last)
    best                      name of the checkpoint with the best eval metric

**Atomic.** Every rank writes into ``.tmp-step_X/``; after a barrier rank 0 renames it to
``step_X`` and only then replaces ``latest`` (itself written to a temporary file and
renamed). A process killed at any point leaves ``latest`` naming a complete checkpoint;
leftover ``.tmp-*`` directories are removed by the next save. Several nodes need a shared
file system: rank 0 renames what every rank wrote.

**Two ways back.** :func:`load_checkpoint` resumes with DeepSpeed's files when the
topology (world size, EP size, ZeRO stage, precision) is unchanged, which continues
bit-for-bit (RNG restored per rank). Otherwise it reads ``portable/``: fp32 weights and
Adam moments set through ``deepspeed.utils.safe_set_full_*`` into whatever sharding the
new run has. DeepSpeed cannot do this itself for native MoE: its universal checkpoint
crashes at EP > 1 and loading at another EP size silently misplaces optimizer state
(docs/deepspeed-ep.md, Q6).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import RunConfig, load_config, save_config

from .distributed import DistInfo, barrier

__all__ = ["TrainerState", "CheckpointMismatch", "save_checkpoint", "load_checkpoint", "resolve_resume",
           "gather_portable", "read_portable", "checkpoint_name", "list_checkpoints", "ARCH_KEYS"]

ENGINE_TAG = "engine"
PORTABLE = "portable"
_EXPERT_RE = re.compile(r"^(?P<layer>.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<id>\d+)\.(?P<rest>.*)$")
_STEP_RE = re.compile(r"^step_(\d+)$")

#: Config keys that change parameter shapes or names: a checkpoint must agree on all of them.
ARCH_KEYS = ("model.arch", "model.vocab_size", "model.d_model", "model.d_kv", "model.d_ff", "model.num_layers",
             "model.num_decoder_layers", "model.num_heads", "model.relative_attention_num_buckets",
             "model.tie_word_embeddings", "moe.num_experts", "moe.sparse_step")


class CheckpointMismatch(ValueError):
    """The checkpoint was written for another model; nothing was loaded or overwritten."""


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue where it stopped.

    Attributes:
        step: optimizer steps completed.
        data_position: micro-batches each rank has consumed (``train_batches(start_step=...)``).
        best_metric / best_step: best evaluation so far (``metric`` decides which is best).
        metric / higher_is_better: the evaluation key that ranks checkpoints.
        topology: world_size, ep_size, zero_stage, precision the checkpoint was written with.
        train_seconds: wall-clock seconds trained so far, over all resumed runs (train.max_minutes).
    """

    step: int = 0
    data_position: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    metric: str = "loss"
    higher_is_better: bool = False
    topology: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0

    def improves(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.higher_is_better else value < self.best_metric

    @classmethod
    def from_json(cls, path: Path) -> "TrainerState":
        raw = json.loads(Path(path).read_text())
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def topology(cfg: RunConfig, info: DistInfo) -> dict[str, Any]:
    return {"world_size": info.world_size, "ep_size": cfg.parallel.ep_size,
            "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete step directories under ``root``, oldest first (``.tmp-*`` never counts)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def save_checkpoint(engine, root: Path, state: TrainerState, cfg: RunConfig, info: DistInfo, *,
                    keep_last: int, is_best: bool = False, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``root/step_<state.step>`` atomically (every rank must call it).

    Args:
        engine: the DeepSpeed engine.
        root: the checkpoints directory (shared by all ranks).
        state: trainer state to record; its ``topology`` is filled in here.
        keep_last: complete checkpoints to keep (0 = all); ``latest`` and ``best`` always stay.
        is_best: point ``best`` at this checkpoint.
        tokenizer_dir: copied into ``portable/tokenizer``.
    """
    name = checkpoint_name(state.step)
    tmp = root / f".tmp-{name}"
    state.topology = topology(cfg, info)
    if info.is_main:
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()

    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
    _save_rng(tmp / "rng" / f"rank_{info.rank:05d}.pt")
    weights, optim = gather_portable(engine, info)
    if info.is_main:
        _write_portable(tmp / PORTABLE, weights, optim, engine, state, cfg, tokenizer_dir)
        _write_text(tmp / "trainer_state.json", json.dumps(asdict(state), indent=1))
    barrier()  # every rank's files are in tmp

    if info.is_main:
        _publish(root, tmp, name, is_best)
        _prune(root, keep_last)
    barrier()
    return root / name


def _publish(root: Path, tmp: Path, name: str, is_best: bool) -> None:
    """Rename the finished ``tmp`` to ``root/name``, then move ``latest`` (the commit point)."""
    final = root / name
    if final.exists():  # this step was saved before (training resumed from an earlier checkpoint)
        latest = root / "latest"
        if latest.exists() and latest.read_text().strip() == name:
            # Never leave `latest` naming a directory that is being replaced.
            others = [p.name for p in list_checkpoints(root) if p.name != name]
            if others:
                _write_text(latest, others[-1])
            else:
                latest.unlink()
        old = root / f".tmp-old-{name}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    _write_text(root / "latest", name)
    if is_best:
        _write_text(root / "best", name)


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    protected = {(root / ref).read_text().strip() for ref in ("latest", "best") if (root / ref).exists()}
    complete = list_checkpoints(root)
    for path in complete[: max(len(complete) - keep_last, 0)]:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)


def _save_rng(path: Path) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain types only, so that loading needs no pickle (torch.load(weights_only=True)).
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path)


def _load_rng(path: Path) -> None:
    import numpy as np

    rng = torch.load(path, weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# ---------------------------------------------------------------------------------------
# Portable state: full fp32 weights and Adam moments under ep_size=1 names
# ---------------------------------------------------------------------------------------


def _expert_layers(model: nn.Module) -> dict[str, Any]:
    """Module path -> MoE layer, for every layer whose experts need global ids."""
    from deepspeed.moe.layer import MoE

    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def _global_key(key: str, layers: dict[str, Any]) -> tuple[str, Any]:
    """Local state-dict key -> (ep_size=1 key, owning MoE layer or None)."""
    match = _EXPERT_RE.match(key)
    if match is None or match["layer"] not in layers:
        return key, None
    layer = layers[match["layer"]]
    global_id = layer.ep_rank * layer.num_local_experts + int(match["id"])
    return _expert_key(match["layer"], global_id, match["rest"]), layer


def _expert_key(layer: str, expert_id: int, rest: str) -> str:
    return f"{layer}.deepspeed_moe.experts.deepspeed_experts.{expert_id}.{rest}"


def _zero_optimizer(engine):
    """DeepSpeed's ZeRO optimizer, or None at stage 0."""
    return engine.optimizer if engine.zero_optimization() else None


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _relink_optimizer_state(zero) -> None:
    # DeepSpeed 0.19.8 links the per-parameter views of the optimizer state after the first
    # parameter group's step only, so the MoE group's fragments are empty and
    # safe_get_full_optimizer_state raises (docs/deepspeed-ep.md, Q6). Private API: pinned.
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def _optimizer_step(engine) -> int:
    """Steps the optimizer has taken (AdamW and Adafactor both keep a per-parameter ``step``)."""
    steps = [int(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s]
    return max(steps, default=0)


def _state_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every per-parameter tensor of a torch optimizer's state except the shared step count:
    AdamW's ``exp_avg``/``exp_avg_sq``, Adafactor's factored ``row_var``/``col_var`` (matrices)
    or full ``variance`` (vectors)."""
    return {k: v for k, v in state.items() if torch.is_tensor(v) and k != "step"}


def _owns_canonical_experts(layer) -> bool:
    """True on the ranks whose copy of these experts goes into the portable state."""
    if layer.ep_size == dist.get_world_size():
        return True
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_rank(layer.expert_group_name) == 0


def gather_portable(engine, info: DistInfo) -> tuple[dict | None, dict | None]:
    """Collect fp32 weights and optimizer state under global names on rank 0 (collective).

    Returns:
        On rank 0 ``(weights, moments)``: ``weights`` maps every ep_size=1 state-dict key to an
        fp32 CPU tensor; ``moments`` maps parameter keys to the optimizer's state tensors
        (AdamW ``{"exp_avg", "exp_avg_sq"}``, Adafactor ``{"row_var", "col_var"}`` or
        ``{"variance"}``; empty before the first optimizer step). ``(None, None)`` elsewhere.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    model, zero = engine.module, _zero_optimizer(engine)
    layers = _expert_layers(model)
    has_moments = _optimizer_step(engine) > 0
    if zero is not None and has_moments:
        _relink_optimizer_state(zero)
    params = dict(model.named_parameters(remove_duplicate=False))
    base = _base_optimizer(engine)
    # Under ZeRO the optimizer state is elementwise over flat shards (AdamW: exp_avg, exp_avg_sq).
    zero_keys = sorted(_state_tensors(base.state[zero.single_partition_of_fp32_groups[0]])) \
        if zero is not None and has_moments else []
    mine: list[tuple[str, torch.Tensor, dict]] = []
    # Every rank walks the same keys in the same order: the safe_get_* calls are collectives
    # over each parameter's data-parallel group.
    for key, tensor in model.state_dict(keep_vars=True).items():
        gkey, layer = _global_key(key, layers)
        param = params.get(key)
        moments = {}
        value = tensor.detach()  # buffers, and parameters outside the optimizer (frozen)
        # ZeRO marks every optimized parameter with `_hp_mapping` (None where this rank holds no
        # part of it: the call is still a collective every rank must make).
        if param is not None and zero is not None and hasattr(param, "_hp_mapping"):
            value = safe_get_full_fp32_param(param)  # the fp32 master, not the bf16/fp16 copy
            if has_moments:
                moments = {k: safe_get_full_optimizer_state(param, k) for k in zero_keys}
        elif param is not None and zero is None and has_moments:
            moments = _state_tensors(base.state.get(param, {}))
        keep = _owns_canonical_experts(layer) if layer is not None else info.is_main
        if keep:
            mine.append((gkey, _cpu32(value), {k: _cpu32(v) for k, v in moments.items()}))
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    if not info.is_main:
        return None, None
    weights, optim = {}, {}
    for part in gathered:
        for gkey, value, moments in part:
            weights[gkey] = value
            if moments:
                optim[gkey] = moments
    return dict(sorted(weights.items())), optim


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to("cpu", torch.float32 if t.is_floating_point() else t.dtype).contiguous().clone()


def _write_portable(path: Path, weights: dict, moments: dict, engine, state: TrainerState, cfg: RunConfig,
                    tokenizer_dir) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt", "moetrain_step": str(state.step)})
    # "adam_step" keeps its first name: checkpoints written before Adafactor existed read the same.
    torch.save({"adam_step": _optimizer_step(engine), "optimizer": cfg.train.optimizer, "moments": moments,
                "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None},
               path / "optimizer.pt")
    save_config(cfg, path / "config.yaml")
    (path / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    if tokenizer_dir is not None and Path(tokenizer_dir).exists():
        src = Path(tokenizer_dir)
        if src.is_dir():
            shutil.copytree(src, path / "tokenizer")
        else:
            (path / "tokenizer").mkdir()
            shutil.copy2(src, path / "tokenizer" / src.name)


def read_portable(path: str | os.PathLike) -> tuple[RunConfig, dict[str, torch.Tensor], TrainerState]:
    """``(config, fp32 state dict with global expert ids, trainer state)`` of a portable dir.

    ``path`` may be the ``portable`` directory or the step directory holding it (what the HF
    exporter and evaluation scripts read; no distributed setup needed).
    """
    from safetensors.torch import load_file

    path = _portable_dir(Path(path))
    cfg = load_config(path / "config.yaml")
    return cfg, load_file(str(path / "model.safetensors")), TrainerState.from_json(path / "trainer_state.json")


def _portable_dir(path: Path) -> Path:
    return path / PORTABLE if (path / PORTABLE).is_dir() else path


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """The checkpoint directory named by ``train.resume``.

    ``latest`` (or ``auto``) reads ``root/latest`` and gives None when no checkpoint exists
    yet (a fresh run). Any other value is a step directory, a ``portable`` directory, or a
    checkpoints root holding a ``latest`` file.
    """
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        pointer = root / "latest"
        return root / pointer.read_text().strip() if pointer.exists() else None
    path = Path(resume)
    if (path / "latest").is_file() and not (path / "trainer_state.json").exists():
        path = path / (path / "latest").read_text().strip()
    if not path.exists():
        raise FileNotFoundError(f"train.resume: no checkpoint at {path}")
    return path


def load_checkpoint(engine, path: Path, cfg: RunConfig, info: DistInfo) -> tuple[TrainerState, bool]:
    """Restore ``path`` into ``engine``; exact when the topology matches, else portable.

    Returns:
        ``(state, exact)``: exact means DeepSpeed's own files and every rank's RNG were
        restored (a bit-identical continuation); otherwise the portable form was used.

    Raises:
        CheckpointMismatch: the checkpoint was written for another architecture, expert
            count or vocabulary (checked before anything is loaded).
    """
    portable = _portable_dir(path)
    saved_cfg = load_config(portable / "config.yaml")
    check_compatible(saved_cfg, cfg, portable / "model.safetensors", engine.module)
    if saved_cfg.train.optimizer != cfg.train.optimizer:
        raise CheckpointMismatch(f"checkpoint {path} was trained with train.optimizer={saved_cfg.train.optimizer} "
                                 f"and this run uses {cfg.train.optimizer}: its optimizer state does not carry over "
                                 f"(nothing was loaded or overwritten); resume with "
                                 f"--set train.optimizer={saved_cfg.train.optimizer}")
    state = TrainerState.from_json(portable / "trainer_state.json")
    exact = portable != path and (path / ENGINE_TAG).is_dir() and state.topology == topology(cfg, info)
    if exact:
        loaded, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no engine checkpoint in {path / ENGINE_TAG}")
        rng = path / "rng" / f"rank_{info.rank:05d}.pt"
        if rng.exists():
            _load_rng(rng)
    else:
        load_portable(engine, portable, cfg)
    state.topology = topology(cfg, info)
    return state, exact


def check_compatible(saved: RunConfig, cfg: RunConfig, weights_file: Path, model: nn.Module) -> None:
    """Refuse a checkpoint whose architecture differs, naming each differing key."""
    from safetensors import safe_open

    diffs = []
    for dotted in ARCH_KEYS:
        section, key = dotted.split(".")
        old, new = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
        if old != new:
            diffs.append(f"{dotted}: checkpoint {old!r}, config {new!r}")
    if not diffs:  # same config, but the model code may have changed: compare names and shapes
        with safe_open(str(weights_file), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        want = expected_global_shapes(model)
        missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        shapes = [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in sorted(want.keys() & have.keys())
                  if have[k] != want[k]]
        diffs += ([f"missing in checkpoint: {missing[:5]}"] if missing else []) + \
                 ([f"not in model: {unexpected[:5]}"] if unexpected else []) + shapes[:5]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {weights_file.parent} does not match this model "
                                 f"(nothing was loaded or overwritten): " + "; ".join(diffs))


def expected_global_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """ep_size=1 state-dict keys and shapes of ``model`` (local experts expanded to all ids)."""
    layers = _expert_layers(model)
    shapes = {}
    for key, tensor in model.state_dict().items():
        match = _EXPERT_RE.match(key)
        if match is not None and match["layer"] in layers:
            for g in range(layers[match["layer"]].num_experts):
                shapes[_expert_key(match["layer"], g, match["rest"])] = tuple(tensor.shape)
        else:
            shapes[key] = tuple(tensor.shape)
    return shapes


def load_portable(engine, portable: Path, cfg: RunConfig) -> None:
    """Set weights, optimizer state and step, and the LR schedule from a portable directory.

    Under ZeRO-1/2 (AdamW only) the moments go through ``safe_set_full_optimizer_state`` into
    whatever sharding this run has; at ZeRO-0 each parameter's state is set whole, so any torch
    optimizer's tensors (Adafactor's factored moments too) come back exactly.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    weights = load_file(str(portable / "model.safetensors"))
    optim = torch.load(portable / "optimizer.pt", weights_only=True)
    model, zero, base = engine.module, _zero_optimizer(engine), _base_optimizer(engine)
    layers = _expert_layers(model)
    adam_step = int(optim["adam_step"])
    if adam_step > 0 and zero is not None:
        _init_adam_state(engine, adam_step)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in model.state_dict(keep_vars=True).items():
        gkey, _ = _global_key(key, layers)
        value = weights[gkey]
        with torch.no_grad():
            tensor.data.copy_(value.to(tensor.device, tensor.dtype))  # the (low-precision) model copy
        param = params.get(key)
        if param is None:
            continue
        if zero is not None:
            safe_set_full_fp32_param(param, value.to(param.device))  # the fp32 master partition
        moments = optim["moments"].get(gkey, {})
        if zero is None and moments:
            base.state[param] = {"step": torch.tensor(float(adam_step)),
                                 **{name: m.to(param.device, param.dtype).clone() for name, m in moments.items()}}
        for name, moment in moments.items() if zero is not None else ():
            safe_set_full_optimizer_state(param, moment.to(param.device), name)
    _set_schedule_step(engine, TrainerState.from_json(portable / "trainer_state.json").step)


def _init_adam_state(engine, adam_step: int) -> None:
    """Create AdamW's state on ZeRO's flat partitions as it is after ``adam_step`` steps (zeros,
    filled in afterwards through ``safe_set_full_optimizer_state``)."""
    zero, base = _zero_optimizer(engine), _base_optimizer(engine)
    for p in zero.single_partition_of_fp32_groups:
        base.state[p].update(step=torch.tensor(float(adam_step)), exp_avg=torch.zeros_like(p),
                             exp_avg_sq=torch.zeros_like(p))
    _relink_optimizer_state(zero)


def _set_schedule_step(engine, step: int) -> None:
    """Put the LR scheduler (and the rate in every group) where it is after ``step`` steps."""
    sched = engine.lr_scheduler
    engine.global_steps = step
    if sched is None:
        return
    sched.last_epoch = step
    lrs = [base_lr * fn(step) for base_lr, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs

