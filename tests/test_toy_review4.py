"""Review 4 of the toy training and sweeps: ``fit_best_of`` kept a diverged (NaN) first start
over finite ones (every later ``loss < nan`` was False); ``best_of`` checked its seeds inside the
loop, so an out-of-range seed late in the list raised only after the earlier runs trained (their
results lost), and a 0-d tensor of seeds failed with a bare 'iteration over a 0-d tensor'."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from l3d_lens.toy import sweep as sweep_module
from l3d_lens.toy import train as train_module
from l3d_lens.toy.reproduce import recommended_config
from l3d_lens.toy.train import _seed, fit_best_of

torch.set_num_threads(1)
NAN = float("nan")


def _kept_start(monkeypatch, probe_losses):
    """The index of the start ``fit_best_of`` keeps when its probes end at ``probe_losses``
    (``fit`` faked; the probes are the whole training, so nothing trains on after)."""
    built, fits = [], iter(probe_losses)

    def build(s):
        built.append(nn.Linear(1, 1))
        return built[-1]

    monkeypatch.setattr(train_module, "fit", lambda model, x, y, **kw: [next(fits)])
    x = torch.zeros(4, 1)
    kept = fit_best_of(build, x, x, epochs=1, restarts=len(probe_losses), probe_epochs=1).model
    return next(i for i, m in enumerate(built) if m is kept)


def test_fit_best_of_ranks_a_diverged_start_last_as_kept_run_does(monkeypatch):
    assert _kept_start(monkeypatch, [NAN, 0.4, 0.2]) == 2  # the first start diverged
    assert _kept_start(monkeypatch, [NAN, 0.4, NAN]) == 1
    assert _kept_start(monkeypatch, [0.3, NAN, 0.5]) == 0
    assert _kept_start(monkeypatch, [NAN, NAN]) == 0  # every start diverged: the first
    assert _kept_start(monkeypatch, [0.5, 0.2, 0.2]) == 1  # finite: the lowest, ties to the earlier start
    assert _kept_start(monkeypatch, [math.inf, 0.7]) == 1


def test_fit_best_of_trains_on_a_finite_start_when_the_first_one_diverged():
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    diverged = _seed(0, 10)  # the seed of the block's first probe start

    def build(s):
        model = nn.Sequential(nn.Linear(4, 4))
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(s)))
            if s == diverged:
                model[0].weight.fill_(NAN)
        return model

    fitted = fit_best_of(build, x, x.clone(), epochs=3, restarts=3, probe_epochs=1, lr=1e-2)
    assert len(fitted.losses) == 3 and all(math.isfinite(v) for v in fitted.losses)
    assert all(p.isfinite().all() for p in fitted.model.parameters())


@pytest.fixture
def no_decompose(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("best_of ran decompose before refusing its seeds")

    monkeypatch.setattr(sweep_module, "decompose", refuse)


@pytest.mark.parametrize("seeds", [[0, 1, 2 ** 64], (0, 1, 2, -2 ** 63 - 1)])
def test_best_of_refuses_an_out_of_range_seed_late_in_the_list_before_any_run(no_decompose, seeds):
    with pytest.raises(ValueError, match="seed must be an int in"):
        sweep_module.best_of(None, None, recommended_config("tms", epochs=1), seeds=seeds)


@pytest.mark.parametrize("seeds", [torch.tensor(3), np.array(3), np.int64(3)])
def test_zero_d_seeds_are_refused_naming_what_seeds_must_be(no_decompose, seeds):
    cfg = recommended_config("tms", epochs=1)
    with pytest.raises(TypeError, match=r"seeds must be an iterable of L3D seeds, e\.g\. range\(3\)"):
        sweep_module.best_of(None, None, cfg, seeds=seeds)
    with pytest.raises(TypeError, match=r"seeds must be a sequence of values to try.*put a single value in a list"):
        sweep_module.sweep(None, None, cfg, seeds=seeds)


def test_best_of_still_takes_a_one_d_tensor_of_seeds(monkeypatch):
    losses = {0: 0.3, 1: 0.1, 2: 0.2}
    fake = lambda model, data, cfg, progress: SimpleNamespace(cfg=cfg, history=[{"loss": losses[cfg.seed]}])  # noqa: E731
    monkeypatch.setattr(sweep_module, "decompose", fake)
    dec = sweep_module.best_of(None, None, recommended_config("tms", epochs=1), seeds=torch.tensor([0, 1, 2]))
    assert dec.cfg.seed == 1 and type(dec.cfg.seed) is int
