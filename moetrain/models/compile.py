"""``torch.compile`` of the blocks' dense work, with a clean fall-back to eager.

    compile_blocks(model)      # before the optimizer and DeepSpeed see the model

Per block, as torchtitan compiles per transformer block rather than the whole model: a dense
block's whole ``run`` (norms, attention, FFN, residuals, dropout) becomes one compiled region; a
sparse block compiles its attention half and the FFN norm (``pre_ffn``) and keeps the MoE layer
eager, because routing has data-dependent shapes (index dispatch, capacity, all-to-all) that
would break the graph on every step. Shapes are compiled dynamic: token-budget batches change
batch size and length from step to step.

Only calls without a decoding cache are compiled. Incremental decoding passes a mutable
:class:`~moetrain.models.attention.DecoderCache` and grows one position per call, which would
recompile or break the graph each step; it runs eagerly.

Dropout: ``torch._inductor.config.fallback_random`` makes compiled dropout draw from torch's
global RNG exactly as eager does, so a compiled run has the same masks as an eager one (and its
resume stays exact).

Fall-back: compilation happens on the first call. If it fails (no C++ compiler, a platform
inductor does not support), the region warns once and runs eagerly from then on; an error the
eager code also raises is raised as usual.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["compile_blocks"]


class _CompiledOrEager:
    """Calls the compiled function; a cache argument, or a failed compilation, goes to ``eager``."""

    def __init__(self, eager, name: str):
        self.eager, self.name = eager, name
        self.compiled = torch.compile(eager, dynamic=True)

    def __call__(self, *args, cache=None):
        if cache is not None or self.compiled is None:
            return self.eager(*args, cache=cache)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; eager decides below
            try:
                out = self.eager(*args)
            except Exception:
                raise err from None  # the code itself is wrong, not the compiler
            warnings.warn(f"moetrain: torch.compile failed for {self.name} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly", stacklevel=2)
            self.compiled = None
            return out


def compile_blocks(model: nn.Module) -> int:
    """Compile the dense work of every :class:`~moetrain.models.switch.Block` in ``model``, in
    place; returns the number of compiled regions (0 where there are no blocks)."""
    from moetrain.models.switch import Block

    torch._inductor.config.fallback_random = True
    regions = 0
    for name, block in model.named_modules():
        if not isinstance(block, Block) or {"run", "pre_ffn"} & block.__dict__.keys():
            continue  # compiled already
        if block.is_sparse:
            block.pre_ffn = _CompiledOrEager(block.pre_ffn, f"{name}.pre_ffn")
        else:
            block.run = _CompiledOrEager(block.run, f"{name}.run")
        regions += 1
    return regions
