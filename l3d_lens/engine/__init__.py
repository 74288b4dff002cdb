"""Gradient engines: ``fast`` (captured activations, never a per-sample gradient) and
``exact`` (torch.func per-sample gradients). Both return the same ``Stats``."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import AUTOCASTS, autocast_context
from ..subnetworks import Factors
from ..task import Task
from .exact import per_sample_gradients, sample_gradient
from .fast import Captured, capture
from .stats import Stats, all_finite, captured_gradient, from_captured, from_gradients, gradient_bound

__all__ = ["Stats", "Captured", "batch_stats", "capture", "check_shortcut", "per_sample_gradients",
           "NonFiniteGradient"]

#: relative error of the fast engine's gradient against autograd's above which its shortcut
#: does not hold (float32 and float64: round-off is ~1e-6; under autocast, ~2e-3 measured)
SHORTCUT_RTOL, SHORTCUT_RTOL_HALF = 1e-3, 5e-2
#: round-off allowed on top, in units of the compute dtype's eps times ``gradient_bound``: a
#: gradient whose terms cancel (b_K's is exactly zero) is compared at the terms' scale, not its
#: own; tied to eps, so cancellation cannot hide an error of the size sought
ROUND_OFF = 100


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


def check_shortcut(task: Task, inputs: torch.Tensor, paired: Optional[torch.Tensor] = None) -> None:
    """Before training with the fast engine: the per-sample gradient it builds from captured
    activations equals autograd's through a functional forward (the exact engine's, under the
    same autocast), for one sample of the data's first rows against the same references. Where
    a decomposed weight is also read outside its layer (a decoder tied by
    ``F.linear(h, W.weight.T)``) or the model moves the batch axis (sequence-first layers, a batch
    as long as the sequence) the shortcut is wrong, with no other sign: a ValueError naming
    ``engine='exact'``. Tolerance: ``SHORTCUT_RTOL`` of the gradient's norm (``SHORTCUT_RTOL_HALF``
    under autocast) plus ``ROUND_OFF`` eps of the terms' scale. Not checked: a half-precision
    model (its own round-off, near underflow, is of the size of the errors sought), and one
    torch.func cannot transform (a custom autograd.Function: the fast engine is its only one)."""
    adapter = task.adapter
    adapter.check_no_backward_hooks()  # as batch_stats does first: their message, not torch.func's
    if adapter.model_dtype.is_floating_point and torch.finfo(adapter.model_dtype).bits < 32:
        return
    rows = inputs[: max(task.min_batch, 2)].to(adapter.device)  # two: a mean reference of one is itself
    if rows.shape[0] < task.min_batch:  # an iterable's first batch too short to draw references in
        return
    paired = None if paired is None else paired[: rows.shape[0]].to(adapter.device)
    cap = capture(task, rows, torch.Generator().manual_seed(0), paired, keep_references=True)
    row = rows.shape[1] - 1 if task.token_mode else 0  # the last position of the first sequence
    dtype = torch.float64
    fast = {s.name: captured_gradient(task, s, cap, row, dtype) for s in task.selected}
    try:
        with autocast_context(task.cfg.autocast, rows.device):
            exact = sample_gradient(task, rows, cap.references, row)
    except Exception:  # noqa: BLE001 - a model torch.func cannot transform: the fast engine is its only one
        return
    err = sum(float((fast[n] - exact[n].to(dtype)).pow(2).sum()) for n in fast) ** 0.5
    size = sum(float(exact[n].to(dtype).pow(2).sum()) for n in fast) ** 0.5
    # round-off of a sum of in (x) dout terms that cancel (b_K's gradient is exactly zero) is
    # relative to the terms, not to the sum: |in| |dout| bounds them (``ROUND_OFF``)
    bound = sum(float(gradient_bound(task, s, cap, row, dtype)) ** 2 for s in task.selected) ** 0.5
    compute = AUTOCASTS[task.cfg.autocast] if task.cfg.autocast is not None else adapter.model_dtype
    rtol = SHORTCUT_RTOL_HALF if task.cfg.autocast is not None else SHORTCUT_RTOL
    if err > rtol * size + ROUND_OFF * torch.finfo(compute).eps * bound:
        raise ValueError(f"engine='fast' cannot decompose {[s.name for s in task.selected]} on this model: the "
                         f"gradient it builds from their layers' activations differs from autograd's by "
                         f"{err / max(size, 1e-300):.2g} of its norm on the data's first sample (a decomposed weight "
                         f"is also used outside its layer, e.g. a decoder tied as F.linear(h, W.weight.T), or the "
                         f"model moves the batch axis); use engine='exact'")
