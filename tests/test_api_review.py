"""Review fixes from using the Decomposition API across configurations: reconstruction_error's
top_k unchecked (0, negative and tiny all kept one coefficient) and a ZeroDivisionError where
every gradient is zero; a single row against a mean reference trained on zero gradients; the
analyses ran float data of another dtype into the model (a deep RuntimeError); top_logits'
positions unchecked; n_references took True and refused numpy ints; intervene on a model of
another architecture raised a KeyError; a float64 run's uniform and mean references used a
float32 log."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import l3d_lens
from l3d_lens.references import references

from .helpers import TinyMLP, tiny_lm, tokens

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mlp_dec():
    model = TinyMLP(dtype=torch.float32)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=1, batch_size=8,
                             divergence="mse", reference="mean")
    return model, x, l3d_lens.decompose(model, x, cfg, progress=False)


@pytest.mark.parametrize("top_k", [0, -3, 1.5, float("nan"), "0.1"])
def test_reconstruction_error_checks_top_k(mlp_dec, top_k):
    _, x, dec = mlp_dec
    with pytest.raises(ValueError, match=r"top_k must be a fraction in \(0, 1\]"):
        dec.reconstruction_error(x, top_k=top_k)


def test_reconstruction_error_of_zero_gradients_says_so():
    model = TinyMLP(dtype=torch.float32)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components=["fc1"], n_subnetworks=2, rank=1, epochs=1, batch_size=8, divergence="mse",
                             reference="paired")
    dec = l3d_lens.decompose(model, x, cfg, reference=x + 1, progress=False)
    with pytest.raises(ValueError, match="every per-sample gradient of these data is zero"):
        dec.reconstruction_error(x, reference=x)  # each output is its own reference


def test_a_single_row_against_the_mean_is_refused(mlp_dec):
    model, x, dec = mlp_dec
    for run in (lambda: dec.coefficients(x[:1]),
                lambda: l3d_lens.decompose(model, x[:1], dec.cfg, progress=False)):
        with pytest.raises(ValueError, match=r"the data has 1 row\(s\), fewer than the 2 a batch needs"):
            run()
    assert dec.coefficients(x[:2]).shape == (2, 3)


def test_a_single_batch_of_one_row_in_a_list_is_refused(mlp_dec):
    _, x, dec = mlp_dec
    with pytest.raises(ValueError, match=r"the data has 1 row\(s\)"):
        dec.coefficients([x[:1]])


def test_the_analyses_name_a_dtype_mismatch(mlp_dec):
    _, x, dec = mlp_dec
    for run in (lambda: dec.coefficients(x.double()), lambda: dec.intervention_curve(x.double(), 0, [1.0]),
                lambda: dec.top_logits(x.double(), 0)):
        with pytest.raises(TypeError, match=r"data is torch.float64 but the model's parameters are torch.float32"):
            run()


@pytest.fixture(scope="module")
def lm_dec():
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=3, rank=1, epochs=1, batch_size=8)
    return l3d_lens.decompose(tiny_lm("bridge"), tokens(8, 6), cfg, progress=False)


@pytest.mark.parametrize("positions", [[], [6], [-7], "3", [1.5]])
def test_top_logits_checks_positions(lm_dec, positions):
    with pytest.raises(ValueError, match=r"positions must be an int or a non-empty list of ints in -6\.\.5"):
        lm_dec.top_logits(tokens(4, 6, seed=1), 0, positions=positions)


def test_top_logits_takes_one_position_as_an_int(lm_dec):
    x = tokens(4, 6, seed=1)
    assert lm_dec.top_logits(x, 0, positions=3).equals(lm_dec.top_logits(x, 0, positions=[3]))


def test_positions_on_a_plain_module_is_refused(mlp_dec):
    _, x, dec = mlp_dec
    with pytest.raises(ValueError, match=r"positions= picks along the axis after the samples', which these data "
                                         r"\[n, d\] \(shape \(16, 5\)\) do not have"):
        dec.top_logits(x, 0, positions=[0])


def test_n_references_takes_numpy_ints_and_refuses_bools(lm_dec):
    x = tokens(4, 6, seed=1)
    assert torch.equal(lm_dec.impact(x, n_references=np.int64(2)), lm_dec.impact(x, n_references=2))
    with pytest.raises(ValueError, match="n_references must be an int >= 1, got True"):
        lm_dec.impact(x, n_references=True)


def test_intervene_on_another_architecture_says_so(lm_dec):
    with pytest.raises(ValueError, match=r"model has no blocks\.0\.attn\.W_Q"):
        with lm_dec.intervene(nn.Linear(3, 3), 0, 1.0):
            pass


@pytest.mark.parametrize("mode", ["uniform", "mean"])
def test_float64_references_take_log_in_float64(mode):
    logp = torch.randn(5, 7, dtype=torch.float64).log_softmax(-1)
    ref = references(logp, mode, "kl", None)
    want = torch.full_like(logp, -math.log(7)) if mode == "uniform" else \
        (torch.logsumexp(logp, 0) - math.log(5)).expand_as(logp)
    assert torch.allclose(ref, want, rtol=0, atol=1e-15)


def test_a_batch_size_below_what_the_reference_needs_is_refused():
    """batch_size=1 against the mean trained every batch on its own row: zero gradients."""
    model = TinyMLP(dtype=torch.float32)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    cfg = l3d_lens.L3DConfig(components=["fc1"], n_subnetworks=2, rank=1, epochs=1, batch_size=1, divergence="mse",
                             reference="mean")
    with pytest.raises(ValueError, match=r"batch_size=1 with reference='mean' in sequence mode: a batch needs 2"):
        l3d_lens.decompose(model, x, cfg, progress=False)


def test_a_short_first_batch_joins_the_next(mlp_dec):
    _, x, dec = mlp_dec
    joined = dec.coefficients([x[:1], x[1:9]])
    assert torch.equal(joined, dec.coefficients([x[:9]]))
    assert joined[0].abs().sum() > 0  # against the mean of 9 rows, not of itself


def test_a_stream_of_short_batches_gathers_to_min_batch_not_to_one_batch(mlp_dec):
    """Every batch short used to chain into one batch of the whole stream (one step per epoch)."""
    model, x, dec = mlp_dec
    stream = [x[i:i + 1] for i in range(8)]
    pairs = dec.coefficients(stream)
    assert torch.equal(pairs, torch.cat([dec.coefficients(x[i:i + 2]) for i in range(0, 8, 2)]))
    cfg = dec.cfg.replace(batch_size=1, epochs=1)  # an iterable's batches are its own: batch_size is unused
    run = l3d_lens.decompose(model, stream, cfg, progress=False)
    assert run.history[-1]["steps"] == 4


def test_a_short_tail_joins_the_last_batch(mlp_dec):
    _, x, dec = mlp_dec
    assert torch.equal(dec.coefficients([x[:4], x[4:5]]), dec.coefficients([x[:5]]))
