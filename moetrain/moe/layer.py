"""``MoELayer``: a Switch-style sparse feed-forward layer with a pluggable router estimator.

The forward pass, in four steps::

    logits = router(x)                       fp32 [T, E], optional input jitter
    routing = estimator(logits, noise)       expert ids [T, K], combine weights, probs
    rows = dispatch(x, routing, capacity)    sorted by expert; under EP, all-to-all
    y = combine(experts(rows), routing)      scatter back, weighted; dropped tokens -> 0

It subclasses ``deepspeed.moe.layer.MoE`` (without running its constructor) so
that DeepSpeed's engine treats it as an MoE layer: expert-data-parallel gradient
reduction, MoE optimizer groups and per-expert checkpoint files. Without a
process group it is a plain local layer and needs no distributed setup.

Randomness comes from :mod:`moetrain.moe.noise`, keyed by
``(noise_seed, routing_step, layer_id, global token id)``: set ``routing_step``
each training step (:func:`set_routing_step`) and pass ``token_ids`` when tokens
are spread over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import Tensor, nn

from .balance import GlobalBalance
from .dispatch import AllToAllDispatcher, LocalDispatcher, expert_capacity
from .estimators import build_estimator
from .experts import ExpertContainer, LocalExperts
from .noise import RoutingNoise
from .router import Router, balance_loss, router_entropy, z_loss


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward pass (padding excluded).

    Attributes:
        balance_loss: Switch load-balancing loss (scalar, differentiable).
        z_loss: router z-loss (scalar, differentiable).
        tokens_per_expert: ``[E]`` routes each expert processed after capacity
            (this rank's tokens; int64).
        dropped_fraction: share of routes dropped by capacity (scalar tensor).
        router_entropy: mean entropy of the router softmax (nats), from the logits the estimator
            saw (with input jitter in training, clean at evaluation).
        num_tokens: non-padding tokens routed by this rank.
    """

    balance_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor
    num_tokens: int

    def expert_load(self) -> Tensor:
        """Fraction of processed routes per expert (sums to 1 unless nothing was routed)."""
        total = self.tokens_per_expert.sum().clamp(min=1)
        return self.tokens_per_expert.float() / total


class MoELayer(DeepSpeedMoE):
    """Sparse MoE feed-forward layer (drop-in for a dense FFN).

    Args:
        d_model: model width.
        d_ff: hidden width of each expert.
        num_experts: total experts over all expert-parallel ranks.
        estimator: registered estimator name (``moetrain.moe.ESTIMATORS``).
        top_k: experts per token (1 for switch/sparsemixer, 2 for sparsemixer_v2).
        capacity_factor: training capacity ``ceil(T / E * cf)``; None = dropless.
        eval_capacity_factor: the same at evaluation; None = dropless.
        min_capacity: floor on the capacity.
        jitter_eps: jitter / SparseMixer mask epsilon.
        jitter_mode: switch jitter on the router "input", the "logits", or "none".
        temperature: temperature of st / stgs / reinmax.
        dropout: dropout inside each expert.
        ep_size: expert-parallel group size (experts are sharded over it).
        ep_rank: this rank's position in its EP group; default: from torch.distributed.
        layer_id: distinct id per MoE layer in a model (keys noise and init).
        noise_seed: seed of the routing noise.
        init_seed: seed of the expert initialisation.
        balance_scope: ``"micro_batch"`` (the Switch loss on this rank's tokens) or ``"global"``
            (token fractions over every rank's tokens of the optimizer step:
            :class:`~moetrain.moe.balance.GlobalBalance`).
        aux_free: keep an expert-selection bias ``selection_bias`` (aux-loss-free balancing) that
            :func:`~moetrain.moe.balance.update_selection_bias` moves after each optimizer step.
        bias_update_rate: that update's step size.
        estimator_kwargs: extra keyword arguments for a custom estimator.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        estimator: str = "sparsemixer",
        top_k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        jitter_eps: float = 0.1,
        jitter_mode: str = "input",
        temperature: float = 1.0,
        dropout: float = 0.0,
        ep_size: int = 1,
        ep_rank: int | None = None,
        layer_id: int = 0,
        noise_seed: int = 0,
        init_seed: int = 0,
        balance_scope: str = "micro_batch",
        aux_free: bool = False,
        bias_update_rate: float = 1e-3,
        estimator_kwargs: dict | None = None,
    ):
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ would build its own gate and experts.
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        if num_experts % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
        for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if cf is not None and cf <= 0:
                raise ValueError(f"{name} must be > 0 or None (dropless), got {cf}")
        # Attributes DeepSpeed's engine reads.
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False

        self.d_model = d_model
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.layer_id = layer_id
        self.noise_seed = noise_seed
        self.routing_step = 0

        self.router = Router(d_model, num_experts)
        nn.init.normal_(self.router.classifier.weight, std=d_model**-0.5)
        self.estimator = build_estimator(
            estimator, num_experts=num_experts, top_k=top_k, jitter_eps=jitter_eps, jitter_mode=jitter_mode,
            temperature=temperature, d_model=d_model, **(estimator_kwargs or {}),
        )
        if ep_rank is None:
            ep_rank = _default_ep_rank(ep_size)
        self.ep_rank = ep_rank
        experts = LocalExperts(d_model, d_ff, self.num_local_experts, ep_rank * self.num_local_experts, dropout)
        experts.reset_parameters(init_seed, layer_id)
        self.deepspeed_moe = ExpertContainer(experts)
        for param in experts.parameters():
            param.allreduce = False
            param.group_name = self.expert_group_name
        self.dispatcher: LocalDispatcher = LocalDispatcher(num_experts)

        if balance_scope not in ("micro_batch", "global"):
            raise ValueError(f"balance_scope must be 'micro_batch' or 'global', got {balance_scope!r}")
        self.global_balance = GlobalBalance(num_experts) if balance_scope == "global" else None
        if aux_free and not self.estimator.supports_selection_bias:
            raise ValueError(f"aux-loss-free balancing needs an estimator that takes a selection bias "
                             f"(switch, topk); {estimator!r} does not")
        # Buffers only when used, so models without aux-free balancing keep their state-dict keys.
        self.bias_update_rate = bias_update_rate
        # No "expert" in these names: DeepSpeed's engine files every MoE-module key containing
        # "expert" as an expert parameter (per-expert checkpoint files) and fails on a bias.
        self.register_buffer("selection_bias", torch.zeros(num_experts) if aux_free else None)
        self.register_buffer("selection_counts", torch.zeros(num_experts, dtype=torch.int64) if aux_free else None,
                             persistent=False)
        self.count_loads = True  # False for a replayed weight-0 micro-batch (set_routing_step)

    @classmethod
    def from_config(cls, moe_cfg, d_model: int, d_ff: int, *, dropout: float = 0.0, ep_size: int = 1,
                    layer_id: int = 0, noise_seed: int = 0, init_seed: int = 0) -> "MoELayer":
        """A layer built from the ``moe`` section of a run config (``MoEConfig``), the way every
        model builds its MoE layers; the model supplies its sizes, dropout and the layer's place."""
        return cls(d_model, d_ff, moe_cfg.num_experts, estimator=moe_cfg.estimator, top_k=moe_cfg.top_k,
                   capacity_factor=moe_cfg.capacity_factor, eval_capacity_factor=moe_cfg.eval_capacity_factor,
                   min_capacity=moe_cfg.min_capacity, jitter_eps=moe_cfg.jitter_eps, jitter_mode=moe_cfg.jitter_mode,
                   temperature=moe_cfg.temperature, dropout=dropout, ep_size=ep_size, layer_id=layer_id,
                   noise_seed=noise_seed, init_seed=init_seed, balance_scope=moe_cfg.balance_scope,
                   aux_free=moe_cfg.aux_free, bias_update_rate=moe_cfg.bias_update_rate)

    # -- distribution -----------------------------------------------------------------

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine: create / fetch the expert-parallel group."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.set_process_group(groups._get_expert_parallel_group(self.expert_group_name))

    def set_process_group(self, group) -> None:
        """Shard experts over ``group`` (a torch.distributed group of size ep_size)."""
        world = torch.distributed.get_world_size(group)
        if world != self.ep_size:
            raise ValueError(f"expert-parallel group has {world} ranks but the layer was built with ep_size={self.ep_size}")
        rank = torch.distributed.get_rank(group)
        if rank != self.ep_rank:
            raise ValueError(f"layer was built for EP rank {self.ep_rank} but sits on EP rank {rank}; "
                             "build the model after creating the process groups")
        self.dispatcher = AllToAllDispatcher(self.num_experts, group) if world > 1 else LocalDispatcher(self.num_experts)

    @property
    def experts(self) -> LocalExperts:
        return self.deepspeed_moe.experts

    # -- forward ----------------------------------------------------------------------

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, token_ids: Tensor | None = None) -> tuple[Tensor, MoEStats]:
        """Route ``x [..., D]`` through the experts.

        Args:
            x: hidden states; leading dims are flattened into tokens.
            padding_mask: optional bool ``[...]``, True at padding positions. Padding is
                never routed (its output is 0) and is left out of losses and stats.
            token_ids: optional int64 ``[...]`` global token ids for the routing noise;
                default ``arange`` over this call's tokens.

        Returns:
            ``(y, stats)`` with ``y`` shaped like ``x``.
        """
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        num_tokens = x_flat.shape[0]
        if token_ids is None:
            token_ids = torch.arange(num_tokens, device=x.device)
        token_ids = token_ids.reshape(-1)
        valid = None if padding_mask is None else ~padding_mask.reshape(-1).to(torch.bool)

        noise = RoutingNoise(self.noise_seed, self.routing_step, self.layer_id, token_ids)
        jitter = self.estimator.input_jitter_eps if self.training else 0.0
        logits = self.router(x_flat, noise, jitter)
        bias = {} if self.selection_bias is None else {"selection_bias": self.selection_bias}
        routing = self.estimator(logits, noise, self.training, **bias)

        dense = self.estimator.dense and self.training
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = None if dense else expert_capacity(num_tokens if valid is None else int(valid.sum()),
                                                      self.num_experts, factor, self.min_capacity, self.top_k)
        plan = self.dispatcher.plan(routing.expert_ids, capacity, valid)
        rows, counts = self.dispatcher.dispatch(x_flat, plan)
        out_rows = self.dispatcher.undispatch(self.experts(rows, counts), plan)
        y = self.dispatcher.combine(out_rows, routing.weights, plan, routing.channel_scale)
        if self.selection_counts is not None and self.training and self.count_loads:
            chosen = routing.expert_ids if valid is None else routing.expert_ids[valid]
            self.selection_counts += torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
        return y.reshape(shape), self._stats(logits, routing, plan, valid)

    def _stats(self, logits, routing, plan, valid) -> MoEStats:
        probs, balance_ids = routing.probs, routing.balance_ids
        if valid is not None:
            logits, probs, balance_ids = logits[valid], probs[valid], balance_ids[valid]
        counts = plan.counts
        if self.estimator.dense and self.training:
            # Every expert saw every token, but only the sampled one counts in the output.
            counts = torch.bincount(balance_ids, minlength=self.num_experts)
        kept = plan.counts.sum()
        dropped = (1.0 - kept / max(plan.num_routes, 1)) if plan.num_routes else logits.new_zeros(())
        if self.global_balance is not None and self.training:
            if not self.count_loads:  # a replayed filler batch: in the collective, not in f
                balance_ids = balance_ids[:0]
                probs = probs[:0]
            balance = self.global_balance.loss(probs, balance_ids)
        else:
            balance = balance_loss(probs, balance_ids, self.num_experts)
        return MoEStats(
            balance_loss=balance,
            z_loss=z_loss(logits),
            tokens_per_expert=counts.detach(),
            dropped_fraction=torch.as_tensor(dropped, dtype=torch.float32).detach(),
            router_entropy=router_entropy(logits),
            num_tokens=int(logits.shape[0]),
        )


def _default_ep_rank(ep_size: int) -> int:
    """EP rank under DeepSpeed's default layout (EP groups are consecutive ranks)."""
    if ep_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank() % ep_size


def set_routing_step(model: nn.Module, step: int, optimizer_step: int | None = None,
                     count_loads: bool = True) -> None:
    """Tell every MoE layer in ``model`` where training is.

    Args:
        step: the micro-batch counter (keys the routing noise).
        optimizer_step: the optimizer step this micro-batch belongs to: global-batch balance
            sums expert loads over its micro-batches. None = each micro-batch stands alone.
        count_loads: False for a micro-batch whose loss weight is 0 (a rank out of data replays
            its last batch): it still joins the collectives but its tokens count nowhere.
    """
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.routing_step = step
            module.count_loads = count_loads
            if module.global_balance is not None:
                module.global_balance.start(optimizer_step)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]
