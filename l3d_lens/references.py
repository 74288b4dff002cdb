"""References y_r: what each sample's output is compared against.

Samples are the leading axis of a "sample view" of the outputs (see ``samples``); a
reference is drawn per sample from the same batch ("random": a uniformly drawn *other*
sample, the paper's choice), or is the batch mean, the uniform distribution (KL), zero (MSE:
the divergence is then the output's own squared norm, so a sample's gradient involves only its
own active features), or the output of paired reference data (contrastive: same position of
the paired input).
"""

from __future__ import annotations

from typing import Optional

import torch


def draw_partners(n: int, generator: torch.Generator) -> torch.Tensor:
    """For each of n samples, the index of another sample drawn uniformly (never itself)."""
    if n < 2:
        raise ValueError("reference='random' needs at least 2 samples in a batch; use a larger batch or "
                         "reference='mean' / 'uniform' / 'paired'")
    shift = torch.randint(1, n, (n,), generator=generator)
    return (torch.arange(n) + shift) % n


def references(targets: torch.Tensor, mode: str, divergence, generator: Optional[torch.Generator],
               paired: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference targets [n_samples, ...] for sample-view targets [n_samples, ...] (detached).

    ``targets`` are already in target space (log-probs for KL)."""
    targets = targets.detach()
    if mode == "random":
        return targets[draw_partners(targets.shape[0], generator).to(targets.device)]
    if mode == "mean":
        if divergence == "kl":
            mean = torch.logsumexp(targets, dim=0) - _log(targets.shape[0], targets.dtype)
        else:
            mean = targets.mean(0)
        return mean.expand_as(targets)
    if mode == "uniform":
        if divergence != "kl":
            raise ValueError("reference='uniform' is defined for divergence='kl' only; use 'random', 'mean' or 'paired'")
        return torch.full_like(targets, -_log(targets.shape[-1], targets.dtype).item())
    if mode == "zero":
        if divergence == "kl":
            raise ValueError("reference='zero' is defined for divergence='mse' (or a callable) only; for KL use "
                             "'uniform', 'random', 'mean' or 'paired'")
        return torch.zeros_like(targets)
    if mode == "paired":
        if paired is None:
            raise ValueError("reference='paired' needs reference data: decompose(model, data, cfg, reference=...)")
        return paired.detach()
    raise ValueError(f"unknown reference {mode!r}; choose 'random', 'mean', 'uniform', 'zero' or 'paired'")


def _log(n: int, dtype: torch.dtype) -> torch.Tensor:
    """log(n) in float64 for float64 targets (a float32 log was 3e-8 off), else in float32 as
    before (a half-precision n would round: 257 in bfloat16 is 256)."""
    return torch.log(torch.tensor(float(n), dtype=torch.float64 if dtype == torch.float64 else torch.float32))
