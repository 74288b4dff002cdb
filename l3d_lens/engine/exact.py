"""Exact engine: per-sample gradients materialised with ``torch.func`` (vmap of grad over a
functional call). The reference every faster path is tested against; memory grows with
n_samples x n_params, so it is meant for small models and checks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.func import grad, vmap

from ..task import Task


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


def per_sample_gradients(task: Task, inputs: torch.Tensor, generator: Optional[torch.Generator],
                         paired: Optional[torch.Tensor] = None, chunk_size: int = 64) -> dict[str, torch.Tensor]:
    """{weight name: [n_samples, *selected shape]} gradients of each sample's divergence."""
    adapter = task.adapter
    refs = references_for(task, inputs, generator, paired)
    base = {s.name: adapter.weight(s.name).detach() for s in task.selected}
    params = {s.name: s.take(base[s.name]).clone() for s in task.selected}
    by_name = {s.name: s for s in task.selected}
    token = task.token_mode

    def one(p, x, ref, mask):
        overrides = {n: _with_part(base[n], by_name[n], v) for n, v in p.items()}
        out = adapter.functional_forward(overrides, x[None])
        d = task.divergence(task.view(out), ref[None])[0]
        return (d * mask).sum() if token else d

    if token:
        n, t = inputs.shape[:2]
        xs = inputs.repeat_interleave(t, 0)
        rs = refs.repeat_interleave(t, 0)
        masks = torch.eye(t, dtype=refs.dtype, device=refs.device).repeat(n, 1)
    else:
        xs, rs = inputs, refs
        masks = torch.zeros(inputs.shape[0], dtype=refs.dtype, device=refs.device)
    with adapter.session():
        try:
            return vmap(grad(one), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(params, xs, rs, masks)
        except RuntimeError as e:
            if "setup_context" not in str(e) and "functorch" not in str(e):
                raise
            raise ValueError("engine='exact' cannot run this model: its forward uses an operation torch.func cannot "
                             "transform (an autograd.Function without setup_context, e.g. a custom activation); "
                             "use engine='fast'") from e
