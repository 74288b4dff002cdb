"""Exact engine: per-sample gradients materialised with ``torch.func`` (vmap of grad over a
functional call). The reference every faster path is tested against; memory grows with
n_samples x n_params, so it is meant for small models and checks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.func import grad, vmap

from ..task import Task

#: about how many gradient entries one chunk of samples holds (64 MiB in float32)
CHUNK_ELEMENTS = 2**24


def _with_part(full: torch.Tensor, s, part: torch.Tensor) -> torch.Tensor:
    if s.axis is None:
        return part
    idx = torch.tensor(s.indices, dtype=torch.long, device=full.device)
    return full.index_copy(s.axis, idx, part)


def references_for(task: Task, inputs: torch.Tensor, generator: Optional[torch.Generator],
                   paired: Optional[torch.Tensor]) -> torch.Tensor:
    with task.adapter.session(), torch.no_grad():
        outputs = task.adapter.forward(inputs)
        paired_outputs = task.adapter.forward(paired) if paired is not None else None
        return task.references(outputs, generator, paired_outputs)


def sample_divergence(task: Task):
    """(one, params): ``one(params, x, ref, mask)`` is one sample's divergence as a function of
    the selected weights (their selected parts, ``params`` at the model's values), through a
    functional forward of its sequence ``x`` against its references ``ref``; in token mode
    ``mask`` [pos] picks the position."""
    adapter = task.adapter
    base = {s.name: adapter.weight(s.name).detach() for s in task.selected}
    params = {s.name: s.take(base[s.name]).clone() for s in task.selected}
    by_name = {s.name: s for s in task.selected}
    token = task.token_mode

    def one(p, x, ref, mask):
        overrides = {n: _with_part(base[n], by_name[n], v) for n, v in p.items()}
        out = adapter.functional_forward(overrides, x[None])
        d = task.divergence(task.view(out), ref[None])[0]
        return (d * mask).sum() if token else d

    return one, params


def sample_gradient(task: Task, inputs: torch.Tensor, refs: torch.Tensor, row: int) -> dict[str, torch.Tensor]:
    """{weight name: selected shape} gradient of sample ``row`` (token mode: sequence-major, as
    the engines number samples) of ``inputs`` against the references ``refs`` drawn for them."""
    one, params = sample_divergence(task)
    seq_len = inputs.shape[1] if task.token_mode else 1
    n, t = divmod(row, seq_len)
    mask = torch.eye(seq_len, dtype=refs.dtype, device=refs.device)[t]
    with task.adapter.session():
        return grad(one)(params, inputs[n], refs[n], mask)


def chunk_rows(task: Task) -> int:
    """Samples per vmap call: 64, or fewer where their gradients would pass ``CHUNK_ELEMENTS``."""
    per_sample = sum(math.prod(s.shape) for s in task.selected)
    return max(1, min(64, CHUNK_ELEMENTS // max(1, per_sample)))


def per_sample_gradients(task: Task, inputs: torch.Tensor, generator: Optional[torch.Generator],
                         paired: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None
                         ) -> dict[str, torch.Tensor]:
    """{weight name: [n_samples, *selected shape]} gradients of each sample's divergence in the
    factors' dtype (``cfg.dtype``), taken ``chunk_size`` samples at a time (default
    ``chunk_rows``) and written into one tensor per weight: the peak is about one copy of them
    and a chunk's (no cast copy follows where the model's dtype is another)."""
    adapter = task.adapter
    refs = references_for(task, inputs, generator, paired)
    one, params = sample_divergence(task)
    token = task.token_mode
    chunk_size = chunk_size or chunk_rows(task)
    seq_len = inputs.shape[1] if token else 1
    n_samples = inputs.shape[0] * seq_len
    eye = torch.eye(seq_len, dtype=refs.dtype, device=refs.device)
    grads: dict[str, torch.Tensor] = {}
    with adapter.session():
        for a in range(0, n_samples, chunk_size):
            # a chunk of samples at a time, written into one output: a token sample is
            # (sequence, position), its sequence's input and references with a mask that keeps
            # its position's divergence, so nothing of the batch is repeated per position
            rows = torch.arange(a, min(a + chunk_size, n_samples), device=inputs.device)
            seq = rows // seq_len
            masks = eye[rows % seq_len] if token else eye.new_zeros(len(rows))
            try:
                chunk = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, inputs[seq], refs[seq], masks)
            except RuntimeError as e:
                if "setup_context" not in str(e) and "functorch" not in str(e):
                    raise
                raise ValueError("engine='exact' cannot run this model: its forward uses an operation torch.func "
                                 "cannot transform (an autograd.Function without setup_context, e.g. a custom "
                                 "activation); use engine='fast'") from e
            for name, g in chunk.items():
                if name not in grads:  # in the factors' dtype, which every use casts them to
                    grads[name] = g.new_empty((n_samples, *g.shape[1:]), dtype=task.cfg.torch_dtype)
                grads[name][a:a + len(rows)] = g
    return grads
