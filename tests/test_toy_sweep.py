"""sweep.py's choices between runs (a diverged run never wins) and its checks of the whole grid
before the first decompose (a bad value late in the grid costs no finished run)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from l3d_lens.toy import make_toy
from l3d_lens.toy import sweep as sweep_module
from l3d_lens.toy.reproduce import evaluate, recommended_config
from l3d_lens.toy.sweep import best, best_of, kept_run, sweep

torch.set_num_threads(1)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def toy():
    return make_toy("tms", 0, epochs=2, n_train=200, n_l3d=64, n_eval=64)


@pytest.fixture
def runs(monkeypatch):
    """The configs sweep's and best_of's decompose was called with (the real decompose runs)."""
    calls = []
    real = sweep_module.decompose

    def counting(model, data, cfg, **kw):
        calls.append(cfg)
        return real(model, data, cfg, **kw)

    monkeypatch.setattr(sweep_module, "decompose", counting)
    return calls


def test_a_nan_ranks_last_in_kept_run_and_best_and_ties_go_to_the_earlier_run():
    assert kept_run([NAN, 1.0, 0.5]) == 2
    assert kept_run([0.5, NAN, 0.5]) == 0
    assert kept_run([NAN, INF]) == 1 and kept_run([INF, NAN]) == 0  # +inf is a number
    assert kept_run([NAN, NAN, NAN]) == 0
    rows = [{"error": NAN, "i": 0}, {"error": 0.3, "i": 1}, {"error": 0.3, "i": 2}, {"error": 0.7, "i": 3}]
    assert best(rows)["i"] == 1
    assert best(rows, minimize=False)["i"] == 3
    assert best(rows[:3], minimize=False)["i"] == 1
    assert best([{"error": NAN, "i": 0}, {"error": NAN, "i": 1}])["i"] == 0
    assert best([{"error": NAN, "i": 0}, {"error": NAN, "i": 1}], minimize=False)["i"] == 0


def test_best_of_never_keeps_a_diverged_run_unless_every_run_diverged(monkeypatch):
    cfg = recommended_config("tms", epochs=2)

    def kept_seed(losses):
        fake = lambda model, data, cfg, progress: SimpleNamespace(cfg=cfg, history=[{"loss": losses[cfg.seed]}])
        monkeypatch.setattr(sweep_module, "decompose", fake)
        return best_of(None, None, cfg, seeds=range(len(losses))).cfg.seed

    assert kept_seed([NAN, 0.4, 0.2]) == 2  # the first seed diverged
    assert kept_seed([0.3, NAN, 0.5]) == 0
    assert kept_seed([NAN, NAN]) == 0
    assert kept_seed([0.5, 0.2, 0.2]) == 1  # finite losses: the lowest, ties to the earlier seed


def test_sweep_checks_every_grid_point_before_the_first_decompose(toy, runs):
    cfg = recommended_config("tms", epochs=2)
    with pytest.raises(ValueError, match="top_k must be a fraction"):
        sweep(toy.model, toy.l3d_data, cfg, top_k=[0.1, 0.2, 5])
    with pytest.raises(ValueError, match="above every dimension"):  # checked against the model
        sweep(toy.model, toy.l3d_data, cfg, rank=[1, 50])
    assert runs == []


def test_sweep_checks_the_data_and_every_grid_points_memory_before_the_first_decompose(toy, runs, monkeypatch):
    cfg = recommended_config("tms", epochs=2)
    sizes = []

    def memory(task, data):
        sizes.append(task.cfg.n_subnetworks)
        if task.cfg.n_subnetworks > 8:
            raise MemoryError(f"{task.cfg.n_subnetworks} subnetworks do not fit")

    monkeypatch.setattr(sweep_module, "check_memory", memory)
    with pytest.raises(MemoryError, match="16 subnetworks"):
        sweep(toy.model, toy.l3d_data, cfg, n_subnetworks=[4, 8, 16])
    assert sizes == [4, 8, 16] and runs == []
    with pytest.raises(ValueError, match="dtype"):
        sweep(toy.model, toy.l3d_data.double(), cfg, n_subnetworks=[4, 8])
    assert runs == []


def test_sweep_checks_eval_data_against_the_model_before_the_first_decompose(toy, runs):
    cfg = recommended_config("tms", epochs=2)
    with pytest.raises(ValueError, match=r"eval_data does not fit the model.*\(1, 3\).*cannot be multiplied"):
        sweep(toy.model, toy.l3d_data, cfg, eval_data=toy.eval_data[:, :3])
    with pytest.raises(ValueError, match="eval_data does not fit the model.*float64"):
        sweep(toy.model, toy.l3d_data, cfg, eval_data=toy.eval_data.double())
    with pytest.raises(TypeError, match="eval_data: data is a one-shot iterator"):
        sweep(toy.model, toy.l3d_data, cfg, eval_data=iter([toy.eval_data]))
    assert runs == []
    batches = [toy.eval_data[:40], toy.eval_data[40:]]  # batches of the right width pass
    rows = sweep(toy.model, toy.l3d_data, cfg, top_k=[0.1, 1.0], eval_data=batches)
    assert [r["top_k"] for r in rows] == [0.1, 1.0] and len(runs) == 2
    assert all(0 <= r["error"] < 2 for r in rows)


@pytest.mark.parametrize("axes", [{"top_k": 0.2}, {"seeds": 5}, {"rank": "12"}, {"rank": {"default": 2}},
                                  {"n_subnetworks": 4}])
def test_sweep_refuses_one_value_where_it_needs_a_sequence(toy, runs, axes):
    name = next(iter(axes))
    with pytest.raises(TypeError, match=f"{name} must be a sequence of values to try, e.g. {name}=.*in a list"):
        sweep(toy.model, toy.l3d_data, recommended_config("tms", epochs=2), **axes)
    assert runs == []


def test_score_must_return_a_dict_and_a_clash_suggests_prefixing_evaluate(toy, runs):
    cfg = recommended_config("tms", epochs=2)
    with pytest.raises(TypeError, match="score must be a callable"):
        sweep(toy.model, toy.l3d_data, cfg, score={"n": 1})
    assert runs == []
    with pytest.raises(TypeError, match="score must return a dict of extra columns, got float"):
        sweep(toy.model, toy.l3d_data, cfg, score=lambda dec: 1.0)
    with pytest.raises(ValueError, match=r"score returned \['dead_fraction', 'error', 'train_error'\].*'eval_' \+ k"):
        sweep(toy.model, toy.l3d_data, cfg, eval_data=toy.eval_data, score=lambda dec: evaluate(toy, dec))
    # the combination the message suggests works: evaluate's error is the sweep's on the same data
    (row,) = sweep(toy.model, toy.l3d_data, cfg, eval_data=toy.eval_data,
                   score=lambda dec: {"eval_" + k: v for k, v in evaluate(toy, dec).items()})
    assert row["eval_error"] == pytest.approx(row["error"]) and "eval_mmcs" in row


def test_sweep_takes_what_decompose_takes_under_autocast(toy, runs):
    """A bf16 model on float32 data runs under bf16 autocast: decompose takes it, so the sweep's
    data check must too (it used to probe without autocast and refuse it); float64 data is
    refused up front, naming the autocast."""
    import copy

    model = copy.deepcopy(toy.model).to(torch.bfloat16)
    cfg = recommended_config("tms", epochs=2).replace(autocast="bf16")
    (row,) = sweep(model, toy.l3d_data, cfg, eval_data=toy.eval_data)
    assert len(runs) == 1 and torch.isfinite(torch.tensor(row["error"]))
    with pytest.raises(ValueError, match=r"eval_data does not fit the model.*float64\) under bf16 autocast failed"):
        sweep(model, toy.l3d_data, cfg, eval_data=toy.eval_data.double())
    with pytest.raises(ValueError, match="data does not fit the model.*float32"):  # without autocast: refused
        sweep(model, toy.l3d_data, cfg.replace(autocast=None))
    assert len(runs) == 1
