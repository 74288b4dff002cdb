"""Weights a model keeps in buffers (BatchNorm's running statistics of a plain module, which set
its eval-mode forward and so every gradient) are part of what a saved decomposition and a
checkpoint were made on: a change is refused, an unchanged model loads and resumes, and a
checkpoint written before buffers were recorded still resumes, with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

import l3d_lens
from l3d_lens import training
from l3d_lens.decomposition import build_task

from .test_checkpoint_review2 import edit_state, interrupted, same

torch.set_num_threads(1)


def bn_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model.double().eval()


def setup():
    x = torch.rand(14, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components=["0.weight", "3.weight"], n_subnetworks=3, rank=1, epochs=2, batch_size=6,
                             lr=0.05, divergence="mse", reference="mean", dtype="float64")
    return x, cfg


def test_load_refuses_changed_running_statistics_and_takes_unchanged_ones(tmp_path):
    model, (x, cfg) = bn_mlp(), setup()
    dec = l3d_lens.decompose(model, x, cfg, progress=False)
    dec.save(tmp_path / "dec")
    assert same(l3d_lens.Decomposition.load(tmp_path / "dec", model), dec)
    with torch.no_grad():
        model[1].running_var.mul_(100)
    with pytest.raises(ValueError, match="outside the decomposed weights differ"):
        l3d_lens.Decomposition.load(tmp_path / "dec", model)
    l3d_lens.Decomposition.load(tmp_path / "dec", model, check_weights=False)  # the way to load it anyway


def test_a_checkpoint_refuses_changed_running_statistics(tmp_path, monkeypatch):
    model, (x, cfg) = bn_mlp(), setup()
    interrupted(monkeypatch, model, x, cfg, tmp_path / "ck", at=2)
    with torch.no_grad():
        model[1].running_mean.add_(3)
    with pytest.raises(ValueError, match="kept in buffers"):
        l3d_lens.decompose(model, x, cfg, progress=False, checkpoint=tmp_path / "ck")


def test_an_unchanged_model_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    model, (x, cfg) = bn_mlp(), setup()
    whole = l3d_lens.decompose(model, x, cfg, progress=False)
    interrupted(monkeypatch, model, x, cfg, tmp_path / "ck", at=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = l3d_lens.decompose(model, x, cfg, progress=False, checkpoint=tmp_path / "ck")
    assert same(resumed, whole)


def test_a_checkpoint_from_before_buffers_were_recorded_resumes_with_a_warning(tmp_path, monkeypatch):
    model, (x, cfg) = bn_mlp(), setup()
    whole = l3d_lens.decompose(model, x, cfg, progress=False)
    interrupted(monkeypatch, model, x, cfg, tmp_path / "ck", at=2)
    edit_state(tmp_path / "ck", lambda state: state["identity"]["model"].pop("buffers"))
    with pytest.warns(UserWarning, match="weights kept in buffers"):
        resumed = l3d_lens.decompose(model, x, cfg, progress=False, checkpoint=tmp_path / "ck")
    assert same(resumed, whole)


def test_a_model_without_weight_buffers_records_none():
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    mlp.register_buffer("cache", torch.ones(3), persistent=False)  # not state: not a weight
    task = build_task(mlp, l3d_lens.L3DConfig(components=["0.weight"], n_subnetworks=2, rank=1,
                                              divergence="mse", reference="mean"))
    assert training.model_fingerprint(task)["buffers"] == training.NO_BUFFERS
    bn = build_task(bn_mlp(), setup()[1])
    assert [n for n, _ in bn.adapter.weight_buffers()] == ["1.running_mean", "1.running_var"]


def test_a_model_that_gained_weight_buffers_does_not_resume_a_checkpoint_of_one_without(tmp_path, monkeypatch):
    """A checkpoint now records 'no buffers'; a model that gained one (here a BatchNorm whose
    statistics scale every gradient) is another model, not an unrecorded part."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Identity(), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).double()  # bn_mlp's layout, no BatchNorm
    x, cfg = setup()
    interrupted(monkeypatch, plain, x, cfg, tmp_path / "ck", at=2)
    grown = torch.nn.Sequential(*plain, torch.nn.BatchNorm1d(3, affine=False)).double().eval()
    with torch.no_grad():
        grown[4].running_var.fill_(1e-4)
    with pytest.raises(ValueError, match="kept in buffers"):
        l3d_lens.decompose(grown, x, cfg, progress=False, checkpoint=tmp_path / "ck")


def test_a_checkpoint_from_before_buffers_of_a_model_without_them_resumes_silently(tmp_path, monkeypatch):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Identity(), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).double()  # bn_mlp's layout, no BatchNorm
    x, cfg = setup()
    whole = l3d_lens.decompose(plain, x, cfg, progress=False)
    interrupted(monkeypatch, plain, x, cfg, tmp_path / "ck", at=2)
    edit_state(tmp_path / "ck", lambda state: state["identity"]["model"].pop("buffers"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = l3d_lens.decompose(plain, x, cfg, progress=False, checkpoint=tmp_path / "ck")
    assert same(resumed, whole)


def test_the_memory_refusal_advises_only_the_choices_left(monkeypatch):
    """It advised sample='sequence' / engine='fast' to a plain module on the fast engine, where
    neither applies; now only what this run can still change."""
    from l3d_lens import memory

    monkeypatch.setattr(memory, "available", lambda device: 1)
    model, (x, cfg) = bn_mlp(), setup()
    with pytest.raises(MemoryError) as fast:
        l3d_lens.decompose(model, x, cfg, progress=False)
    assert "reduce batch_size" in str(fast.value) and "sample=" not in str(fast.value) and "engine=" not in str(fast.value)
    with pytest.raises(MemoryError, match=r"reduce batch_size.*, or use engine='fast'"):
        l3d_lens.decompose(model, x, cfg.replace(engine="exact"), progress=False)
