"""Gradient engines: ``fast`` (captured activations, never a per-sample gradient) and
``exact`` (torch.func per-sample gradients). Both return the same ``Stats``."""

from __future__ import annotations

from typing import Optional

import torch

from ..subnetworks import Factors
from ..task import Task
from .exact import per_sample_gradients
from .fast import Captured, capture
from .stats import Stats, all_finite, from_captured, from_gradients

__all__ = ["Stats", "Captured", "batch_stats", "capture", "per_sample_gradients", "NonFiniteGradient"]


class NonFiniteGradient(FloatingPointError):
    """A per-sample gradient of some decomposed weight is NaN or infinite."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def batch_stats(task: Task, f: Factors, inputs: torch.Tensor, generator: Optional[torch.Generator],
                paired: Optional[torch.Tensor] = None) -> Stats:
    task.adapter.check_no_backward_hooks()
    if task.cfg.engine == "exact":
        grads = per_sample_gradients(task, inputs, generator, paired)
        for name, g in grads.items():
            if not all_finite(g):
                raise NonFiniteGradient(name)
        return from_gradients(task, f, grads)
    cap = capture(task, inputs, generator, paired)
    for s in task.selected:
        site = s.site
        tensors = [cap.douts[site.output]] + ([cap.inputs[site.input]] if site.input in cap.inputs else [])
        if not all(all_finite(t) for t in tensors):
            raise NonFiniteGradient(s.name)
    return from_captured(task, f, cap)
