"""Typed run configuration: one dataclass per YAML section, loaded strictly.

A recipe is a YAML file with the sections of :class:`RunConfig`::

    name: wmt14-switch8
    model: {preset: switch-base-8}
    moe:   {estimator: sparsemixer, capacity_factor: 1.5}
    train: {lr: 7e-4, max_steps: 100000}

:func:`load_config` resolves it in this order (later wins):

1. the dataclass defaults below,
2. the named preset (``model.preset``; a dict of dotted keys, see :data:`PRESETS`),
3. the keys written in the file,
4. ``--set section.key=value`` overrides (each value parsed as YAML).

Every key is checked: unknown keys get a "did you mean" suggestion, values are
coerced to the declared type, and cross-field rules (:func:`validate`) run before
any work starts, so a typo fails in a second instead of after the model is built.
Every error is a :class:`ConfigError` whose one-line message names the file and
the dotted key.

PyYAML reads ``1e-3`` (no dot) as the *string* ``'1e-3'``; the generic loader in
:mod:`moetrain.utils.dataclass_yaml` coerces it to the declared ``float``.

Constructors elsewhere take their own section (``cfg.moe``) or plain arguments,
never the whole :class:`RunConfig` (design.md, decision 10).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from moetrain.utils.argtypes import SIZE_PATTERN
from moetrain.utils.dataclass_yaml import (
    ConfigError,
    Context,
    build_dataclass,
    choices,
    did_you_mean,
    dump_yaml,
    field_docs,
    merge_into,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    to_plain,
    write_atomic,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "MoEConfig",
    "DataConfig",
    "TrainConfig",
    "ParallelConfig",
    "ExportConfig",
    "ElectraConfig",
    "GlueConfig",
    "GLUE_TASKS",
    "RunConfig",
    "PRESETS",
    "TASKS",
    "load_config",
    "validate",
    "config_to_dict",
    "config_to_yaml",
    "save_config",
    "known_estimators",
    "field_docs",
    "absolute_paths",
    "PATH_KEYS",
]


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Switch Transformer dimensions, in T5 layout (the export target is HF's class)."""

    preset: str | None = None
    """Named size from :data:`PRESETS` (e.g. ``switch-base-8``). Its values are applied
    before the file's keys, so anything written explicitly wins."""

    arch: str = choices("encoder_decoder", "encoder_decoder", "encoder")
    """``encoder_decoder`` for translation (SwitchTransformersForConditionalGeneration);
    ``encoder`` for classification/ELECTRA (SwitchTransformersEncoderModel)."""

    vocab_size: int = 32128
    """Rows of the embedding and output matrices. Must cover the tokenizer's vocabulary
    (T5 pads 32000 SentencePiece pieces + 100 sentinels to 32128)."""

    d_model: int = 512
    """Width of the residual stream."""

    d_kv: int = 64
    """Width of one attention head. As in T5 it is independent of d_model: the attention
    inner width is num_heads * d_kv."""

    d_ff: int = 2048
    """Hidden width of the dense FFN and of each expert."""

    num_layers: int = 6
    """Encoder blocks."""

    num_decoder_layers: int = 6
    """Decoder blocks (ignored when arch is ``encoder``)."""

    num_heads: int = 8
    """Attention heads per layer."""

    relative_attention_num_buckets: int = 32
    """T5 relative-position buckets; the bias table lives in the first block of each stack."""

    relative_attention_max_distance: int = 128
    """Distances beyond this share the last (logarithmic) bucket."""

    dropout_rate: float = 0.1
    """Dropout on attention probabilities, FFN hidden units and residual branches."""

    layer_norm_epsilon: float = 1e-6
    """Epsilon of the T5 RMS layer norm."""

    tie_word_embeddings: bool = True
    """Share input embedding and output projection (T5 v1.0 / Switch do; the output is then
    scaled by d_model**-0.5 before the projection)."""

    pad_token_id: int = 0
    """Padding id; excluded from the loss and from routing statistics."""

    eos_token_id: int = 1
    """End-of-sequence id appended to every source and target."""

    decoder_start_token_id: int = 0
    """First decoder input (T5 convention: the pad id)."""


@dataclass
class MoEConfig:
    """Sparse FFN layers: router, gradient estimator, capacity and auxiliary losses."""

    num_experts: int = 8
    """Experts per sparse layer (global count, summed over expert-parallel ranks)."""

    top_k: int = 1
    """Experts each token is sent to in the forward pass."""

    estimator: str = "switch"
    """Router gradient estimator, a key of ``moetrain.moe.estimators.ESTIMATORS``
    (switch, topk, sparsemixer, sparsemixer_v2, st, stgs, reinmax). See docs/estimators."""

    capacity_factor: float | None = 1.25
    """Training capacity per expert = ceil(tokens / num_experts * factor); overflowing tokens
    skip the FFN (residual only). ``null`` = dropless (no token is ever dropped)."""

    eval_capacity_factor: float | None = None
    """Same at evaluation and decoding. ``null`` = dropless, so scores do not depend on
    batch composition."""

    min_capacity: int = 4
    """Floor on the per-expert capacity, so tiny batches do not drop everything."""

    jitter_eps: float = 0.1
    """Multiplicative noise U(1-eps, 1+eps) during training (see jitter_mode). SparseMixer
    also uses it as the width of its sampling mask."""

    jitter_mode: str = choices("input", "input", "logits", "none")
    """Where jitter applies: ``input`` (Switch paper / HF: the router input), ``logits``
    (the SparseMixer code's baseline) or ``none``."""

    temperature: float = 1.0
    """Softmax temperature of the router (used by STGS/ReinMax; 1 = plain softmax)."""

    balance_coef: float = 0.01
    """Weight of the load-balancing loss, summed over sparse layers (per-token normalised).
    Applied when ``balance`` includes ``aux_loss``."""

    balance: str = choices("aux_loss", "aux_loss", "aux_free", "aux_loss+aux_free")
    """How experts are kept busy: ``aux_loss`` (the Switch balance loss), ``aux_free``
    (DeepSeek-V3's per-expert selection bias, moved after each optimizer step towards equal
    load; no balance loss) or both. aux_free works with the switch and topk estimators."""

    balance_scope: str = choices("micro_batch", "micro_batch", "global")
    """Where the balance loss counts expert loads: ``micro_batch`` (each rank's micro-batch, the
    Switch paper) or ``global`` (every rank's tokens of the optimizer step; lower perplexity and
    more specialised experts in Qiu et al. 2025). Formula: docs/training.md."""

    bias_update_rate: float = 1e-3
    """Step of the aux-free bias update ``b_i += rate * sign(mean load - load_i)`` (torchtitan's
    default)."""

    z_coef: float = 0.001
    """Weight of the router z-loss (mean squared logsumexp of the logits)."""

    sparse_step: int = 2
    """HF placement: layer i is sparse when i % sparse_step == 1, every layer when it is 1."""

    @property
    def aux_free(self) -> bool:
        """``balance`` includes the aux-loss-free selection bias."""
        return "aux_free" in self.balance.split("+")

    @property
    def balance_loss_weight(self) -> float:
        """The weight the tasks give the balance loss: ``balance_coef``, or 0 under aux_free alone."""
        return self.balance_coef if "aux_loss" in self.balance.split("+") else 0.0


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and batched."""

    source: str = choices("synthetic", "synthetic", "hub", "files", "tsv", "jsonl")
    """``synthetic`` (generated, offline), ``hub`` (a datasets-hub name), ``files`` (parallel
    plain-text files), ``tsv`` (source<TAB>target) or ``jsonl`` (one pair per line)."""

    hub_name: str | None = None
    """Dataset name when source is ``hub`` (e.g. ``wmt14``)."""

    hub_config: str | None = None
    """Dataset configuration when source is ``hub`` (e.g. ``de-en``)."""

    train_src: str | None = None
    """Training source file (for ``tsv``/``jsonl``: the one file holding both sides). With ``files``
    also several, comma-separated and/or glob patterns (``news*.en``), paired in order with
    ``train_tgt``'s (the same for valid/test)."""

    train_tgt: str | None = None
    """Training target file(s) (``files`` only)."""

    valid_src: str | None = None
    """Validation source file."""

    valid_tgt: str | None = None
    """Validation target file."""

    test_src: str | None = None
    """Test source file."""

    test_tgt: str | None = None
    """Test target (reference) file."""

    src_lang: str = "en"
    """Source language code (quote ``"no"`` in YAML: bare it reads as false)."""

    tgt_lang: str = "de"
    """Target language code."""

    tokenizer: str | None = None
    """Path of a trained tokenizer; ``null`` = train one on the training data into the run
    directory."""

    vocab_size: int = 8000
    """Vocabulary size when a tokenizer is trained. Must be <= model.vocab_size."""

    max_tokens: int = 4096
    """Token budget of one micro-batch on one rank (padded source + target tokens)."""

    max_length: int = 256
    """Longer training pairs (in tokens, either side) are skipped."""

    max_length_ratio: float = 2.5
    """Training pairs whose length ratio exceeds this are skipped (misaligned pairs)."""

    num_workers: int = 1
    """Data-loader worker processes per rank."""

    cache_dir: str | None = None
    """Cache for downloaded/tokenized data; ``null`` = the library default."""

    synthetic_num_train: int = 20000
    """Training pairs generated when source is ``synthetic``."""

    synthetic_num_valid: int = 200
    """Validation pairs generated when source is ``synthetic``."""


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging, checkpoints and decoding."""

    seed: int = 1
    """Seeds initialisation, data order and routing noise (all counter-based)."""

    max_steps: int = 1000
    """Optimizer steps (one step = grad_accum_steps micro-batches on every rank)."""

    optimizer: str = choices("adamw", "adamw", "adafactor")
    """``adamw`` (torch.optim.AdamW) or ``adafactor`` (torch.optim.Adafactor, as T5 and the Switch
    Transformer were trained). Adafactor moves each weight by ``lr`` times its own RMS, so the
    N(0, 1) tied embedding learns as fast as the ~d_model**-0.5 matrices; AdamW moves every weight
    by ~lr in absolute terms, which leaves the embedding ~16x slower (docs/translation.md).
    Adafactor needs ``parallel.zero_stage: 0``: ZeRO-1/2 hand the optimizer flat 1-D shards, on which
    its factored moments and per-weight RMS mean something else (docs/training.md)."""

    lr: float = 7e-4
    """Peak learning rate, reached at the end of warmup. For adafactor it is the relative step:
    each update is at most ``lr`` x RMS(weight) (T5: 1e-2)."""

    lr_scale: dict[str, float] = field(default_factory=dict)
    """Per-parameter-group learning-rate multipliers: ``{pattern: factor}``; a parameter whose name
    matches the regular expression ``pattern`` (``re.search``; first match wins) trains at
    ``factor`` x the scheduled rate, e.g. ``{embed: 10}`` for the tied embedding under AdamW.
    Each pattern must match at least one parameter."""

    warmup_steps: int = 4000
    """Linear warmup from 0 to lr."""

    schedule: str = choices("inverse_sqrt", "inverse_sqrt", "linear", "constant")
    """After warmup: ``inverse_sqrt`` (lr * sqrt(warmup / step)), ``linear`` decay to 0 at
    max_steps, or ``constant``."""

    adam_betas: tuple[float, float] = (0.9, 0.98)
    """AdamW (beta1, beta2); 0.98 is the usual Transformer choice."""

    adam_eps: float = 1e-8
    """AdamW epsilon."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    label_smoothing: float = 0.1
    """Label smoothing of the token cross-entropy."""

    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""

    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""

    max_minutes: float | None = None
    """Wall-clock training budget in minutes (summed over resumed runs; evaluation and saves
    included): when it is spent the run stops after the current step with the final
    evaluation and a checkpoint, as at max_steps. ``null`` = no budget."""

    precision: str = choices("fp32", "fp32", "bf16", "fp16")
    """Training precision. bf16 under ZeRO-1/2 is DeepSpeed's (bf16 weights, fp32 master copy in the
    optimizer); at ZeRO-0 it is torch.autocast over fp32 weights. fp16 needs a GPU and ZeRO-1/2."""

    compile: bool = False
    """``torch.compile`` each block's dense work (attention, norms, dense FFNs, residuals; MoE
    routing stays eager) before training (``moetrain.models.compile``). The first steps pay the
    compilation; a failed compilation warns and runs eagerly. Losses match eager to float
    rounding, dropout masks included."""

    log_every: int = 10
    """Steps between metric lines (JSONL, TensorBoard, progress bar)."""

    eval_every: int = 500
    """Steps between validations (loss and BLEU); 0 = only at the end."""

    grad_quality_every: int = 0
    """Every N steps, compare the top-1 estimators' router gradients with the exact gradient on the
    first MoE layer, on rank 0's first micro-batch of the step, and write a ``grad_quality`` record
    to metrics.jsonl (docs/estimators.md, "Gradient quality"); 0 = off. Needs every expert on one
    rank: skipped with a warning under ``parallel.ep_size`` > 1."""

    save_every: int = 1000
    """Steps between checkpoints; 0 = only at the end."""

    keep_last: int = 3
    """Checkpoints kept on disk (older ones are deleted); 0 = keep all."""

    plot: bool = True
    """At the end of the run, draw metrics.jsonl as PNG figures into ``<run dir>/plots/`` (loss,
    eval metrics, lr, tokens/s, expert-load heatmaps; ``moetrain plot``), so a finished run can be
    judged without TensorBoard. A plot that fails is a warning line, never a failed run."""

    beam_size: int = 4
    """Beam width for evaluation and translation."""

    length_penalty: float = 0.6
    """Beam length penalty alpha (GNMT form ((5 + len) / 6) ** alpha)."""

    max_decode_length: int = 256
    """Maximum generated tokens per sentence."""

    init_from_hf: str | None = None
    """Start from an HF SwitchTransformers checkpoint (directory or hub name)."""

    resume: str | None = None
    """Checkpoint directory to resume from (same topology), or ``latest`` in the run dir."""


@dataclass
class ParallelConfig:
    """Expert parallelism and DeepSpeed ZeRO."""

    ep_size: int = 1
    """Expert-parallel group size; each rank holds num_experts / ep_size experts."""

    zero_stage: int = choices(0, 0, 1, 2)
    """DeepSpeed ZeRO stage. ZeRO-3 is refused by DeepSpeed for native MoE."""

    deepspeed_config: str | None = None
    """A DeepSpeed JSON file whose keys override the generated configuration."""

    backend: str | None = choices(None, None, "nccl", "gloo")
    """torch.distributed backend; ``null`` = nccl on CUDA, gloo on CPU."""


@dataclass
class ExportConfig:
    """Export to a stock HF SwitchTransformers directory."""

    out_dir: str | None = None
    """Destination directory; ``null`` = ``<run dir>/hf``."""

    max_shard_size: str = "2GB"
    """Largest weight file written (HF syntax: ``500MB``, ``2GB``)."""

    safe_serialization: bool = True
    """Write safetensors (true) or pickle-based ``.bin`` files (false)."""

    after_train: bool = False
    """Translation only: when ``moetrain train`` finishes, export its last checkpoint to
    ``out_dir`` (``null``: ``<run dir>/hf``) and check that the stock HF model reproduces
    moetrain's logits and dev-set translations (the demo turns this on)."""


@dataclass
class ElectraConfig:
    """ELECTRA pretraining (task ``electra``): text, packing, masking, generator and loss weight.

    The tokenizer comes from ``data.tokenizer`` (``null``: trained on this text, ``data.vocab_size``
    tokens, into ``<run dir>/tokenizer``); ``data.cache_dir`` holds the packed sequences.
    """

    source: str = choices("synthetic", "synthetic", "files", "hub")
    """``synthetic`` (sentences from a small built-in grammar, offline), ``files`` (local
    plain-text files, see train_files) or ``hub`` (a datasets-hub corpus, see hub_name)."""

    train_files: str | None = None
    """Comma-separated UTF-8 text files or glob patterns (source ``files``), e.g.
    ``../shared/data/gutenberg-nltk-prose/*.txt``. One row per line; blank lines end documents."""

    valid_files: str | None = None
    """Validation text files, same syntax; ``null`` = hold out the last valid_sequences packed
    sequences of the training text."""

    hub_name: str | None = None
    """Hub corpus when source is ``hub`` (e.g. ``wikimedia/wikipedia``, ``Skylion007/openwebtext``),
    or a local dataset directory."""

    hub_config: str | None = None
    """Configuration of hub_name (e.g. ``20231101.en`` for Wikipedia); ``null`` = none."""

    hub_split: str = "train"
    """Split of hub_name to pretrain on (a slice like ``train[:1%]`` works)."""

    text_column: str = "text"
    """Column of hub_name that holds the text (one document per row)."""

    max_documents: int | None = None
    """Use only the first N rows (lines for ``files``, documents for ``hub``); ``null`` = all."""

    encoding_errors: str = choices("strict", "strict", "replace")
    """Bytes in text files that are not UTF-8: ``strict`` stops with an error naming the file,
    ``replace`` reads them as U+FFFD and warns with a count."""

    synthetic_num_documents: int = 3000
    """Paragraphs generated when source is ``synthetic``."""

    tokenizer_kind: str = choices("wordpiece", "wordpiece", "unigram")
    """Vocabulary trained when data.tokenizer is null: ``wordpiece`` (BERT/ELECTRA) or
    ``unigram`` (SentencePiece-style)."""

    lowercase: bool = True
    """Lowercase (and strip accents) before splitting; ELECTRA's released models are uncased."""

    seq_length: int = 128
    """Tokens per packed sequence, ``[CLS]`` and ``[SEP]`` included."""

    batch_size: int = 32
    """Sequences per micro-batch on one rank."""

    valid_sequences: int = 256
    """Sequences held out for validation when valid_files is null (at most this many are
    evaluated when it is set)."""

    mask_prob: float = 0.15
    """Share of the (non-special) tokens of a sequence the generator has to predict."""

    mask_token_prob: float = 0.85
    """Share of those positions replaced by ``[MASK]``; the rest keep their token (ELECTRA: 0.85)."""

    generator_width_fraction: float = 0.25
    """Generator hidden size, FFN size and head count as a fraction of the discriminator's
    (ELECTRA: 1/4 to 1/2 work best)."""

    generator_layers: int | None = None
    """Generator depth; ``null`` = model.num_layers."""

    generator_moe: bool = False
    """Give the generator Switch MoE layers too (same moe section); false = dense generator."""

    sampling_temperature: float = 1.0
    """Temperature of the generator softmax its replacements are sampled from."""

    rtd_weight: float = 50.0
    """lambda in ``loss = mlm + lambda * rtd + moe aux`` (ELECTRA: 50)."""


#: GLUE tasks ``moetrain finetune`` knows (classification tasks; metric in moetrain.eval.glue_metrics).
GLUE_TASKS = ("rte", "mrpc", "sst2", "cola", "qnli", "qqp", "mnli", "wnli")


@dataclass
class GlueConfig:
    """GLUE fine-tuning (``moetrain finetune``): task, data, starting point, optimisation, seeds."""

    task: str = choices("rte", *GLUE_TASKS)
    """GLUE task: rte, mrpc, sst2, cola, qnli, qqp, mnli (matched dev) or wnli. Metric: accuracy;
    F1 and accuracy for MRPC and QQP; Matthews correlation for CoLA."""

    pretrained: str | None = None
    """Pretrained checkpoint: a run directory (its checkpoints/latest), a step directory or a
    portable directory. Architecture and tokenizer come from it. ``null`` = no checkpoint: the
    model/moe sections of this config, random init, and data.tokenizer (or one trained on the
    task's training text)."""

    random_init: bool = False
    """Take only the architecture and tokenizer from pretrained and start from random weights
    (the baseline that shows what pretraining bought)."""

    source: str = choices("hub", "hub", "files")
    """``hub`` (hub_name through ``datasets``) or ``files`` (local train_file / dev_file)."""

    hub_name: str = "nyu-mll/glue"
    """Hub dataset holding the task as a configuration (or a local dataset directory with
    train and validation files in the Hub schema)."""

    train_file: str | None = None
    """Local training file (source ``files``): GLUE TSV (with or without header, as released)
    or JSON lines (e.g. SuperGLUE RTE's premise/hypothesis/label)."""

    dev_file: str | None = None
    """Local dev file, same formats."""

    seed: int = 1
    """First fine-tuning seed; seeds are seed, seed + 1, ... (head init, data order, dropout)."""

    num_seeds: int = 3
    """Fine-tuning runs with different seeds; the report gives mean, std, min and max."""

    optimizer: str = choices("adamw", "adamw", "adafactor")
    """``adamw`` or ``adafactor`` (torch.optim.Adafactor, relative step). From random init only
    adafactor, or adamw with ``lr_scale: {embed: 10}``, lets the N(0, 1) T5 embedding learn at the
    rate of the other weights; plain adamw leaves SST-2 at 0.67 where adafactor reaches 0.78
    (docs/electra.md, "Fine-tuning protocol")."""

    lr: float = 1e-4
    """Peak learning rate (linear warmup, then linear decay to 0). For adafactor it is the relative
    step (each update is at most ``lr`` x RMS(weight)), e.g. 1e-2."""

    lr_scale: dict[str, float] = field(default_factory=dict)
    """Per-parameter learning-rate multipliers ``{pattern: factor}``, as ``train.lr_scale``."""

    epochs: float = 3.0
    """Passes over the training set (fractions allowed)."""

    batch_size: int = 32
    """Training examples per step."""

    eval_batch_size: int = 128
    """Examples per evaluation batch."""

    max_length: int = 128
    """Tokens per example (pairs are truncated longest-first), [CLS]/[SEP] included."""

    warmup_fraction: float = 0.1
    """Share of the steps spent warming the learning rate up from 0."""

    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to norms and biases)."""

    grad_clip: float = 1.0
    """Clip the gradient norm to this value; 0 = off."""

    pooling: str = choices("first", "first", "mean")
    """Sentence representation for the head: ``first`` ([CLS] position) or ``mean`` (over tokens)."""

    classifier_dropout: float = 0.1
    """Dropout in the classification head."""

    max_train_examples: int | None = None
    """Use only the first N training examples (quick runs); ``null`` = all."""

    max_dev_examples: int | None = None
    """Evaluate on only the first N dev examples; ``null`` = all."""

    export_hf: bool = False
    """Also export the first seed's fine-tuned model to ``<run dir>/hf`` (HF
    SwitchTransformersEncoderModel + ``moetrain_heads.safetensors``)."""


#: Values of ``task`` and the command that runs each. The trainer's tasks (``train``) are the
#: classes :data:`moetrain.tasks.TASKS` registers (a test keeps the two in step); ``glue`` is
#: fine-tuning, which ``moetrain finetune`` runs on its own (:mod:`moetrain.tasks.glue`).
TASKS = {"translation": "train", "glue": "finetune", "electra": "train"}


@dataclass
class RunConfig:
    """One run: its name, the task, and every section."""

    name: str = ""
    """Run name used in logs; empty = the recipe file's stem."""

    task: str = choices("translation", *TASKS)
    """What is trained: ``translation``, ``glue`` or ``electra``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model dimensions."""

    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE layer settings."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data source, tokenizer and batching."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and run-loop settings."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distribution settings."""

    export: ExportConfig = field(default_factory=ExportConfig)
    """HF export settings."""

    electra: ElectraConfig = field(default_factory=ElectraConfig)
    """ELECTRA pretraining settings (task ``electra``)."""

    glue: GlueConfig = field(default_factory=GlueConfig)
    """GLUE fine-tuning settings (``moetrain finetune``)."""


# ---------------------------------------------------------------------------
# Presets: dotted overrides applied before the file's own keys.
# ---------------------------------------------------------------------------

# Named sizes live with the models (one table); importing them pulls in no torch.
from moetrain.models.presets import PRESETS  # noqa: E402

# The built-in estimators, so that validating them needs no torch import (a test keeps this
# table inside the registry), and the one routing width each is defined for: Switch and
# SparseMixer(-v1) pick one expert; SparseMixer-v2 is the GRIN/PhiMoE top-2 form; ST/STGS/ReinMax
# are dense in the backward pass but their forward is a one-hot (argmax) choice. ``topk`` takes
# any k (None).
_BUILTIN_ESTIMATORS: dict[str, int | None] = {
    "switch": 1,
    "topk": None,
    "sparsemixer": 1,
    "sparsemixer_v2": 2,
    "st": 1,
    "stgs": 1,
    "reinmax": 1,
}


#: Built-in estimators whose choice is an argmax / top-k a selection bias can shift (aux_free).
_SELECTION_BIAS_ESTIMATORS = ("switch", "topk")


def _takes_selection_bias(name: str) -> bool:
    if name in _BUILTIN_ESTIMATORS:
        return name in _SELECTION_BIAS_ESTIMATORS
    from moetrain.moe.estimators import ESTIMATORS

    return name in ESTIMATORS and ESTIMATORS[name].supports_selection_bias


def known_estimators() -> list[str]:
    """Names accepted by ``moe.estimator``: the registry's keys, or the built-in list.

    NOTE: this imports ``moetrain.moe`` (torch and deepspeed, seconds). Validation calls it
    only for names outside the built-in list, which a test keeps inside the registry.
    """
    try:
        from moetrain.moe.estimators import ESTIMATORS
    except ImportError:
        return list(_BUILTIN_ESTIMATORS)
    return list(ESTIMATORS)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply preset and ``--set`` overrides, and validate.

    Args:
        path: the YAML file. An empty or comment-only file is an error.
        overrides: ``"section.key=value"`` strings; ``value`` is parsed with
            ``yaml.safe_load`` (so ``null``, ``[0.9, 0.99]`` and ``true`` work).

    Returns:
        The fully resolved :class:`RunConfig`.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or impossible combination.
    """
    ctx = Context(str(path))
    raw = read_yaml_mapping(Path(path), ctx)
    parsed = [parse_override(text, ctx) for text in overrides]

    tree: dict[str, Any] = {}
    preset = _preset_name(raw, parsed, ctx)
    if preset is not None:
        for key, value in PRESETS[preset].items():
            set_dotted(tree, key, value, ctx)
            ctx.origins[key] = f"preset '{preset}'"
    merge_into(tree, raw, ctx)
    for key, value, text in parsed:
        set_dotted(tree, key, value, ctx)
        ctx.origins[key] = f"--set {text}"

    cfg = build_dataclass(RunConfig, tree, ctx)
    if not cfg.name:
        cfg.name = Path(path).stem
    absolute_paths(cfg)
    _validate(cfg, ctx)
    return cfg


#: Config keys that hold local paths (``section.key``). Comma-separated lists and glob patterns
#: are allowed in the data file keys; each part is made absolute on its own.
PATH_KEYS = ("data.train_src", "data.train_tgt", "data.valid_src", "data.valid_tgt", "data.test_src",
             "data.test_tgt", "data.tokenizer", "data.cache_dir", "electra.train_files", "electra.valid_files",
             "glue.pretrained", "glue.train_file", "glue.dev_file", "train.init_from_hf", "train.resume",
             "export.out_dir")
#: Keys that name a Hub dataset or, when such a path exists, a local dataset directory.
HUB_OR_PATH_KEYS = ("data.hub_name", "electra.hub_name", "glue.hub_name")


def absolute_paths(cfg: RunConfig, base: str | os.PathLike | None = None) -> RunConfig:
    """Make every relative path in ``cfg`` absolute, in place, against ``base``.

    **The base is the current working directory** (default), the directory ``moetrain`` is
    started from: the shipped recipes write ``../shared/data/...`` and are run from the
    repository root. The resolved config a run saves therefore holds absolute paths, and
    ``moetrain evaluate RUN`` finds the run's data from any directory. ``train.resume:
    latest``/``auto`` is a keyword, not a path; a Hub name stays a name unless a directory
    of that name exists.
    """
    root = Path(base) if base is not None else Path.cwd()

    def absolute(part: str) -> str:
        part = os.path.expanduser(part.strip())
        return os.path.normpath(os.path.join(root, part)) if part else part

    for dotted in PATH_KEYS + HUB_OR_PATH_KEYS:
        section, key = dotted.split(".")
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if not isinstance(value, str) or not value:
            continue
        if dotted == "train.resume" and value in ("latest", "auto"):
            continue
        if dotted in HUB_OR_PATH_KEYS:
            if (root / value).exists() and not Path(value).is_absolute():
                setattr(obj, key, absolute(value))
            continue
        setattr(obj, key, ",".join(absolute(p) for p in value.split(",")))
    return cfg


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Check cross-field rules of an already built config (``load_config`` calls this)."""
    _validate(cfg, Context(source))


def _preset_name(raw: dict, parsed: list[tuple[str, Any, str]], ctx: Context) -> str | None:
    """The preset named by the last --set model.preset, else by the file."""
    name, key = None, "model.preset"
    model = raw.get("model")
    if isinstance(model, dict):
        name = model.get("preset")
    for k, value, text in parsed:
        if k == key:
            name = value
            ctx.origins[key] = f"--set {text}"
    if name is None:
        return None
    if not isinstance(name, str) or name not in PRESETS:
        hint = did_you_mean(str(name), PRESETS)
        raise ctx.error(key, f"unknown preset '{name}'{hint} Valid presets: {', '.join(PRESETS)}")
    return name


# ---------------------------------------------------------------------------
# Cross-field validation
# ---------------------------------------------------------------------------


def _validate(cfg: RunConfig, ctx: Context) -> None:
    """Rules that involve values, not only types. Each failure names the key to fix."""
    _check_model(cfg.model, ctx.require)
    _check_moe(cfg.moe, cfg.model, ctx.require)
    _check_data(cfg.data, cfg.model, ctx.require)
    _check_train(cfg.train, ctx.require)
    _check_parallel(cfg.parallel, cfg.moe, cfg.train, ctx.require)
    _check_export(cfg.export, ctx.require)
    if cfg.export.after_train:
        ctx.require(cfg.task == "translation", "export.after_train",
                    f"is for task translation (HF SwitchTransformersForConditionalGeneration), not '{cfg.task}'")
    _check_electra(cfg, ctx.require)
    _check_glue(cfg.glue, ctx.require)


def _check_model(m: ModelConfig, require: Callable[[bool, str, str], None]) -> None:
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                "relative_attention_num_buckets", "relative_attention_max_distance"):
        require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    if m.arch == "encoder_decoder":
        require(m.num_decoder_layers >= 1, "model.num_decoder_layers",
                f"must be >= 1 for arch encoder_decoder, got {m.num_decoder_layers}")
    require(0.0 <= m.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {m.dropout_rate}")
    require(m.layer_norm_epsilon > 0, "model.layer_norm_epsilon", "must be > 0")
    for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(m, key)
        require(0 <= value < m.vocab_size, f"model.{key}",
                f"must be a valid id in [0, model.vocab_size={m.vocab_size}), got {value}")


def _check_moe(moe: MoEConfig, m: ModelConfig, require: Callable[[bool, str, str], None]) -> None:
    require(moe.num_experts >= 1, "moe.num_experts", f"must be >= 1, got {moe.num_experts}")
    require(1 <= moe.top_k <= moe.num_experts, "moe.top_k",
            f"must be between 1 and moe.num_experts={moe.num_experts}, got {moe.top_k}")
    if moe.estimator not in _BUILTIN_ESTIMATORS:  # fast path skips the torch import
        names = known_estimators()
        require(moe.estimator in names, "moe.estimator",
                f"unknown estimator '{moe.estimator}'{did_you_mean(moe.estimator, names)} "
                f"Known: {', '.join(names)}")
    need_k = _BUILTIN_ESTIMATORS.get(moe.estimator)
    require(need_k is None or moe.top_k == need_k, "moe.top_k",
            f"estimator '{moe.estimator}' is defined for top_k={need_k}, got {moe.top_k}"
            + (" (use sparsemixer_v2 or topk for two experts)" if need_k == 1 else ""))
    # topk renormalises over the chosen experts: with k=1 the weight is always 1 and the router
    # gets no task gradient at all.
    require(moe.estimator != "topk" or moe.top_k >= 2, "moe.top_k",
            "estimator 'topk' needs top_k >= 2 (with one expert its weight is constant 1 and the "
            "router learns nothing from the task; use 'switch' for top-1)")
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, key)
        require(value is None or value > 0, f"moe.{key}", f"must be > 0 or null (dropless), got {value}")
    require(moe.min_capacity >= 0, "moe.min_capacity", f"must be >= 0, got {moe.min_capacity}")
    require(0.0 <= moe.jitter_eps < 1.0, "moe.jitter_eps",
            f"must be in [0, 1) (noise is U(1-eps, 1+eps)), got {moe.jitter_eps}")
    require(moe.temperature > 0, "moe.temperature", f"must be > 0, got {moe.temperature}")
    require(moe.balance_coef >= 0, "moe.balance_coef", f"must be >= 0, got {moe.balance_coef}")
    require(moe.z_coef >= 0, "moe.z_coef", f"must be >= 0, got {moe.z_coef}")
    require(moe.bias_update_rate > 0, "moe.bias_update_rate", f"must be > 0, got {moe.bias_update_rate}")
    if moe.aux_free:
        require(_takes_selection_bias(moe.estimator), "moe.balance",
                f"aux_free adds a selection bias to the router's choice; estimator '{moe.estimator}' "
                "does not take one (its choice is sampled or dense): use switch or topk, or "
                "moe.balance=aux_loss")
    require(moe.sparse_step >= 1, "moe.sparse_step", f"must be >= 1, got {moe.sparse_step}")
    # With i % sparse_step == 1, a one-layer stack gets no sparse layer unless the step is 1.
    stacks = [m.num_layers] + ([m.num_decoder_layers] if m.arch == "encoder_decoder" else [])
    require(moe.sparse_step == 1 or max(stacks) >= 2, "moe.sparse_step",
            f"no layer would be sparse with {max(stacks)} layer(s) per stack; use sparse_step 1")


def _check_data(d: DataConfig, m: ModelConfig, require: Callable[[bool, str, str], None]) -> None:
    if d.source == "hub":
        require(d.hub_name is not None, "data.hub_name", "is required when data.source is 'hub'")
    if d.source in ("files", "tsv", "jsonl"):
        require(d.train_src is not None, "data.train_src", f"is required when data.source is '{d.source}'")
    if d.source == "files":
        require(d.train_tgt is not None, "data.train_tgt", "is required when data.source is 'files'")
    require(d.vocab_size >= 1, "data.vocab_size", f"must be >= 1, got {d.vocab_size}")
    require(d.vocab_size <= m.vocab_size, "data.vocab_size",
            f"tokenizer vocabulary ({d.vocab_size}) must fit model.vocab_size ({m.vocab_size}); raise "
            f"model.vocab_size to at least {d.vocab_size} or lower data.vocab_size")
    require(d.max_length >= 1, "data.max_length", f"must be >= 1, got {d.max_length}")
    require(d.max_tokens >= d.max_length, "data.max_tokens",
            f"must be >= data.max_length ({d.max_length}) so that one pair fits a batch, got {d.max_tokens}")
    require(d.max_length_ratio >= 1, "data.max_length_ratio", f"must be >= 1, got {d.max_length_ratio}")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    for key in ("synthetic_num_train", "synthetic_num_valid"):
        require(getattr(d, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")


def _check_train(t: TrainConfig, require: Callable[[bool, str, str], None]) -> None:
    require(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    require(all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas", f"must be in [0, 1), got {list(t.adam_betas)}")
    require(t.adam_eps > 0, "train.adam_eps", f"must be > 0, got {t.adam_eps}")
    require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    require(0 <= t.label_smoothing < 1, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = off), got {t.grad_clip}")
    for key in ("grad_accum_steps", "log_every", "beam_size", "max_decode_length"):
        require(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("eval_every", "save_every", "keep_last", "grad_quality_every"):
        require(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    require(t.length_penalty >= 0, "train.length_penalty", f"must be >= 0, got {t.length_penalty}")
    require(t.max_minutes is None or t.max_minutes > 0, "train.max_minutes",
            f"must be > 0 or null, got {t.max_minutes}")
    _check_lr_scale(t.lr_scale, "train.lr_scale", require)


def _check_lr_scale(lr_scale: dict[str, float], key: str, require: Callable[[bool, str, str], None]) -> None:
    for pattern, factor in lr_scale.items():
        try:
            re.compile(pattern)
        except re.error as err:
            require(False, f"{key}.{pattern}", f"is not a valid regular expression ({err})")
        require(factor > 0, f"{key}.{pattern}", f"must be > 0, got {factor}")


def _check_parallel(p: ParallelConfig, moe: MoEConfig, t: TrainConfig,
                    require: Callable[[bool, str, str], None]) -> None:
    require(p.ep_size >= 1, "parallel.ep_size", f"must be >= 1, got {p.ep_size}")
    require(moe.num_experts % p.ep_size == 0, "parallel.ep_size",
            f"must divide moe.num_experts={moe.num_experts}, got {p.ep_size}")
    # Measured with DeepSpeed 0.19.8 (deepspeed-ep notes, P2): without ZeRO its clipping norm under
    # EP > 1 averages per-rank norms (0.715 instead of 0.754), and its bf16 path falls back to
    # FP16_UnfusedOptimizer, which leaves expert gradients out of the norm and drifts. So at ZeRO-0
    # moetrain clips itself (train/optim.py) and runs bf16 as torch.autocast over fp32 weights
    # (train/distributed.py), and EP and bf16 are allowed there.
    # ZeRO-1/2 flatten each parameter group and give the optimizer one 1-D shard per rank: Adafactor
    # would factor nothing and scale by the RMS of a shard instead of a weight (measured: docs/training.md).
    if t.optimizer == "adafactor":
        require(p.zero_stage == 0, "parallel.zero_stage",
                f"must be 0 with train.optimizer=adafactor (ZeRO-1/2 give the optimizer flat shards, on which "
                f"Adafactor computes something else; EP works at ZeRO-0, or use adamw with train.lr_scale), "
                f"got {p.zero_stage}")
        require(t.precision != "fp16", "train.precision",
                "must be fp32 or bf16 with train.optimizer=adafactor (fp16 needs ZeRO-1/2), got fp16")
    require(t.precision != "fp16" or p.zero_stage in (1, 2), "train.precision",
            f"fp16 needs parallel.zero_stage 1 or 2 (the portable checkpoint reads fp32 master weights from the "
            f"ZeRO optimizer), got zero_stage {p.zero_stage}")


def _check_export(e: ExportConfig, require: Callable[[bool, str, str], None]) -> None:
    require(re.fullmatch(SIZE_PATTERN, e.max_shard_size, re.IGNORECASE) is not None,
            "export.max_shard_size", f"expected a size like '500MB' or '2GB', got '{e.max_shard_size}'")



def _check_electra(cfg: RunConfig, require: Callable[[bool, str, str], None]) -> None:
    e = cfg.electra
    if cfg.task == "electra":
        require(cfg.model.arch == "encoder", "model.arch", f"must be 'encoder' for task electra, got '{cfg.model.arch}'")
        if e.source == "files":
            require(e.train_files is not None, "electra.train_files", "is required when electra.source is 'files'")
        if e.source == "hub":
            require(e.hub_name is not None, "electra.hub_name", "is required when electra.source is 'hub'")
    require(e.seq_length >= 8, "electra.seq_length", f"must be >= 8, got {e.seq_length}")
    for key in ("batch_size", "valid_sequences", "synthetic_num_documents"):
        require(getattr(e, key) >= 1, f"electra.{key}", f"must be >= 1, got {getattr(e, key)}")
    require(e.max_documents is None or e.max_documents >= 1, "electra.max_documents",
            f"must be >= 1 or null, got {e.max_documents}")
    require(0 < e.mask_prob < 1, "electra.mask_prob", f"must be in (0, 1), got {e.mask_prob}")
    require(0 <= e.mask_token_prob <= 1, "electra.mask_token_prob", f"must be in [0, 1], got {e.mask_token_prob}")
    require(0 < e.generator_width_fraction <= 1, "electra.generator_width_fraction",
            f"must be in (0, 1], got {e.generator_width_fraction}")
    require(e.generator_layers is None or e.generator_layers >= 1, "electra.generator_layers",
            f"must be >= 1 or null, got {e.generator_layers}")
    require(e.sampling_temperature > 0, "electra.sampling_temperature", f"must be > 0, got {e.sampling_temperature}")
    require(e.rtd_weight >= 0, "electra.rtd_weight", f"must be >= 0, got {e.rtd_weight}")


def _check_glue(g: GlueConfig, require: Callable[[bool, str, str], None]) -> None:
    if g.source == "files":
        require(g.train_file is not None, "glue.train_file", "is required when glue.source is 'files'")
        require(g.dev_file is not None, "glue.dev_file", "is required when glue.source is 'files'")
    require(not g.random_init or g.pretrained is not None, "glue.random_init",
            "needs glue.pretrained (the architecture and tokenizer to start from)")
    for key in ("num_seeds", "batch_size", "eval_batch_size"):
        require(getattr(g, key) >= 1, f"glue.{key}", f"must be >= 1, got {getattr(g, key)}")
    require(g.max_length >= 4, "glue.max_length", f"must be >= 4, got {g.max_length}")
    require(g.lr > 0, "glue.lr", f"must be > 0, got {g.lr}")
    _check_lr_scale(g.lr_scale, "glue.lr_scale", require)
    require(g.epochs > 0, "glue.epochs", f"must be > 0, got {g.epochs}")
    require(0 <= g.warmup_fraction < 1, "glue.warmup_fraction", f"must be in [0, 1), got {g.warmup_fraction}")
    require(g.weight_decay >= 0, "glue.weight_decay", f"must be >= 0, got {g.weight_decay}")
    require(g.grad_clip >= 0, "glue.grad_clip", f"must be >= 0 (0 = off), got {g.grad_clip}")
    require(0 <= g.classifier_dropout < 1, "glue.classifier_dropout", f"must be in [0, 1), got {g.classifier_dropout}")
    for key in ("max_train_examples", "max_dev_examples"):
        value = getattr(g, key)
        require(value is None or value >= 1, f"glue.{key}", f"must be >= 1 or null, got {value}")

# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists), ready for YAML or JSON."""
    return to_plain(cfg)


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text (what ``save_config`` writes)."""
    header = "# Resolved moetrain config: every value explicit (preset, file and --set applied).\n"
    return dump_yaml(to_plain(cfg), header)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the fully resolved config as YAML; ``load_config`` reads it back equal.

    The write is atomic (temporary file, then rename), so a crash never leaves half a file.
    """
    return write_atomic(path, config_to_yaml(cfg))
