"""A Task ties a model adapter, the decomposed weights and the resolved config together, and
defines what a *sample* is: its output view, its reference and its divergence.

Samples: ``token`` mode, every (sequence, position) -> D of shape [n, pos]; ``sequence``
mode, one per sequence -> D of shape [n] (the divergence at ``position``, or summed over
positions for "all"); a plain module -> one per row.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import distributed
from .adapters import Adapter
from .config import L3DConfig
from .divergence import divergence_fn, target_space
from .references import references
from .selection import Selected


def min_batch(token_mode: bool, reference: str) -> int:
    """Fewest samples (rows) a batch needs: 'random' draws another sample of the batch, and
    against 'mean' a lone row is its own reference (every gradient zero); a token-mode row holds
    many samples."""
    return 1 if token_mode or reference not in ("random", "mean") else 2


@dataclasses.dataclass
class Task:
    adapter: Adapter
    selected: list[Selected]
    cfg: L3DConfig
    sharded: bool = False  # training under torch.distributed: each rank holds a shard of the batch

    @property
    def device(self) -> torch.device:
        """Where the factors live and the gradients are taken: the config's device, else the model's."""
        return torch.device(self.cfg.device) if self.cfg.device else self.adapter.device

    @property
    def token_mode(self) -> bool:
        return self.adapter.is_language_model and self.cfg.sample == "token"

    def view(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs restricted to what the divergence sees: [n, pos, V], [n, V] or [n, d]."""
        if not self.adapter.is_language_model or self.token_mode or self.cfg.position == "all":
            return outputs
        return outputs[:, self.cfg.position]

    def divergence(self, view: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        d = divergence_fn(self.cfg.divergence)(view, refs)
        if self.adapter.is_language_model and not self.token_mode and self.cfg.position == "all":
            d = d.sum(-1)
        if not self.adapter.is_language_model and d.dim() > 1:  # a plain module's row: its whole output
            d = d.flatten(1).sum(1)
        return d

    def references(self, outputs: torch.Tensor, generator: Optional[torch.Generator],
                   paired_outputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reference targets shaped like ``view(outputs)`` (detached). Under torch.distributed
        they are drawn over the global batch gathered from every rank."""
        view = target_space(self.view(outputs.detach()), self.cfg.divergence)
        n_lead = 2 if self.token_mode else 1
        flat = view.reshape(-1, *view.shape[n_lead:])
        gather = distributed.gather_cat if self.sharded else (lambda t: (t, slice(0, t.shape[0])))
        flat_all, local = gather(flat)
        paired_all = None
        if paired_outputs is not None:
            paired = target_space(self.view(paired_outputs.detach()), self.cfg.divergence)
            paired_all = gather(paired.reshape(-1, *paired.shape[n_lead:]))[0]
        refs = references(flat_all, self.cfg.reference, self.cfg.divergence, generator, paired_all)
        return refs[local].reshape(view.shape)

    @property
    def min_batch(self) -> int:
        """Fewest samples (rows) a batch needs (module ``min_batch``); a smaller last batch joins
        the one before. The same with or without torch.distributed, so that both see the same
        batches."""
        return min_batch(self.token_mode, self.cfg.reference)

    def n_samples(self, inputs: torch.Tensor) -> int:
        return inputs.shape[0] * inputs.shape[1] if self.token_mode else inputs.shape[0]
