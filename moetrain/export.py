"""Export to stock Hugging Face SwitchTransformers, and import from it.

Three directory formats meet here:

* **portable** (written by the trainer, read by export; the format is
  :mod:`moetrain.checkpoint_format`'s): ``config.yaml`` (the resolved RunConfig),
  ``model.safetensors`` (fp32 state dict of the ``ep_size=1`` model, experts under their global
  ids) and ``tokenizer/`` (a ``PreTrainedTokenizerFast`` directory).
* **HF** (written by :func:`export_to_hf`): ``config.json``, ``model.safetensors`` (sharded
  above ``max_shard_size``), ``generation_config.json``, tokenizer files,
  ``moetrain_export.json`` (provenance, parity notes) and ``.moetrain-export.json`` (the files
  written: only such a directory is ever replaced, see :func:`check_export_target`). It loads with
  ``SwitchTransformersForConditionalGeneration.from_pretrained`` (or
  ``SwitchTransformersEncoderModel`` for encoder-only models, whose task heads go to
  ``moetrain_heads.safetensors``) without missing or unexpected weights.
* **HF in**: :func:`import_from_hf` reads a local HF SwitchTransformers directory into a
  moetrain state dict, for ``train.init_from_hf`` with any estimator.

Every directory is written into a temporary sibling and renamed into place at the end, so a
failure never leaves a half-written output. Names and shapes: :mod:`moetrain.hf_convert`.

    moetrain export runs/wmt-switch8 --out hf/wmt-switch8
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moetrain import __version__
from moetrain.checkpoint_format import PortableCheckpoint, enclosing_run_or_checkpoint
from moetrain.hf_convert import (
    EXPORT_EXPERT_CAPACITY,
    ConversionError,
    check_exportable,
    from_hf,
    hf_config_dict,
    model_overrides_from_hf,
    to_hf,
)
from moetrain.models.export_layout import ExportLayout, split_encoder
from moetrain.utils.atomic import atomic_dir
from moetrain.utils.errors import UserError

__all__ = ["ExportError", "export_to_hf", "export_checkpoint", "import_from_hf", "load_hf_state_dict",
           "verify_export", "check_export_target", "record_export_file", "MARKER_FILE"]

HEADS_FILE, PROVENANCE_FILE = "moetrain_heads.safetensors", "moetrain_export.json"
#: Written last into every export: the files export wrote. Only a directory holding it, and
#: nothing else than the files it lists, is ever replaced (and only with ``overwrite``).
MARKER_FILE = ".moetrain-export.json"
#: What exports written before the marker existed hold (recognised by ``moetrain_export.json``).
_LEGACY_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", PROVENANCE_FILE,
                 HEADS_FILE, "moetrain_export_check.json"}


class ExportError(UserError, ValueError):
    """Bad input to export/import; the message names the file or setting that is wrong."""


def check_export_target(out_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse an output directory whose contents an export would destroy; nothing is changed.

    Fine: a missing or empty directory, and (with ``overwrite``) an earlier moetrain export that
    holds only the files it wrote (listed in :data:`MARKER_FILE`). Refused: anything else, and any
    directory that is, or lies inside, a checkpoint or a run directory (``<run>/hf`` is allowed:
    that is where ``train`` exports to).

    Raises:
        ExportError: one line naming the directory, why, and what to do instead.
    """
    out = Path(out_dir)
    inside = enclosing_run_or_checkpoint(out)
    if inside is not None:
        kind, where = inside
        how = f"is a {kind}" if where == Path(os.path.abspath(out)) else f"is inside the {kind} {where}"
        raise ExportError(f"output directory {out} {how}; an export there would replace or mix with its files "
                          f"(nothing was changed): choose a directory of its own, e.g. hf/<name>")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"output directory {out} exists and is not a directory (nothing was changed)")
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    if not names:
        return
    marker = out / MARKER_FILE
    if not marker.is_file() and (out / PROVENANCE_FILE).is_file():
        written = {n for n in names if n in _LEGACY_FILES or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)}
    elif not marker.is_file():
        raise ExportError(f"output directory {out} exists and is not an earlier export of moetrain (no {MARKER_FILE}; "
                          f"it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); nothing was changed: "
                          f"choose another output directory")
    else:
        try:
            written = set(json.loads(marker.read_text())["files"])
        except (ValueError, KeyError, TypeError) as err:
            raise ExportError(f"output directory {out}: unreadable {MARKER_FILE} ({err}); nothing was changed: "
                              f"choose another output directory") from None
    allowed = written | {MARKER_FILE} | {parent.as_posix() for f in written for parent in Path(f).parents} - {"."}
    extra = [n for n in names if n not in allowed]
    if extra:
        raise ExportError(f"output directory {out} holds an earlier export plus files export did not write "
                          f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); nothing was changed: "
                          f"move them out or choose another output directory")
    if not overwrite:
        raise ExportError(f"output directory {out} holds an earlier moetrain export; nothing was changed: pass "
                          f"--overwrite to replace it, or choose another output directory")


def record_export_file(out_dir: str | os.PathLike, name: str) -> None:
    """Add ``name``, written into an export after the fact (``train``'s check report), to the files
    :data:`MARKER_FILE` lists, so that the next export may replace the directory."""
    marker = Path(out_dir) / MARKER_FILE
    record = json.loads(marker.read_text())
    record["files"] = sorted(set(record["files"]) | {name})
    marker.write_text(json.dumps(record, indent=1) + "\n")


def _write_marker(tmp: Path) -> None:
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    (tmp / MARKER_FILE).write_text(json.dumps({"written_by": "moetrain export", "moetrain_version": __version__,
                                               "files": files}, indent=1) + "\n")


def _cpu_tensors(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors; aliases are copied (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def _split_encoder(state_dict: dict[str, Tensor], prefix: str | None) -> tuple[dict, dict, str]:
    try:
        return split_encoder(state_dict, prefix)
    except ValueError as err:
        raise ExportError(str(err)) from None


def _save_tokenizer(tokenizer_dir, out: Path, model_cfg) -> None:
    """Check the tokenizer against the model and save it where ``AutoTokenizer`` finds it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise ExportError(f"missing tokenizer: {path} is not a directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - any loader failure is the same user error
        if not (path / "tokenizer.json").is_file():
            raise ExportError(f"cannot load the tokenizer at {path}: {err}") from err
        # A bare tokenizers file (no tokenizer_config.json): wrap it.
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    # HF generate and pipelines read these; name them after the model's ids if missing.
    if tok.pad_token is None and model_cfg.pad_token_id < len(tok):
        tok.pad_token = tok.convert_ids_to_tokens(model_cfg.pad_token_id)
    if tok.eos_token is None and model_cfg.eos_token_id < len(tok):
        tok.eos_token = tok.convert_ids_to_tokens(model_cfg.eos_token_id)
    if len(tok) > model_cfg.vocab_size:
        raise ExportError(f"vocab size mismatch: the tokenizer has {len(tok)} tokens but model.vocab_size is "
                          f"{model_cfg.vocab_size}")
    for name in ("pad_token_id", "eos_token_id"):
        tid = getattr(tok, name)
        if tid is not None and tid != getattr(model_cfg, name):
            raise ExportError(f"tokenizer {name}={tid} but model.{name}={getattr(model_cfg, name)}")
    tok.save_pretrained(str(out))


def _save_weights(hf_state: dict[str, Tensor], out: Path, max_shard_size: str | int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: hf_state[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_to_hf(state_dict: dict[str, Tensor], model_cfg, moe_cfg, out_dir: str | os.PathLike,
                 tokenizer_dir: str | os.PathLike | None = None, generation: dict | None = None, *,
                 max_shard_size: str | int = "2GB", prefix: str | None = None, source: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write a stock HF SwitchTransformers directory.

    Args:
        state_dict: moetrain state dict of the ``ep_size=1`` model (a portable checkpoint's).
        model_cfg: ``ModelConfig``; ``arch`` picks ForConditionalGeneration or EncoderModel.
        moe_cfg: ``MoEConfig`` (estimator, experts, placement, loss coefficients).
        out_dir: destination: missing or empty, or (with ``overwrite``) an earlier moetrain export,
            which is then replaced; anything else is refused (:func:`check_export_target`).
        tokenizer_dir: tokenizer directory to include (None: no tokenizer files).
        generation: ``num_beams``, ``length_penalty``, ``max_length`` (HF: start token
            included), optional ``early_stopping`` for ``generation_config.json``.
        max_shard_size: largest safetensors file (``"2GB"``, ``"500MB"`` or bytes).
        prefix: encoder-only: key prefix of the encoder in ``state_dict`` (default: detected);
            all other keys go to ``moetrain_heads.safetensors``.
        source: recorded in ``moetrain_export.json``.
        overwrite: replace an earlier moetrain export at ``out_dir``.

    Raises:
        ExportError / ConversionError: wrong keys or shapes, routing HF cannot run, bad tokenizer.
    """
    from transformers import GenerationConfig, SwitchTransformersConfig

    if model_cfg.arch not in ("encoder_decoder", "encoder"):
        raise ExportError(f"model.arch {model_cfg.arch!r} has no HF SwitchTransformers class")
    check_export_target(out_dir, overwrite=overwrite)
    note = check_exportable(moe_cfg)
    if note is not None:
        warnings.warn(f"export of a {moe_cfg.estimator} model is approximate in HF: {note}", stacklevel=2)
    if moe_cfg.eval_capacity_factor is not None:
        warnings.warn(f"moe.eval_capacity_factor={moe_cfg.eval_capacity_factor} drops tokens at moetrain's "
                      f"evaluation; the export is dropless (expert_capacity={EXPORT_EXPERT_CAPACITY})", stacklevel=2)
    heads, used_prefix = {}, ""
    if model_cfg.arch == "encoder":
        state_dict, heads, used_prefix = _split_encoder(state_dict, prefix)
    hf_state = _cpu_tensors(to_hf(state_dict, model_cfg, moe_cfg))
    hf_config = SwitchTransformersConfig(**hf_config_dict(model_cfg, moe_cfg))
    with atomic_dir(out_dir) as tmp:
        if tokenizer_dir is not None:
            _save_tokenizer(tokenizer_dir, tmp, model_cfg)
        hf_config.save_pretrained(str(tmp))
        _save_weights(hf_state, tmp, max_shard_size)
        if model_cfg.arch == "encoder_decoder":
            gen = dict(generation or {})
            unknown = set(gen) - {"num_beams", "length_penalty", "max_length", "early_stopping"}
            if unknown:
                raise ExportError(f"unknown generation settings {sorted(unknown)}")
            if gen.get("num_beams", 1) > 1:  # HF rejects early_stopping without beams
                gen.setdefault("early_stopping", True)
            GenerationConfig(decoder_start_token_id=model_cfg.decoder_start_token_id,
                             pad_token_id=model_cfg.pad_token_id, eos_token_id=model_cfg.eos_token_id,
                             **gen).save_pretrained(str(tmp))
        if heads:
            save_file(_cpu_tensors(heads), str(tmp / HEADS_FILE), metadata={"format": "pt"})
        provenance = {
            "moetrain_version": __version__, "source": source, "arch": model_cfg.arch,
            "estimator": moe_cfg.estimator, "inference_parity": "exact" if note is None else "approximate",
            "parity_note": note, "omega_folded_into_wo": moe_cfg.estimator == "sparsemixer",
            "expert_capacity": EXPORT_EXPERT_CAPACITY,
            "heads_file": HEADS_FILE if heads else None, "encoder_prefix": used_prefix or None,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _write_marker(tmp)
        check_export_target(out_dir, overwrite=overwrite)  # again, right before the swap
    return Path(out_dir)


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------


def load_hf_state_dict(hf_dir: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of an HF directory (safetensors or ``.bin``, single file or sharded)."""
    root = Path(hf_dir)
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        if (root / index_name).is_file():
            files = sorted(set(json.loads((root / index_name).read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for name in files:
                state.update(loader(str(root / name)))
            return state
    if (root / "model.safetensors").is_file():
        return load_file(str(root / "model.safetensors"))
    if (root / "pytorch_model.bin").is_file():
        return _load_bin(str(root / "pytorch_model.bin"))
    raise ExportError(f"no weights in {root} (expected model.safetensors[.index.json] or pytorch_model.bin)")


def _load_bin(path: str) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def import_from_hf(hf_dir: str | os.PathLike, *, estimator: str = "switch") -> tuple[dict[str, Tensor], dict]:
    """Read a local HF SwitchTransformers directory as a moetrain state dict.

    Args:
        hf_dir: directory with ``config.json`` and weights (``save_pretrained`` output).
        estimator: the estimator training will use; ``sparsemixer`` adds ``omega`` = 1.

    Returns:
        ``(state_dict, overrides)``: weights under moetrain names (``ep_size=1``, global
        expert ids) and the dotted ``model.*`` / ``moe.*`` settings the architecture needs
        (apply them like a preset; exporting the result reproduces the weights bit for bit).
    """
    from moetrain.config import ModelConfig, MoEConfig

    root = Path(hf_dir)
    if not (root / "config.json").is_file():
        raise ExportError(f"{root} has no config.json; is it a Hugging Face model directory?")
    config = json.loads((root / "config.json").read_text())
    overrides = model_overrides_from_hf(config)
    fields = {section: {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(section + ".")}
              for section in ("model", "moe")}
    model_cfg = ModelConfig(**fields["model"])
    moe_cfg = MoEConfig(**fields["moe"], estimator=estimator)
    return from_hf(load_hf_state_dict(root), model_cfg, moe_cfg), overrides


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------


@torch.no_grad()
def verify_export(hf_dir: str | os.PathLike, state_dict: dict[str, Tensor], model_cfg, moe_cfg, *,
                  batch: int = 2, length: int = 9, seed: int = 0) -> float:
    """Max |moetrain - HF| over non-padding outputs (logits, or encoder states) on a random batch.

    Both models run in float32 eval mode; the batch has padding in its last row.
    """
    import transformers

    from moetrain.models import build_model

    model = build_model(model_cfg, moe_cfg).eval()
    if model_cfg.arch == "encoder":
        state_dict = _split_encoder(state_dict, None)[0]
    model.load_state_dict(state_dict)
    agreement = _record_bias_agreement(model)
    cls = (transformers.SwitchTransformersEncoderModel if model_cfg.arch == "encoder"
           else transformers.SwitchTransformersForConditionalGeneration)
    hf = cls.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model_cfg.vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, length // 2:] = 0
    if model_cfg.arch == "encoder":
        ours, _ = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool()
    else:
        dec = torch.randint(2, model_cfg.vocab_size, (batch, length - 2), generator=gen)
        dec[:, 0] = model_cfg.decoder_start_token_id
        ours = model(ids, mask, dec).logits
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        valid = torch.ones_like(dec, dtype=torch.bool)
    if agreement:
        warnings.warn(f"aux-free selection bias dropped in HF: {_agreement_text(agreement)}", stacklevel=2)
    return float((ours - theirs).abs()[valid].max())


def _record_bias_agreement(model) -> list[float]:
    """Per aux-free MoE layer, the share of routed tokens whose expert is the same with and
    without the selection bias (what the HF export, which has no bias, still routes alike)."""
    from moetrain.moe import moe_layers

    shares: list[float] = []

    def hook(layer, inputs, logits):
        probs = logits.softmax(-1)
        same = probs.argmax(-1) == (probs + layer.selection_bias.to(probs.dtype)).argmax(-1)
        shares.append(float(same.double().mean()))

    for layer in moe_layers(model):
        if layer.selection_bias is not None:
            layer.router.register_forward_hook(lambda m, i, o, layer=layer: hook(layer, i, o))
    return shares


def _agreement_text(shares: list[float]) -> str:
    return (f"top-1 agreement with moetrain's routing on the check batch: min {min(shares):.1%}, "
            f"mean {sum(shares) / len(shares):.1%} over {len(shares)} MoE layer call(s)")


# ---------------------------------------------------------------------------
# A checkpoint
# ---------------------------------------------------------------------------


def export_checkpoint(ckpt: PortableCheckpoint, out: str | os.PathLike, layout: ExportLayout = ExportLayout(), *,
                      max_shard_size: str | None = None, overwrite: bool = False) -> Path:
    """Export a portable checkpoint (already read) to an HF directory.

    Args:
        ckpt: from :func:`moetrain.checkpoint_format.read_portable`.
        out: the HF directory to write.
        layout: the ``export_layout`` of the model that wrote ``ckpt`` (which keys are the
            Switch model, which are heads, which stay behind).
        max_shard_size: largest weight file (default: the checkpoint's ``export.max_shard_size``).
        overwrite: replace an earlier moetrain export at ``out`` (see :func:`check_export_target`).

    Raises:
        ExportError: an encoder-decoder checkpoint without its tokenizer (generation needs
            it), keys that do not fit ``layout``, or anything :func:`export_to_hf` refuses.
    """
    cfg = ckpt.cfg
    if ckpt.tokenizer_dir is None and cfg.model.arch == "encoder_decoder":
        raise ExportError(f"missing tokenizer: {ckpt.path / 'tokenizer'} does not exist (the HF export needs it)")
    try:
        state_dict = layout.select(ckpt.weights)
    except ValueError as err:
        raise ExportError(f"{ckpt.path}: {err}") from None
    generation = {"num_beams": cfg.train.beam_size, "length_penalty": cfg.train.length_penalty,
                  "max_length": cfg.train.max_decode_length + 1}
    export_to_hf(state_dict, cfg.model, cfg.moe, out, ckpt.tokenizer_dir, generation,
                 max_shard_size=max_shard_size or cfg.export.max_shard_size, prefix=layout.prefix or None,
                 source=str(ckpt.path), overwrite=overwrite)
    return Path(out)
