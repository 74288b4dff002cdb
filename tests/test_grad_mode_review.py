"""Grad modes and analysis seeds.

1. TransformerLens tutorials start with torch.set_grad_enabled(False): decompose, make_toy and
   compare_with_patching then crashed ("element 0 of tensors does not require grad") because
   the loss was built under the caller's mode. They now train under enable_grad, bit for bit
   as with gradients on, and give the caller's mode back. Under torch.inference_mode() nothing
   can be differentiated, so every entry point says so before any work.
2. impact's seed: None (the default) means cfg.seed as for coefficients, numpy integers are
   seeds, bools are not, and two seeds share no reference draw (seed + r made impact(seed=0) and
   impact(seed=1) share n - 1 of their n draws).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import l3d_lens
import l3d_lens.decomposition
import l3d_lens.toy.train
import l3d_lens.training
from l3d_lens.analysis.impact import reference_seeds
from l3d_lens.patching import compare_with_patching, default_l3d_config
from l3d_lens.toy import make_toy

from .helpers import TinyMLP, tiny_lm, tokens

AUTOGRAD = r"needs autograd; call it outside torch\.inference_mode\(\)"


@pytest.fixture
def grad_off():
    """Gradients off for the test, as a TransformerLens tutorial leaves them; back on after."""
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        torch.set_grad_enabled(True)


def same_decomposition(a, b) -> bool:
    return (a.factors.keys() == b.factors.keys() and all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)
            and a.history == b.history)


def lm_cfg(**kw):
    base = dict(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=3, rank=2, epochs=2, batch_size=4,
                dtype="float64", aux_coef=0.25, dead_steps=1, resample_epochs=(1,))
    return l3d_lens.L3DConfig(**{**base, **kw})


# --- 1. grad modes -------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fast", "exact"])
def test_decompose_with_gradients_off_is_bit_identical_and_leaves_them_off(engine, grad_off):
    model, data, cfg = tiny_lm("bridge"), tokens(8, 6), lm_cfg(engine=engine)
    with torch.enable_grad():
        expected = l3d_lens.decompose(model, data, cfg, progress=False)
    got = l3d_lens.decompose(model, data, cfg, progress=False)
    assert not torch.is_grad_enabled()
    assert same_decomposition(got, expected)
    assert not any(t.requires_grad for t in got.factors.values())


def test_decompose_of_a_plain_module_inside_no_grad_is_bit_identical():
    model = TinyMLP()
    x = torch.rand(24, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=2, rank=1, epochs=2, batch_size=8,
                             dtype="float64")
    expected = l3d_lens.decompose(model, x, cfg, progress=False)
    with torch.no_grad():
        got = l3d_lens.decompose(model, x, cfg, progress=False)
        assert not torch.is_grad_enabled()
    assert same_decomposition(got, expected)


@pytest.mark.parametrize("name", ["tms", "square"])  # autograd's step (tied TMS) and the hand-written chain step
def test_make_toy_with_gradients_off_is_bit_identical_and_leaves_them_off(name, grad_off):
    kw = dict(epochs=2, n_train=200, n_l3d=10, n_eval=10, check_learned=False)
    with torch.enable_grad():
        expected = make_toy(name, 0, **kw)
    got = make_toy(name, 0, **kw)
    assert not torch.is_grad_enabled()
    assert got.train_losses == expected.train_losses
    want = expected.model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in got.model.state_dict().items())


def test_compare_with_patching_with_gradients_off_matches_gradients_on(grad_off):
    model = tiny_lm("bridge", n_layers=1, attn_only=True, normalization=None)
    g = torch.Generator().manual_seed(4)
    clean = torch.randint(0, 20, (6, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, :3] = torch.randint(0, 20, (6, 3), generator=g)

    def metric(logits):
        return logits[:, -1, 3].mean() - logits[:, -1, 7].mean()

    cfg = default_l3d_config(model, 6, epochs=2)
    with torch.enable_grad():
        expected = compare_with_patching(model, clean, corrupted, metric, cfg=cfg)
    got = compare_with_patching(model, clean, corrupted, metric, cfg=cfg)
    assert not torch.is_grad_enabled()
    assert got.heads.equals(expected.heads)
    assert same_decomposition(got.decomposition, expected.decomposition)


def test_inference_mode_is_refused_by_every_entry_point_before_any_work(monkeypatch):
    model, data = tiny_lm("bridge"), tokens(8, 6)
    dec = l3d_lens.decompose(model, data, lm_cfg(), progress=False)
    clean, corrupted = tokens(6, 6, seed=2), tokens(6, 6, seed=3)
    calls = []

    def metric(logits):
        calls.append(1)
        return logits[:, -1, 3].mean()

    def work(*args, **kwargs):
        raise AssertionError("work began under inference_mode")

    for module, name in ((l3d_lens.decomposition, "check_data"), (l3d_lens.decomposition, "batch_stats"),
                         (l3d_lens.toy.train, "_task"), (l3d_lens.toy.train, "_step")):
        monkeypatch.setattr(module, name, work)
    entry_points = {
        "decompose": lambda: l3d_lens.decompose(model, data, lm_cfg(), progress=False),
        "train": lambda: l3d_lens.training.train(dec._task, data, None, progress=False),
        "compare_with_patching": lambda: compare_with_patching(model, clean, corrupted, metric,
                                                               cfg=default_l3d_config(model, 6, epochs=1)),
        "coefficients": lambda: dec.coefficients(data),
        "gradient_norms": lambda: dec.gradient_norms(data),
        "reconstruction_error": lambda: dec.reconstruction_error(data),
        "impact": lambda: dec.impact(data, n_references=2),
        "top_samples": lambda: dec.top_samples(data, 0),
        "head_effects": lambda: dec.head_effects(data),
        "make_toy": lambda: make_toy("tms", 0, epochs=1, n_train=200, n_l3d=10, n_eval=10),
        "fit": lambda: l3d_lens.toy.fit(TinyMLP(), torch.zeros(4, 5, dtype=torch.float64),
                                        torch.zeros(4, 5, dtype=torch.float64), epochs=1),
    }
    for name, call in entry_points.items():
        with torch.inference_mode(), pytest.raises(RuntimeError, match=AUTOGRAD):
            call()
    assert calls == []  # compare_with_patching stopped before its metric and sweeps
    with torch.inference_mode():  # a forward-mode derivative needs no autograd graph
        assert len(dec.top_logits(data, 0, k=3)) == 3


# --- 2. impact's seed ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded():
    """A token-mode decomposition with cfg.seed=3, and data."""
    return l3d_lens.decompose(tiny_lm("bridge"), tokens(8, 6), lm_cfg(seed=3), progress=False), tokens(4, 6)


def test_impact_seed_defaults_to_the_config_seed_like_coefficients(seeded):
    dec, x = seeded
    one = dec.impact(x, n_references=1)
    assert torch.equal(one.reshape(-1, 3), dec.coefficients(x).abs())
    assert torch.equal(dec.impact(x, n_references=2, seed=None), dec.impact(x, n_references=2, seed=3))
    assert not torch.equal(dec.impact(x, n_references=2), dec.impact(x, n_references=2, seed=0))


def test_two_impact_seeds_share_no_reference_draw(seeded):
    dec, x = seeded
    second_of_0 = 2 * dec.impact(x, n_references=2, seed=0).reshape(-1, 3) - dec.coefficients(x, seed=0).abs()
    assert not torch.allclose(second_of_0, dec.coefficients(x, seed=1).abs())  # seed + r: it was seed 1's draw
    drawn = [reference_seeds(s, 10) for s in range(-20, 20)]
    assert len({r for seeds in drawn for r in seeds}) == 400
    assert reference_seeds(7, 3) == reference_seeds(7, 5)[:3] and reference_seeds(7, 1) == [7]


def test_analysis_seeds_take_numpy_integers_and_refuse_bools_and_floats(seeded):
    dec, x = seeded
    assert torch.equal(dec.coefficients(x, seed=np.int64(2)), dec.coefficients(x, seed=2))
    assert torch.equal(dec.impact(x, n_references=2, seed=np.int32(2)), dec.impact(x, n_references=2, seed=2))
    assert dec.reconstruction_error(x, seed=np.uint8(2)) == dec.reconstruction_error(x, seed=2)
    for bad in (True, 1.5, 2.0, "3", 2**64):
        for call in (lambda: dec.coefficients(x, seed=bad), lambda: dec.impact(x, n_references=2, seed=bad),
                     lambda: dec.reconstruction_error(x, seed=bad)):
            with pytest.raises(ValueError, match=r"seed must be an integer .* or None for cfg\.seed \(3\)"):
                call()
