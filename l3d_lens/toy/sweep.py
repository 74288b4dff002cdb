"""Sweep L3D's top-k fraction, rank and number of subnetworks on one model (the paper fixes k
and rank for every model and names this as a weakness). Each grid point is a full
``decompose``; the result is one row per point with the reconstruction error (on
``eval_data``: pass held-out data, it defaults to the training data), the dead fraction, the run
time and whatever ``score`` returns.

``best_of`` restarts L3D from several seeds and keeps the lowest training loss (``kept_run``
is that rule alone, for callers that keep every run).

Not toy-specific: it works on any model and data ``decompose`` accepts (it lives here because
the toy models are where a sweep is cheap enough to run).
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from ..config import L3DConfig
from ..decomposition import Decomposition, decompose


def sweep(model, data, cfg: L3DConfig, *, top_k: Sequence[float] = (), rank: Sequence[Any] = (),
          n_subnetworks: Sequence[int] = (), seeds: Sequence[int] = (), eval_data=None,
          score: Optional[Callable[[Decomposition], dict[str, Any]]] = None,
          progress: bool = False) -> list[dict[str, Any]]:
    """Decompose ``model`` once per combination of the given values (an empty sequence keeps
    ``cfg``'s value) and return one dict per run: the settings, ``error`` (reconstruction error
    on ``eval_data``, default ``data``), ``train_error`` (last epoch), ``dead_fraction``,
    ``seconds`` and the entries of ``score(dec)`` if given (under their own names: a key that
    would overwrite one of the sweep's is an error)."""
    axes = {"top_k": list(top_k) or [cfg.top_k], "rank": list(rank) or [cfg.rank],
            "n_subnetworks": list(n_subnetworks) or [cfg.n_subnetworks], "seed": list(seeds) or [cfg.seed]}
    rows = []
    for values in itertools.product(*axes.values()):
        settings = dict(zip(axes, values))
        run_cfg = cfg.replace(**settings)
        start = time.perf_counter()
        dec = decompose(model, data, run_cfg, progress=progress)
        row = dict(settings, seconds=time.perf_counter() - start,
                   error=dec.reconstruction_error(data if eval_data is None else eval_data),
                   train_error=dec.history[-1]["loss"] if dec.history else float("nan"),
                   dead_fraction=float((dec.fraction_active == 0).double().mean()))
        if score is not None:
            extra = score(dec)
            clash = sorted(set(extra) & set(row))
            if clash:
                raise ValueError(f"score returned {clash}, which the sweep's rows already hold "
                                 f"({sorted(row)}); rename them, e.g. {{'score_' + key: value}}")
            row.update(extra)
        rows.append(row)
    return rows


def best(rows: Sequence[dict[str, Any]], key: str = "error", minimize: bool = True) -> dict[str, Any]:
    """The row with the lowest (``minimize``) or highest value of ``key``."""
    if not rows:
        raise ValueError("no sweep rows")
    return (min if minimize else max)(rows, key=lambda r: r[key])


def best_of(model, data, cfg: L3DConfig, seeds: Sequence[int], progress: bool = False) -> Decomposition:
    """Decompose once per seed and keep the run whose last epoch ended with the lowest training
    loss: restarts against a poor local optimum, chosen by L3D's own objective only (never by a
    ground-truth metric). Ties go to the earlier seed. On TMCS a single run with
    ``loss_norm="sample"`` for the first half of its epochs (``loss_norm_epochs``) ends where
    this keeps it, for a third of the time; on x² it does not (BENCHMARKS.md, "Toy models:
    per-sample, then batch"). ``seeds``: L3D seeds, e.g. ``range(3)``."""
    if isinstance(seeds, (int, str)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"seeds must be an iterable of L3D seeds, e.g. range(3), got {seeds!r}")
    try:
        seeds = [operator.index(s) for s in seeds]
    except TypeError:
        raise TypeError(f"seeds must be integers, e.g. range(3), got {seeds!r}") from None
    if not seeds:
        raise ValueError("best_of needs at least one seed")
    losses: list[float] = []
    for seed in seeds:
        dec = decompose(model, data, cfg.replace(seed=seed), progress=progress)
        losses.append(dec.history[-1]["loss"])
        if kept_run(losses) == len(losses) - 1:
            kept = dec
    return kept


def kept_run(losses: Sequence[float]) -> int:
    """Index of the run ``best_of`` keeps among runs with these final training losses: the
    lowest, ties (and a NaN first run) to the earlier run."""
    if not losses:
        raise ValueError("kept_run needs at least one loss")
    return min(range(len(losses)), key=losses.__getitem__)
