"""Resampling dead subnetworks (as for sparse autoencoders): at chosen epochs, each dead
subnetwork is re-initialised toward what the live ones fail to reconstruct, the residual
g_i - g_hat_i of a high-error sample, projected to the subnetwork's ranks (``cfg.resample_epochs``,
``cfg.resample_max``). Random draws use the run's generator on errors gathered from every rank,
so data-parallel runs stay identical to one process. A rank that fails its own share of that work
says so in the next collective (``announced``), so that no rank waits for it until the
process-group timeout."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Optional, Union

import torch
from jaxtyping import Float

from . import distributed
from .engine import Stats, capture, per_sample_gradients
from .engine.stats import captured_gradient, from_captured, from_gradients
from .objective import sample_errors
from .subnetworks import Factors, dense, factor_ranks, factors_of, gram, sq_norms
from .task import Task


Gradients = dict[str, torch.Tensor]  # weight name -> [n_rows, *selected shape]
RowGradients = Callable[[list[int]], Gradients]  # rows of this rank's batch -> their gradients

def gradient_batch(task: Task, f: Factors, x: torch.Tensor, gen: torch.Generator,
                   paired: Optional[torch.Tensor]) -> tuple[Stats, RowGradients]:
    """This rank's batch statistics (no autograd on the factors) and a function that gives the
    per-sample gradients of some of its rows, for either engine: resampling needs a few
    gradients whole, which the fast engine otherwise never forms."""
    dtype = next(iter(f.values())).dtype
    if task.cfg.engine == "exact":
        grads = {k: v.detach() for k, v in per_sample_gradients(task, x, gen, paired).items()}
        with torch.no_grad():
            stats = from_gradients(task, f, grads)
        return stats, lambda rows: {s.name: grads[s.name][rows].to(dtype) for s in task.selected}
    cap = capture(task, x, gen, paired)
    with torch.no_grad():
        stats = from_captured(task, f, cap)

    def rows_of(rows: list[int]) -> Gradients:
        return {s.name: torch.stack([captured_gradient(task, s, cap, r, dtype) for r in rows]) for s in task.selected}

    return stats, rows_of


def tucker(t: Float[torch.Tensor, "*shape"], ranks: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Truncated higher-order SVD: (core [*ranks], orthonormal U_m [I_m, R_m]), a quasi-optimal
    Tucker approximation of ``t`` (exact when ``t`` has at most these multilinear ranks), to give
    a subnetwork a chosen direction."""
    us = []
    for m, r in enumerate(ranks):
        unfolded = t.movedim(m, 0).reshape(t.shape[m], -1)
        us.append(torch.linalg.svd(unfolded, full_matrices=False).U[:, :r])
    core = t
    for u in us:  # contracting the leading mode and appending the rank axis cycles through all modes
        core = torch.tensordot(core, u, dims=([0], [0]))
    return core, us


def residuals(task: Task, f: Factors, coef: Float[torch.Tensor, "s k"], rows_of: RowGradients, picks: list[int],
              local: slice) -> Gradients:
    """g_i - V_out c_i for the picked global rows of the batch (``coef``: this rank's rows).
    Each rank forms the rows it holds, zeros in the others; ``sum_over_ranks_`` fills them in."""
    dtype = next(iter(f.values())).dtype
    mine = [(j, p - local.start) for j, p in enumerate(picks) if local.start <= p < local.stop]
    out = {s.name: torch.zeros((len(picks), *s.shape), dtype=dtype, device=coef.device) for s in task.selected}
    if mine:
        rows = [r for _, r in mine]
        grads = rows_of(rows)
        with torch.no_grad():
            for s in task.selected:
                fit = (coef[rows] @ dense(f, "out", s).flatten(1)).view(len(rows), *s.shape)
                out[s.name][[j for j, _ in mine]] = grads[s.name] - fit
    return out


def sum_over_ranks_(task: Task, parts: Gradients, device: Union[str, torch.device]) -> None:
    """Sum ``parts`` over ranks in place. Under torch.distributed a row-count exchange comes first,
    in which a rank that failed its share (``announced``) stops the others: an all-reduce cannot
    carry a failure as ``gather_cat`` does."""
    if task.sharded:
        distributed.row_counts(0, device)
    distributed.all_reduce_(*parts.values())


@torch.no_grad()
def set_subnetworks_(f: Factors, task: Task, ranks: dict[str, tuple[int, ...]], which: list[int],
                     targets: Gradients, in_scale: float) -> None:
    """Subnetwork which[j] becomes the Tucker projection of targets[.][j]: V_out with unit norm
    over all weights, V_in the same direction with norm ``in_scale``."""
    for j, k in enumerate(which):
        parts = {s.name: tucker(targets[s.name][j].double(), ranks[s.name]) for s in task.selected}
        norm = sum(core.pow(2).sum() for core, _ in parts.values()).sqrt().clamp_min(1e-30)
        for s in task.selected:
            core, us = parts[s.name]
            for side, scale in (("out", 1.0), ("in", in_scale)):
                f_core, f_us = factors_of(f, side, s)
                f_core[k] = (core * scale / norm).to(f_core.dtype)
                for f_u, u in zip(f_us, us):
                    f_u[k] = u.to(f_u.dtype)


def reset_adam_rows_(opt: torch.optim.Optimizer, f: Factors, which: list[int]) -> None:
    """Zero Adam's moment estimates of some subnetworks (every factor's first axis indexes
    subnetworks), so that a re-initialised one does not inherit its old update direction."""
    idx = torch.tensor(which, dtype=torch.long)
    for t in f.values():
        state = opt.state.get(t, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][idx.to(state[name].device)] = 0


def pick_rows(errors: Float[torch.Tensor, " s"], n: int, gen: torch.Generator) -> Optional[list[int]]:
    """n rows drawn with probability proportional to their squared error (the worst
    reconstructed ones most often), without replacement while there are enough rows with an
    error; None if nothing is left to reconstruct, or if an error is not finite (a diverged run:
    ``sweep`` and ``best_of`` rank it last by its NaN loss rather than lose the other runs)."""
    weights = errors.detach().double().cpu().clamp_min(0).pow(2)
    if not bool(torch.isfinite(weights).all()):  # the factors diverged: nothing to aim at
        warnings.warn("non-finite reconstruction errors at a resampling: the factors have diverged (lower lr); no "
                      "subnetwork is resampled, and the run ends with a NaN loss as it would without resampling",
                      stacklevel=5)
        return None
    if not weights.sum() > 0:
        return None
    return torch.multinomial(weights, n, replacement=n > int((weights > 0).sum()), generator=gen).tolist()


def resample_dead(task: Task, f: Factors, opt: torch.optim.Optimizer, x: torch.Tensor,
                  paired: Optional[torch.Tensor], gen: torch.Generator, last_active: torch.Tensor, step_index: int) -> int:
    """Re-initialise dead subnetworks (at most ``cfg.resample_max``, lowest index first) toward
    residuals g_i - g_hat_i of samples of the global batch ``x``, drawn with probability
    proportional to their squared error, reset their Adam state and count them as active now.
    g_hat keeps every coefficient of the live subnetworks, not only the batch top-k: otherwise
    the worst errors are those of samples that got no top-k slot, which the live ones already
    reconstruct. The draw uses the run's generator on the errors gathered from every rank, so
    all ranks pick the same rows. Returns how many were resampled."""
    cfg = task.cfg
    dead = (step_index - last_active) >= cfg.dead_steps
    if not bool(dead.any()):
        return 0
    where = f"while resampling dead subnetworks before step {step_index}"  # told the others if this rank fails
    with distributed.announced(task.sharded, where, x.device):
        stats, rows_of = gradient_batch(task, f, distributed.shard(x), gen, distributed.shard(paired))
        live = ~dead.to(stats.A.device)
        coef = stats.A * live
        with torch.no_grad():
            G = gram({k: v for k, v in f.items() if k.startswith("out/")}, task.selected)
            errors = sample_errors(stats.A, stats.B, stats.gsq, G, live.expand_as(coef))
    errors_all, local = distributed.gather_cat(errors)
    which = dead.nonzero().squeeze(1).tolist()[:cfg.resample_max]
    picks = pick_rows(errors_all, len(which), gen)
    if picks is None:
        return 0
    with distributed.announced(task.sharded, where, x.device):
        targets = residuals(task, f, coef, rows_of, picks, local)
    sum_over_ranks_(task, targets, x.device)
    in_norms = sq_norms(f, task.selected, "in").detach().sqrt()
    in_scale = float(in_norms[live].mean() if bool(live.any()) else in_norms.mean())
    set_subnetworks_(f, task, factor_ranks(f, task.selected), which, targets, in_scale)
    reset_adam_rows_(opt, f, which)
    last_active[which] = step_index
    return len(which)
