"""Which part of a model's state dict is the Switch model that the HF export writes.

Some models hold the exported Switch Transformer inside something larger: ELECTRA keeps a
discriminator next to a generator, a GLUE classifier keeps a backbone under a head. Each model
class says so in its ``export_layout`` attribute (as torchtitan's per-model state-dict adapters
do), so the exporter needs no knowledge of tasks: it asks the layout what to take.

HF parameter names are not this module's business (see :mod:`moetrain.hf_convert`); the keys
here are moetrain's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["ExportLayout", "split_encoder"]


@dataclass(frozen=True)
class ExportLayout:
    """Where the exported Switch model sits in a model's state dict.

    Attributes:
        prefix: key prefix of the exported Switch model ("" = the model is one).
        heads: key prefixes of task heads exported next to it (``moetrain_heads.safetensors``);
            any other key (an ELECTRA generator) is left out of the export.
        label: how ``moetrain export`` names what it exported ("" = the checkpoint itself).
        summary: what ``moetrain export`` says about the result ("" = tensor count and estimator).
    """

    prefix: str = ""
    heads: tuple[str, ...] = ()
    label: str = ""
    summary: str = ""

    def select(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """The keys the export takes: the Switch model's and the heads', under their full names."""
        if not self.prefix:
            return dict(state_dict)
        keep = (self.prefix, *self.heads)
        selected = {k: v for k, v in state_dict.items() if k.startswith(keep)}
        if not any(k.startswith(self.prefix) for k in selected):
            raise ValueError(f"no '{self.prefix}*' weights; expected a checkpoint of a model with this layout")
        return selected


def split_encoder(state_dict: dict[str, Tensor], prefix: str | None = None) -> tuple[dict, dict, str]:
    """Separate an encoder's keys (``<prefix>embed.weight``, ``<prefix>encoder.*``) from the rest.

    Args:
        state_dict: a state dict holding one Switch encoder, possibly under a prefix.
        prefix: the encoder's key prefix; None = find it (exactly one ``<prefix>embed.weight``
            next to ``<prefix>encoder.final_norm.weight`` must exist).

    Returns:
        ``(encoder keys without the prefix, every other key unchanged, prefix)``.

    Raises:
        ValueError: no single encoder could be found.
    """
    if prefix is None:
        prefixes = sorted(k[: -len("embed.weight")] for k in state_dict
                          if k.endswith("embed.weight") and k[: -len("embed.weight")] + "encoder.final_norm.weight"
                          in state_dict)
        if len(prefixes) != 1:
            raise ValueError(f"cannot tell which encoder to export: found {prefixes or 'none'} "
                             "(expected one '<prefix>embed.weight' with '<prefix>encoder.*'); pass prefix=")
        prefix = prefixes[0]
    body = {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and (k[len(prefix):] == "embed.weight" or k[len(prefix):].startswith("encoder."))}
    rest = {k: v for k, v in state_dict.items() if not (k.startswith(prefix) and k[len(prefix):] in body)}
    return body, rest, prefix
