"""Review fixes: attribution shares sum to 1 in float64 for float32 factors, neuron_attribution
names every weight it sums, and top_samples / intervention_curve check the data and the
impacts when ``impacts=`` is given."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import l3d_lens
from l3d_lens.analysis import neuron_attribution

from .helpers import tiny_lm, tokens

torch.set_num_threads(1)


def dec_of(model, x, **kw):
    base = dict(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=3, rank=2, epochs=1, batch_size=4)
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return l3d_lens.decompose(model, x, l3d_lens.L3DConfig(**base), progress=False)


@pytest.fixture(scope="module")
def token_dec():
    x = tokens(6, 5, seed=3)
    return dec_of(tiny_lm("bridge"), x, dtype="float64"), x


# --- 1. shares of float32 factors sum to 1 in float64 ------------------------------------------

def test_shares_of_float32_factors_sum_to_one_in_float64():
    """The total was taken in float32 before the float64 division: sums were off by ~1e-7."""
    dec = dec_of(tiny_lm("bridge", dtype=torch.float32), tokens(6, 5, seed=3))
    subs = dec.subnetworks()
    assert {v.dtype for v in subs.values()} == {torch.float32}
    df = dec.attribution()
    sums = torch.tensor(df.groupby("subnetwork").share.sum().tolist(), dtype=torch.float64)
    assert (sums - 1).abs().max() < 1e-12
    total = sum(v.double().pow(2).reshape(v.shape[0], -1).sum(1) for v in subs.values())
    name = "blocks.1.mlp.W_out"
    rows = df[df.weight == name].sort_values(["subnetwork", "neuron"]).share.tolist()
    want = (subs[name].double().pow(2).sum(-1) / total[:, None]).reshape(-1)
    torch.testing.assert_close(torch.tensor(rows, dtype=torch.float64), want, rtol=1e-13, atol=0)


# --- 2. neuron_attribution sums (and names) every weight with a neuron axis --------------------

def test_neuron_attribution_sums_and_names_every_neuron_weight():
    """A gated MLP's W_gate is summed too; the docstring named only W_in, b_in and W_out."""
    dec = dec_of(tiny_lm("bridge", gated=True), tokens(6, 5, seed=3), components=["blocks.0.mlp"], dtype="float64")
    df = dec.attribution()
    kinds = set(df[df.neuron.notna()].kind)
    assert {"W_in", "W_gate", "W_out"} <= kinds
    per = df[df.neuron.notna()].groupby(["subnetwork", "neuron"]).share.sum()
    got = dec.neuron_attribution().set_index(["subnetwork", "neuron"]).share
    assert np.allclose(got.loc[per.index].to_numpy(), per.to_numpy(), rtol=0, atol=1e-15)
    summed = neuron_attribution.__doc__.split(":")[0]
    assert all(kind in summed for kind in kinds), (kinds, summed)


# --- 3. impacts= : the data are checked, and the impacts are a finite real tensor -------------

def test_data_given_with_impacts_are_checked_as_without(token_dec):
    """Out-of-vocab tokens gave a raw IndexError in the curve and a table in top_samples."""
    dec, x = token_dec
    imp = torch.rand(6, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for data in (x + 100, x[0]):
        for impacts in (imp, None):
            with pytest.raises(ValueError, match=r"token ids outside|token ids of shape \[n, seq\]"):
                dec.intervention_curve(data, 0, [1.0], impacts=impacts)
            with pytest.raises(ValueError, match=r"token ids outside|token ids of shape \[n, seq\]"):
                dec.top_samples(data, 0, k=2, impacts=impacts)
    with pytest.raises(TypeError, match="must hold token ids"):
        dec.top_samples(x.double(), 0, k=2, impacts=imp)
    assert len(dec.top_samples(x, 0, k=2, impacts=imp)) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_impacts_that_are_not_finite_are_refused(token_dec, bad):
    """A NaN sorted first: top_samples listed it, and the curve ranked it top."""
    dec, x = token_dec
    imp = dec.impact(x, n_references=1)
    imp[2, 3, 0] = bad
    with pytest.raises(ValueError, match=r"impacts has 1 NaN or infinite entries"):
        dec.top_samples(x, 0, k=2, impacts=imp)
    with pytest.raises(ValueError, match=r"impacts has 1 NaN or infinite entries"):
        dec.intervention_curve(x, 0, [1.0], impacts=imp)


def test_impacts_that_are_not_a_real_tensor_are_refused(token_dec):
    """A list gave AttributeError: 'list' object has no attribute 'shape'; they are refused,
    not converted."""
    dec, x = token_dec
    imp = dec.impact(x, n_references=1)
    for bad in (imp.tolist(), imp.numpy()):
        for call in (lambda: dec.top_samples(x, 0, k=2, impacts=bad),
                     lambda: dec.intervention_curve(x, 0, [1.0], impacts=bad)):
            with pytest.raises(TypeError, match=r"impacts must be a tensor \(dec.impact\(data\).*got (list|ndarray)"):
                call()
    for bad in (imp.to(torch.complex128), imp > 0):
        with pytest.raises(TypeError, match=r"impacts must be a real tensor .*got dtype torch\.(complex128|bool)"):
            dec.top_samples(x, 0, k=2, impacts=bad)
    cols = ["sequence", "position"]  # a float32 tensor is a real tensor too
    assert dec.top_samples(x, 0, k=2, impacts=imp)[cols].equals(dec.top_samples(x, 0, k=2, impacts=imp.float())[cols])


@pytest.mark.parametrize("call", [
    lambda dec: dec.head_attribution(as_tensor="no"),
    lambda dec: dec.head_effects(as_tensor=1),
    lambda dec: dec.head_effects(share="yes"),
])
def test_a_flag_that_is_not_a_bool_is_refused(token_dec, call):
    """``as_tensor="no"`` returned a tensor: any truthy value was taken as True."""
    with pytest.raises(TypeError, match=r"(as_tensor|share) must be True or False, got"):
        call(token_dec[0])
