"""Sweep L3D's top-k fraction, rank and number of subnetworks on one model (the paper fixes k
and rank for every model and names this as a weakness). Each grid point is a full
``decompose``; the result is one row per point with the reconstruction error (on
``eval_data``: pass held-out data, it defaults to the training data), the dead fraction, the run
time and whatever ``score`` returns.

``best_of`` restarts L3D from several seeds and keeps the lowest training loss (``kept_run``
is that rule alone, for callers that keep every run). A NaN (diverged) loss or score ranks
last everywhere here.

Not toy-specific: it works on any model and data ``decompose`` accepts (it lives here because
the toy models are where a sweep is cheap enough to run).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import torch

from ..checks import as_index, as_number
from ..config import L3DConfig
from ..data import Data, check_batch, check_data, check_position, first_batch, run_row
from ..decomposition import Decomposition, build_task, check_memory, decompose
from ..task import Task


#: the seed of the random references each row's ``error`` is measured against (``evaluate``'s)
EVAL_SEED = 0


def sweep(model, data, cfg: L3DConfig, *, top_k: Sequence[float] = (), rank: Sequence[Any] = (),
          n_subnetworks: Sequence[int] = (), seeds: Sequence[int] = (), eval_data=None,
          score: Optional[Callable[[Decomposition], Mapping[str, Any]]] = None,
          progress: bool = False) -> list[dict[str, Any]]:
    """Decompose ``model`` once per combination of the given values (an empty sequence keeps
    ``cfg``'s value; a per-weight rank dict goes inside the list: ``rank=[{"default": 2}]``)
    and return one dict per run: the settings, ``error`` (reconstruction error on
    ``eval_data``, default ``data``), ``train_error`` (last epoch), ``dead_fraction``,
    ``seconds`` and the entries of ``score(dec)`` if given. Every grid point (with its memory),
    ``data`` and ``eval_data`` (as each run and its ``reconstruction_error`` take them, with
    ``cfg.position``) are checked before the first run, so a bad value late in the grid costs
    no finished run. With ``reference='paired'`` both are iterables of (data, reference) batches.

    A ``score`` key that would overwrite one of the sweep's is an error; to add the toy metrics,
    prefix them: ``score=lambda dec: {"eval_" + k: v for k, v in evaluate(toy, dec).items()}``.
    If a run or ``score`` fails (or is interrupted), the exception carries the finished rows as
    ``.sweep_rows``. ``error`` draws random references from seed 0 at every grid point (as
    ``evaluate`` does), so rows of different L3D seeds are scored on the same references."""
    plain_rank = dict(cfg.rank) if isinstance(cfg.rank, Mapping) else cfg.rank  # rows hold plain JSON-able values
    axes = {"top_k": _values("top_k", top_k, cfg.top_k), "rank": _values("rank", rank, plain_rank),
            "n_subnetworks": _values("n_subnetworks", n_subnetworks, cfg.n_subnetworks),
            "seed": _values("seeds", seeds, cfg.seed)}
    if score is not None and not callable(score):
        raise TypeError(f"score must be a callable Decomposition -> dict, got {score!r}")
    grid = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    configs = [cfg.replace(**settings) for settings in grid]  # L3DConfig checks each value
    tasks = [build_task(model, c) for c in configs]  # and against the model (a rank above its sizes)
    for name, given in (("data", data), ("eval_data", eval_data)):
        if given is not None:  # reference, position and autocast are the same at every grid point
            _check_fits(tasks[0], given, name)
    for task in tasks:  # a grid point too large for the device, before any run
        check_memory(task, data)
    rows: list[dict[str, Any]] = []
    for settings, run_cfg in zip(grid, configs):
        try:
            rows.append(_run(model, data, run_cfg, settings, eval_data, score, progress))
        except BaseException as e:  # an error or an interrupt: keep what is finished
            with contextlib.suppress(Exception):
                e.sweep_rows = rows
                e.add_note(f"sweep: {len(rows)} of {len(grid)} grid points finished before this one; their rows "
                           f"are this exception's .sweep_rows")
            raise
    return rows


def _values(name: str, values: Any, default: Any) -> list[Any]:
    """One axis of the grid: the values to try (a list, tuple, range ...), or ``[default]``; a
    number given as a 0-d tensor or numpy scalar is taken as the number, and a value given twice
    is an error (its run would repeat another's)."""
    if not _is_collection(values):
        raise TypeError(f"{name} must be a sequence of values to try, e.g. {name}=[{default!r}], got {values!r}; "
                        f"put a single value in a list")
    out = []
    for v in values:
        if name == "seeds" and isinstance(v, bool):
            raise TypeError(f"seeds must be integers, got {v!r} in {values!r}")
        if not isinstance(v, (bool, int, float, Mapping)):  # a 0-d tensor or numpy scalar: its number
            exact = as_index(v) if name != "top_k" else None  # an int exactly (no float round trip)
            number = exact if exact is not None else as_number(v)
            if isinstance(number, float) and name != "top_k" and number.is_integer():
                number = int(number)  # torch.arange(5.) as seeds, as a plain list of them would be
            v = v if number is None else number
        if v in out:
            raise ValueError(f"{name} gives {v!r} twice in {values!r}: that run would repeat another; give each once")
        out.append(v)
    return out or [default]


def _is_collection(values: Any) -> bool:
    """Whether ``values`` is a collection of values to try (a list, tuple, range, 1-d tensor or
    array ...): not a string, bytes or dict, and not one number, a 0-d tensor or numpy array
    included (iterating one raises a bare 'iteration over a 0-d tensor')."""
    return (not isinstance(values, (str, bytes, Mapping)) and isinstance(values, Iterable)
            and getattr(values, "ndim", None) != 0)


def _check_fits(task: Task, given: Data, name: str) -> None:
    """Fail on ``data`` or ``eval_data`` (``name``) the model cannot take, as the first run (or
    its ``reconstruction_error``) would: its type, dtype and ``position`` as ``decompose``
    checks data (no reference argument: paired data comes as (data, reference) batches), then
    one no-grad forward of its first row and of its first batch's reference's (in eval mode, so
    no module changes state; under ``autocast`` as the runs take it, so what ``decompose``
    accepts passes)."""
    adapter, cfg = task.adapter, task.cfg
    paired = cfg.reference == "paired"
    if paired and isinstance(given, torch.Tensor):
        raise ValueError(f"{name}: with reference='paired' a sweep takes {name} as an iterable of (data, reference) "
                         f"batches, e.g. [(x, ref)], not a tensor")
    try:
        check_data(adapter, given, None, paired)
        check_position(adapter, given, cfg.position)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None
    inputs, reference = first_batch(given)
    for what, x in [(name, inputs)] + ([(f"the reference of {name}", reference)] if reference is not None else []):
        row = check_batch(adapter, x, what)[:1]
        try:
            run_row(adapter, row, cfg.autocast)
        except RuntimeError as e:
            under = f" under {cfg.autocast} autocast" if cfg.autocast else ""
            raise ValueError(f"{what} does not fit the model: a forward of its first row (shape {tuple(row.shape)}, "
                             f"{row.dtype}){under} failed: {e}") from None


def _run(model, data, run_cfg: L3DConfig, settings: dict[str, Any], eval_data, score, progress: bool) -> dict[str, Any]:
    """One grid point: decompose, then the sweep's row plus ``score``'s entries."""
    start = time.perf_counter()
    dec = decompose(model, data, run_cfg, progress=progress)
    row = dict(copy.deepcopy(settings), seconds=time.perf_counter() - start,  # a rank dict of its own
               error=dec.reconstruction_error(data if eval_data is None else eval_data, seed=EVAL_SEED),
               train_error=dec.history[-1]["loss"] if dec.history else float("nan"),
               dead_fraction=float((dec.fraction_active == 0).double().mean()))
    if score is not None:
        extra = score(dec)
        if not isinstance(extra, Mapping):
            raise TypeError(f"score must return a dict of extra columns, got {type(extra).__name__}: {extra!r}")
        clash = sorted(set(extra) & set(row))
        if clash:
            raise ValueError(f"score returned {clash}, which the sweep's rows already hold ({sorted(row)}); "
                             f"prefix its keys, e.g. score=lambda dec: {{'eval_' + k: v for k, v in "
                             f"evaluate(toy, dec).items()}}")
        row.update(extra)
    return row


def best(rows: Sequence[dict[str, Any]], key: str = "error", minimize: bool = True) -> dict[str, Any]:
    """The row with the lowest (``minimize``) or highest value of ``key``; NaN ranks last (the
    first row if every value is NaN), ties go to the earlier row."""
    if not rows:
        raise ValueError("no sweep rows")
    if minimize:
        return min(rows, key=lambda r: (_is_nan(r[key]), r[key]))
    return max(rows, key=lambda r: (not _is_nan(r[key]), r[key]))


def best_of(model, data, cfg: L3DConfig, seeds: Sequence[int], progress: bool = False) -> Decomposition:
    """Decompose once per seed and keep the run whose last epoch ended with the lowest training
    loss (``kept_run``: ties to the earlier seed, a diverged run with a NaN loss only if every
    run diverged): restarts against a poor local optimum, chosen by L3D's own objective only
    (never by a ground-truth metric). On TMCS a single run with ``loss_norm="sample"`` for the
    first half of its epochs (``loss_norm_epochs``) ends where this keeps it, for a third of the
    time; on x² it does not (BENCHMARKS.md, "Toy models: per-sample, then batch"). ``seeds``:
    L3D seeds, e.g. ``range(3)``, each given once; every seed is checked before the first run, so a
    bad one late in the list costs no finished run."""
    if not _is_collection(seeds):  # as ``sweep`` checks its axes
        raise TypeError(f"seeds must be an iterable of L3D seeds, e.g. range(3), got {seeds!r}")
    seeds = list(seeds)
    try:
        if any(isinstance(s, bool) for s in seeds):
            raise TypeError
        seeds = [operator.index(s) for s in seeds]
    except TypeError:
        raise TypeError(f"seeds must be integers, e.g. range(3), got {seeds!r}") from None
    if not seeds:
        raise ValueError("best_of needs at least one seed")
    repeated = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if repeated is not None:  # as ``sweep`` refuses a seed given twice
        raise ValueError(f"seeds gives {repeated!r} twice in {seeds!r}: that run would repeat another; give each once")
    configs = [cfg.replace(seed=seed) for seed in seeds]  # L3DConfig checks every seed before the first run
    losses: list[float] = []
    for run_cfg in configs:
        dec = decompose(model, data, run_cfg, progress=progress)
        losses.append(dec.history[-1]["loss"])
        if kept_run(losses) == len(losses) - 1:
            kept = dec
    return kept


def kept_run(losses: Sequence[float]) -> int:
    """Index of the run ``best_of`` keeps among runs with these final training losses: the
    lowest, ties to the earlier run; NaN (a diverged run) ranks last (every loss NaN: the first
    run)."""
    if not losses:
        raise ValueError("kept_run needs at least one loss")
    return min(range(len(losses)), key=lambda i: (_is_nan(losses[i]), losses[i]))


def _is_nan(value: Any) -> bool:
    return bool(value != value)  # NaN is the only value unequal to itself
