"""Checkpoints of a DeepSpeed run: save every rank's part atomically, resume exactly or portably.

The files and directories are those of :mod:`moetrain.checkpoint_format`, which owns the layout
(and documents it); this module adds what needs a live engine: gathering fp32 weights and
optimizer state under global expert ids on rank 0, DeepSpeed's own files, RNG states, and
restoring all of that into a new engine.

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

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from moetrain import checkpoint_format as fmt
from moetrain.checkpoint_format import TrainerState, checkpoint_name, global_key, resolve_resume
from moetrain.config import RunConfig
from moetrain.utils.atomic import write_text_synced

from .distributed import DistInfo, barrier

__all__ = ["TrainerState", "CheckpointMismatch", "save_checkpoint", "load_checkpoint", "resolve_resume",
           "gather_portable", "restore_portable", "check_compatible", "expected_global_shapes", "ARCH_KEYS"]

#: Config keys that change parameter shapes or names: a checkpoint must agree on all of them.
ARCH_KEYS = ("model.arch", "model.vocab_size", "model.d_model", "model.d_kv", "model.d_ff", "model.num_layers",
             "model.num_decoder_layers", "model.num_heads", "model.relative_attention_num_buckets",
             "model.tie_word_embeddings", "moe.num_experts", "moe.sparse_step")


class CheckpointMismatch(fmt.CheckpointError):
    """The checkpoint was written for another model; nothing was loaded or overwritten."""


def _deepspeed_safe_globals() -> list:
    """The few classes DeepSpeed 0.19.8 pickles into its engine files besides tensors and plain
    containers (ZeRO-1/2 optimizer states: the stage enum, the loss scaler, fragment addresses).
    Data-only classes: allowing them lets ``weights_only=True`` read every engine file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, (_enum_member, "builtins.getattr")]


def _enum_member(cls, name: str):
    """Stands in for ``getattr`` while unpickling, for enum members only.

    Some Python builds pickle an enum member by name, as ``getattr(EnumClass, name)`` (3.11.2
    does; 3.11.7 pickles it by value), so the ZeRO stage enum in DeepSpeed's optimizer files
    arrives as a call to ``getattr``. Allowing the real ``getattr`` would let a crafted file reach
    any attribute of an allowed class; this accepts nothing but a member of an allowed enum."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if cls is not ZeroStageEnum or not isinstance(name, str) or name not in ZeroStageEnum.__members__:
        raise fmt.UnsafePickle(f"getattr({getattr(cls, '__name__', cls)!r}, {name!r}) is not an enum member "
                               "moetrain allows in a checkpoint")
    return ZeroStageEnum[name]


@contextlib.contextmanager
def safe_engine_loads(engine, hint: Callable[[], str] = str):
    """While the block runs, every file DeepSpeed's checkpoint engine loads goes through
    ``torch.load(weights_only=True)`` (DeepSpeed's own engine unpickles with ``weights_only=False``,
    so a crafted checkpoint could run code on resume). A refused, truncated, corrupt or missing
    file is a :class:`~moetrain.checkpoint_format.CheckpointError` naming it, its step and
    ``hint()`` (called only then)."""
    ckpt_engine = engine.checkpoint_engine
    allowed = _deepspeed_safe_globals()

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, OSError
            raise fmt.file_error(path, err, hint()) from None

    ckpt_engine.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del ckpt_engine.load


def topology(cfg: RunConfig, info: DistInfo) -> dict[str, Any]:
    return {"world_size": info.world_size, "ep_size": cfg.parallel.ep_size,
            "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision}


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def save_checkpoint(engine, root: Path, state: TrainerState, cfg: RunConfig, info: DistInfo, *,
                    keep_last: int, is_best: bool = False, tokenizer_dir: str | os.PathLike | None = None,
                    own: set[str] | None = None) -> Path:
    """Write ``root/step_<state.step>`` atomically (every rank must call it).

    Args:
        engine: the DeepSpeed engine.
        root: the checkpoints directory (shared by all ranks).
        state: trainer state to record; its ``topology`` is filled in here.
        keep_last: complete checkpoints to keep (0 = all); ``latest`` and ``best`` always stay.
        is_best: point ``best`` at this checkpoint.
        tokenizer_dir: copied into ``portable/tokenizer``.
        own: names of the checkpoints this run saved so far (this one is added); pruning never
            deletes a newer checkpoint this run did not write (:func:`~moetrain.checkpoint_format.prune`).
    """
    name = checkpoint_name(state.step)
    tmp = root / f".tmp-{name}"
    state.topology = topology(cfg, info)
    if info.is_main:
        fmt.remove_stale(root)  # left by a run killed while saving
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()

    engine.save_checkpoint(str(tmp), tag=fmt.ENGINE_DIR, save_latest=False)
    _save_rng(tmp / fmt.RNG_DIR / f"rank_{info.rank:05d}.pt")
    weights, optim = gather_portable(engine, info)
    if info.is_main:
        _write_portable(tmp / fmt.PORTABLE, weights, optim, engine, state, cfg, tokenizer_dir)
        write_text_synced(tmp / fmt.TRAINER_STATE, state.to_json())
    barrier()  # every rank's files are in tmp

    if info.is_main:
        fmt.publish(root, tmp, name, is_best)
        if own is not None:
            own.add(name)
        fmt.prune(root, keep_last, own)
    barrier()
    return root / name


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

    rng = fmt.load_tensors(path)
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
        gkey, layer = global_key(key, layers)
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
    if info.world_size == 1:
        # Measured: pickling the whole state through gather_object on one process left every later
        # step ~33% slower on a 2-core CPU (2100 -> 1400 tokens/s on the Multi30k recipe), for the rest
        # of the run; with nothing to gather there is no reason to pay it.
        gathered[0] = mine
    else:
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
    """Rank 0's part of a save: the portable files (a separate function so that tests can stop a
    run right after it, before the checkpoint is published)."""
    optimizer = {"adam_step": _optimizer_step(engine), "optimizer": cfg.train.optimizer, "moments": moments,
                 "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None}
    fmt.write_portable(path, weights, cfg, metadata={"format": "pt", "moetrain_step": str(state.step)}, state=state,
                       optimizer=optimizer, tokenizer=tokenizer_dir)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_checkpoint(engine, path: Path, cfg: RunConfig, info: DistInfo) -> tuple[TrainerState, bool]:
    """Restore ``path`` into ``engine``; exact when the topology matches, else portable.

    Returns:
        ``(state, exact)``: exact means DeepSpeed's own files and every rank's RNG were
        restored (a bit-identical continuation); otherwise the portable form was used.

    Raises:
        CheckpointMismatch: the checkpoint was written for another architecture, expert
            count or vocabulary (checked before anything is loaded).
    """
    portable = fmt.portable_dir(path)
    saved_cfg = fmt.read_config(portable / fmt.CONFIG)
    state = TrainerState.from_json(portable / fmt.TRAINER_STATE)
    exact = portable != path and (path / fmt.ENGINE_DIR).is_dir() and state.topology == topology(cfg, info)
    # An exact resume reads DeepSpeed's files, so it does not need readable portable weights.
    check_compatible(saved_cfg, cfg, portable / fmt.WEIGHTS, engine.module, weights_optional=exact)
    if saved_cfg.train.optimizer != cfg.train.optimizer:
        raise CheckpointMismatch(f"checkpoint {path} was trained with train.optimizer={saved_cfg.train.optimizer} "
                                 f"and this run uses {cfg.train.optimizer}: its optimizer state does not carry over "
                                 f"(nothing was loaded or overwritten); resume with "
                                 f"--set train.optimizer={saved_cfg.train.optimizer}")
    if exact:
        hint = lambda: _portable_hint(portable)  # noqa: E731
        if not any((path / fmt.ENGINE_DIR).glob("mp_rank_*_model_states.pt")):  # DeepSpeed would only assert
            raise fmt.CheckpointError(f"{path / fmt.ENGINE_DIR} (checkpoint step {state.step}): DeepSpeed's model "
                                      f"states file (mp_rank_00_model_states.pt) is missing{hint()}")
        with safe_engine_loads(engine, hint):
            loaded, _ = engine.load_checkpoint(str(path), tag=fmt.ENGINE_DIR, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if loaded is None:
            raise fmt.CheckpointError(f"{path / fmt.ENGINE_DIR} (checkpoint step {state.step}): DeepSpeed found no "
                                      f"engine checkpoint in it{hint()}")
        rng = path / fmt.RNG_DIR / f"rank_{info.rank:05d}.pt"
        if rng.exists():
            try:
                _load_rng(rng)
            except fmt.CheckpointError as err:
                raise fmt.CheckpointError(f"{err}{hint()}") from None
    else:
        restore_portable(engine, portable)
    state.topology = topology(cfg, info)
    return state, exact


def _portable_hint(portable: Path) -> str:
    """What to do when an engine file of this step cannot be used: its portable copy, if intact."""
    try:
        from safetensors import safe_open

        with safe_open(str(portable / fmt.WEIGHTS), framework="pt") as f:
            f.keys()
        fmt.read_optimizer(portable)
    except Exception:  # noqa: BLE001 - any failure: the portable copy cannot be offered
        return "; the portable copy of this step is unusable too: resume from an earlier checkpoint"
    return (f"; the portable copy of the same step is intact: resume from it with "
            f"--set train.resume={portable} (nothing was changed)")


def check_compatible(saved: RunConfig, cfg: RunConfig, weights_file: Path, model: nn.Module, *,
                     weights_optional: bool = False) -> None:
    """Refuse a checkpoint whose architecture differs, naming each differing key.

    With equal configs the weight names and shapes in ``weights_file`` are compared too; an
    unreadable file is a :class:`~moetrain.checkpoint_format.CheckpointError` unless
    ``weights_optional`` (an exact resume, which loads DeepSpeed's files instead)."""
    from safetensors import safe_open

    diffs = []
    for dotted in ARCH_KEYS:
        section, key = dotted.split(".")
        old, new = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
        if old != new:
            diffs.append(f"{dotted}: checkpoint {old!r}, config {new!r}")
    if not diffs:  # same config, but the model code may have changed: compare names and shapes
        try:
            with safe_open(str(weights_file), framework="pt") as f:
                have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: truncated or corrupt
            if weights_optional:
                return
            raise fmt.file_error(weights_file, err) from None
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
        match = fmt.EXPERT_KEY.match(key)
        if match is not None and match["layer"] in layers:
            for g in range(layers[match["layer"]].num_experts):
                shapes[fmt.expert_key(match["layer"], g, match["rest"])] = tuple(tensor.shape)
        else:
            shapes[key] = tuple(tensor.shape)
    return shapes


def restore_portable(engine, portable: Path) -> None:
    """Set weights, optimizer state and step, and the LR schedule from a portable directory.

    Under ZeRO-1/2 (AdamW only) the moments go through ``safe_set_full_optimizer_state`` into
    whatever sharding this run has; at ZeRO-0 each parameter's state is set whole, so any torch
    optimizer's tensors (Adafactor's factored moments too) come back exactly.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    weights = fmt.load_weights(portable / fmt.WEIGHTS)
    optim = fmt.read_optimizer(portable)
    model, zero, base = engine.module, _zero_optimizer(engine), _base_optimizer(engine)
    layers = _expert_layers(model)
    adam_step = int(optim["adam_step"])
    if adam_step > 0 and zero is not None:
        _init_adam_state(engine, adam_step)
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in model.state_dict(keep_vars=True).items():
        gkey, _ = global_key(key, layers)
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
    _set_schedule_step(engine, TrainerState.from_json(portable / fmt.TRAINER_STATE).step)


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

