"""Toy review 5: integral epochs of any kind scale the paper's schedule alike, scaled_lr_step's
docstring says what it computes, and fit / fit_tms / the data samplers / selectivity refuse bad
arguments with a clear ValueError before any work."""

import numpy as np
import pytest
import torch

from l3d_lens.toy import data, fit, fit_tms, make_toy, metrics, models, paper_config, recommended_config
from l3d_lens.toy.reproduce import scaled_lr_step

torch.set_num_threads(1)


@pytest.mark.parametrize("epochs", [np.int64(50), np.int32(50), torch.tensor(50)])
@pytest.mark.parametrize("name", ["tms", "tmcs", "higher_rank", "square"])
def test_integral_epochs_give_the_python_int_config(name, epochs):
    assert paper_config(name, epochs=epochs) == paper_config(name, epochs=50)
    assert paper_config(name, epochs=epochs).lr_step == 5
    assert recommended_config(name, epochs=epochs) == recommended_config(name, epochs=50)


def test_numpy_epochs_keep_the_higher_rank_resampling():
    cfg = recommended_config("higher_rank", epochs=np.int64(300))
    assert (cfg.lr_step, cfg.resample_epochs, cfg.resample_max) == (30, (25,), 1)
    assert cfg == recommended_config("higher_rank", epochs=300)


def test_scaled_lr_step_numbers_and_docstring():
    assert {e: scaled_lr_step(e) for e in (5, 15, 25, 35, 100, 1000)} == {5: 1, 15: 2, 25: 2, 35: 4, 100: 10,
                                                                        1000: 100}
    doc = scaled_lr_step.__doc__
    assert "the same ten" not in doc and "round" in doc and "about ten" in doc


def _tmcs_data(n=64):
    x = data.sparse_features(n, 10, seed=1)
    return x, 2 * x


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=-3), r"epochs must be an integer >= 1 \(training epochs\), got -3"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(epochs=2.5), "epochs must be an integer >= 1"),
    (dict(epochs=True), "epochs must be an integer >= 1"),
    (dict(epochs=1, batch_size=0), r"batch_size must be an integer >= 1 \(samples per batch\), got 0"),
    (dict(epochs=1, batch_size=None), "batch_size must be an integer >= 1"),
])
def test_fit_refuses_bad_counts_before_training(kwargs, message):
    model = models.tmcs(0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _tmcs_data()
    with pytest.raises(ValueError, match=message):
        fit(model, x, y, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fit_refuses_inputs_and_targets_of_different_rows():
    x, y = _tmcs_data()
    with pytest.raises(ValueError, match=r"x and y must have the same number of rows.*x \(64, 10\) and y \(16, 10\)"):
        fit(models.tmcs(0), x, y[:16], epochs=1)
    with pytest.raises(ValueError, match="x and y must have the same number of rows"):
        fit(models.tmcs(0), x[:0], y[:0], epochs=1)


def test_fit_takes_numpy_counts():
    x, y = _tmcs_data()
    assert fit(models.tmcs(0), x, y, epochs=np.int64(2), batch_size=np.int64(16)) == \
        fit(models.tmcs(0), x, y, epochs=2, batch_size=16)


@pytest.mark.parametrize("epochs", [0, -1, 1.5])
def test_fit_tms_refuses_bad_epochs(epochs):
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        fit_tms(data.sparse_features(64, 5, seed=1), epochs=epochs)


@pytest.mark.parametrize("n", [2.5, True, 0, -2, "3", None])
def test_samplers_refuse_bad_row_counts(n):
    with pytest.raises(ValueError, match=r"n must be an integer >= 1 \(rows to draw\)"):
        data.sparse_features(n, 5)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1 \(rows to draw\)"):
        data.grouped_features(n)


def test_samplers_take_integral_row_counts():
    assert torch.equal(data.sparse_features(np.int64(7), 5, seed=2), data.sparse_features(7, 5, seed=2))
    assert data.grouped_features(torch.tensor(3)).shape == (3, 25)


def test_toy_inputs_refuse_bad_row_counts():
    toy = make_toy("tmcs", 0, epochs=1, n_train=64, n_l3d=8, n_eval=8)
    for n in (2.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            toy.inputs(n, 1)
    assert toy.inputs(np.int64(4), 1).shape == (4, 10)


@pytest.mark.parametrize("relevant, got", [(torch.ones(16, 10), r"torch\.float32 \(16, 10\)"), ([True] * 10, "list")])
def test_selectivity_checks_relevant_before_inverting_it(relevant, got):
    x = data.sparse_features(16, 10, seed=3)
    with pytest.raises(ValueError, match=rf"relevant must be a bool mask of the output's shape \(16, 10\); got {got}"):
        metrics.selectivity(models.tmcs(0), {}, x, relevant)


@pytest.mark.parametrize("x, got", [(torch.rand(0, 5), r"shape \(0, 5\)"), (torch.rand(8), r"shape \(8,\)"),
                                    ([[1.0] * 5], "list")])
def test_fit_tms_refuses_bad_inputs(x, got):
    with pytest.raises(ValueError, match=rf"x must be a \[samples, features\] tensor with at least one sample, got {got}"):
        fit_tms(x, epochs=1)
