"""Review fixes in the sweep helpers: a failing run or score lost every finished row; a diverged
run with resampling raised instead of ending with the NaN loss that sweep and best_of rank last;
rows of different L3D seeds measured their error against references of different seeds; a value
given twice ran twice; 0-d tensors and bool seeds were taken as they came; and every row shared
the caller's rank dict."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from l3d_lens.toy import make_toy, paper_config, recommended_config
from l3d_lens.toy.sweep import best_of, sweep

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tmcs():
    return make_toy("tmcs", 0, epochs=1, n_train=64, n_l3d=32, n_eval=32)


def test_a_failing_score_keeps_the_finished_rows(tmcs):
    cfg = recommended_config("tmcs", epochs=2)
    calls = []

    def score(dec):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the user's score broke")
        return {"eval_n": len(calls)}

    with pytest.raises(RuntimeError, match="the user's score broke") as e:
        sweep(tmcs.model, tmcs.l3d_data, cfg, top_k=[0.05, 0.1, 0.2], score=score)
    assert [r["top_k"] for r in e.value.sweep_rows] == [0.05]
    assert "1 of 3 grid points finished before this one" in e.value.__notes__[0]


def test_a_diverged_run_with_resampling_ends_with_a_nan_loss():
    toy = make_toy("higher_rank", 0, epochs=1, n_train=64, n_l3d=64, n_eval=32)
    cfg = recommended_config("higher_rank", epochs=4, lr=1e8).replace(dead_steps=1)
    assert cfg.resample_epochs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = best_of(toy.model, toy.l3d_data, cfg, seeds=[0, 1])
    assert math.isnan(dec.history[-1]["loss"])
    assert any("the factors have diverged" in str(w.message) for w in caught)


def test_rows_of_different_seeds_share_the_evaluation_references(tmcs):
    cfg = paper_config("tmcs", epochs=2)  # random references
    rows = sweep(tmcs.model, tmcs.l3d_data, cfg, seeds=[0, 1], eval_data=tmcs.eval_data)
    for row in rows:
        dec_cfg = cfg.replace(seed=row["seed"])
        from l3d_lens import decompose

        dec = decompose(tmcs.model, tmcs.l3d_data, dec_cfg, progress=False)
        assert row["error"] == dec.reconstruction_error(tmcs.eval_data, seed=0)


@pytest.mark.parametrize("axis, values, match", [("top_k", [0.1, 0.1], "top_k gives 0.1 twice"),
                                                 ("seeds", [0, 0], "seeds gives 0 twice"),
                                                 ("seeds", [True], "seeds must be integers, got True")])
def test_bad_axis_values_are_refused_before_any_run(tmcs, axis, values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sweep(tmcs.model, tmcs.l3d_data, recommended_config("tmcs", epochs=2), **{axis: values})


def test_tensor_values_are_taken_as_numbers_and_rows_own_their_rank(tmcs):
    rank = {"default": 1}
    rows = sweep(tmcs.model, tmcs.l3d_data, recommended_config("tmcs", epochs=1), top_k=torch.tensor([0.1, 0.2]),
                 rank=[rank])
    assert [r["top_k"] for r in rows] == [pytest.approx(0.1), pytest.approx(0.2)]
    assert all(isinstance(r["top_k"], float) for r in rows)
    rows[0]["rank"]["default"] = 5
    assert rank == {"default": 1} and rows[1]["rank"] == {"default": 1}


def test_best_of_refuses_bool_seeds(tmcs):
    with pytest.raises(TypeError, match="seeds must be integers"):
        best_of(tmcs.model, tmcs.l3d_data, recommended_config("tmcs", epochs=1), seeds=[True])


def test_large_numpy_seeds_are_taken_exactly(tmcs):
    import numpy as np

    seeds = np.array([2 ** 62, 2 ** 62 + 1])
    rows = sweep(tmcs.model, tmcs.l3d_data, recommended_config("tmcs", epochs=1), seeds=seeds)
    assert [r["seed"] for r in rows] == [2 ** 62, 2 ** 62 + 1]


def test_an_exception_keeps_its_own_rows_attribute(tmcs):
    class HasRows(Exception):
        rows = "the user's"

    def score(dec):
        raise HasRows()

    with pytest.raises(HasRows) as e:
        sweep(tmcs.model, tmcs.l3d_data, recommended_config("tmcs", epochs=1), score=score)
    assert e.value.rows == "the user's" and e.value.sweep_rows == []


def test_integral_float_tensor_seeds_are_ints(tmcs):
    rows = sweep(tmcs.model, tmcs.l3d_data, recommended_config("tmcs", epochs=1), seeds=torch.arange(2.0))
    assert [r["seed"] for r in rows] == [0, 1] and all(type(r["seed"]) is int for r in rows)
