"""Review fixes: the single-subnetwork analyses take one index (a list or a one-element tensor
silently added an axis), ablation projects exactly onto the span of dependent subnetworks,
intervention_curve checks its deltas, and an overflowing delta or a delta given with
ablate=True is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.analysis.impact import output_derivative
from l3d_lens.interventions import check_intervention, weight_changes

from .helpers import tiny_lm, tokens

torch.set_num_threads(1)


def dec_of(model, sample="token", n_subnetworks=3, dtype="float64"):
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=n_subnetworks, rank=2, epochs=1,
                             batch_size=8, dtype=dtype, sample=sample,
                             position="all" if sample == "sequence" else -1)
    return l3d_lens.decompose(model, tokens(8, 6), cfg, progress=False)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_restored(model, before):
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- 1. one subnetwork index ------------------------------------------------------------------

@pytest.mark.parametrize("sample", ["sequence", "token"])
@pytest.mark.parametrize("subnetwork", [[1], torch.tensor([1]), np.array([1]), [0, 1], (1,), True, 1.0,
                                        torch.tensor(1.0), None, "1", 3, -1, np.int64(3)])
def test_single_subnetwork_analyses_refuse_anything_but_one_index(sample, subnetwork):
    """top_samples(x, [1]) in sequence mode returned a wrong table (position 0, context '0'),
    [0, 1] mixed two subnetworks' impacts into one ranking; token mode raised IndexError,
    intervention_curve an EinopsError and top_logits a RuntimeError."""
    model = tiny_lm("bridge")
    dec = dec_of(model, sample)
    x = tokens(4, 6, seed=5)
    before = params(model)
    calls = {"top_samples": lambda: dec.top_samples(x, subnetwork, k=3),
             "top_logits": lambda: dec.top_logits(x, subnetwork, k=3),
             "intervention_curve": lambda: dec.intervention_curve(x, subnetwork, [1.0]),
             "output_derivative": lambda: output_derivative(dec, x, subnetwork)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"subnetwork (must be one int in 0\.\.2|-?\d+ out of range; valid: 0\.\.2)"):
            call()
        assert_restored(model, before)


def test_single_subnetwork_analyses_take_integer_like_indices():
    dec = dec_of(tiny_lm("bridge"), "sequence")
    x = tokens(4, 6, seed=5)
    want = (dec.top_samples(x, 1, k=3), dec.top_logits(x, 1, k=3), dec.intervention_curve(x, 1, [0.5, 1.0]))
    for k in (np.int64(1), torch.tensor(1), torch.tensor([0.1, 0.7, 0.2]).argmax(), np.array(1)):
        assert dec.top_samples(x, k, k=3).equals(want[0])
        assert dec.top_logits(x, k, k=3).equals(want[1])
        assert dec.intervention_curve(x, k, [0.5, 1.0]).equals(want[2])


# --- 2. ablation of linearly dependent subnetworks --------------------------------------------

@pytest.mark.parametrize("second", ["independent", "duplicate", "minus_two", "zero"])
def test_ablation_is_the_exact_projection_for_dependent_subnetworks(second):
    """QR gave span{v0, v1} one basis column per subnetwork even when v1 = v0 or -2 v0, so the
    extra column pointed outside the span and the change was ~8% off the true projection."""
    adapter = make_adapter(tiny_lm("bridge"))
    names = ["blocks.0.attn.W_O", "blocks.1.attn.W_O"]
    g = torch.Generator().manual_seed(0)
    v0, v1, v2 = ({n: torch.randn(adapter.weight(n).shape, generator=g, dtype=torch.float64) for n in names}
                  for _ in range(3))
    v1 = {"independent": v1, "duplicate": v0, "minus_two": {n: -2 * v0[n] for n in names},
          "zero": {n: 0 * v0[n] for n in names}}[second]
    subs = {n: torch.stack([v0[n], v1[n], v2[n]]) for n in names}
    changes = weight_changes(adapter, subs, [0, 1], None)
    A = torch.cat([subs[n][[0, 1]].reshape(2, -1) for n in names], 1).T
    w = torch.cat([adapter.weight(n).double().reshape(-1) for n in names])
    true = -(A @ torch.linalg.pinv(A) @ w)
    got = torch.cat([changes[n].reshape(-1) for n in names])
    assert (got - true).norm() <= 1e-10 * true.norm()


@pytest.mark.parametrize("scale", [3.0, 1 / 3, 0.1])
def test_ablation_of_float32_multiples_is_the_projection_onto_the_one_direction(scale):
    """Float32 subnetworks v1 = scale * v0 differ from exact multiples by float32 rounding; with
    the tolerance of float64 (the projection's dtype) that noise was kept as a second direction
    and projected out at full weight (the change was 1.1-7x off); the tolerance is float32's."""
    adapter = make_adapter(tiny_lm("bridge"))
    names = ["blocks.0.attn.W_O", "blocks.1.attn.W_O"]
    g = torch.Generator().manual_seed(1)
    v0 = {n: torch.randn(adapter.weight(n).shape, generator=g) for n in names}
    subs = {n: torch.stack([v0[n], scale * v0[n]]) for n in names}
    assert all(s.dtype == torch.float32 for s in subs.values())
    changes = weight_changes(adapter, subs, [0, 1], None)
    a = torch.cat([v0[n].double().reshape(-1) for n in names])
    w = torch.cat([adapter.weight(n).double().reshape(-1) for n in names])
    true = -a * (a @ w) / (a @ a)
    got = torch.cat([changes[n].reshape(-1) for n in names])
    assert (got - true).norm() <= 1e-5 * true.norm()


# --- 3. intervention_curve's deltas -----------------------------------------------------------

@pytest.mark.parametrize("deltas, match", [
    ("12", r"deltas must be a non-empty list of finite numbers, got '12'"),
    ([True], r"deltas must be a non-empty list of finite numbers, got True in \[True\]"),
    ([1.0, float("nan")], r"got nan in \[1\.0, nan\]"),
    ([], r"got \[\]"),
    (True, r"got True"),
    (torch.tensor([1.0, float("inf")]), r"got tensor\(inf"),
    ([complex(1, 0)], r"got \(1\+0j\)"),
])
def test_intervention_curve_refuses_non_numbers(deltas, match):
    """'12' ran as [1.0, 2.0] and [True] as [1.0]."""
    dec = dec_of(tiny_lm("bridge"))
    with pytest.raises(ValueError, match=match):
        dec.intervention_curve(tokens(4, 6, seed=5), 0, deltas)


def test_intervention_curve_takes_a_single_number_like_intervene():
    """deltas=2.0 failed with "'float' object is not iterable"; intervene takes a single delta."""
    dec = dec_of(tiny_lm("bridge"))
    x = tokens(4, 6, seed=5)
    one = dec.intervention_curve(x, 0, [2.0])
    for deltas in (2.0, 2, np.float32(2.0), torch.tensor(2.0), torch.tensor([2.0])):
        assert dec.intervention_curve(x, 0, deltas).equals(one)
    assert list(dec.intervention_curve(x, 0, (np.float64(-1.0), torch.tensor(0.5)))["delta"]) == [-1.0, 0.5]


# --- 4. an overflowing delta, and a delta with ablate=True --------------------------------------

def test_a_delta_that_overflows_a_float32_weight_is_refused_before_touching_it():
    """delta=1e300 made the float32 weights inf (every logit NaN), silently."""
    model = tiny_lm("bridge", dtype=torch.float32)
    dec = dec_of(model, dtype="float32")
    before = params(model)
    with pytest.raises(ValueError, match=r"delta 1e\+300 makes blocks\.0\.attn\.\w+ non-finite in torch\.float32"):
        with dec.intervene(subnetwork=0, delta=1e300):
            pass
    assert_restored(model, before)
    with pytest.raises(ValueError, match=r"delta \[1e\+300, 1\.0\] makes blocks\.0\.attn\.\w+ non-finite"):
        with dec.intervene(subnetwork=[0, 1], delta=[1e300, 1.0]):
            pass
    assert_restored(model, before)
    with pytest.raises(ValueError, match=r"delta 1e\+300 makes blocks\.0\.attn\.\w+ non-finite in torch\.float32"):
        dec.intervention_curve(tokens(4, 6, seed=5), 0, [1.0, 1e300])
    with dec.intervene(subnetwork=0, delta=2.0), torch.no_grad():
        assert torch.isfinite(model(tokens(2, 6))).all()
    assert_restored(model, before)


def test_check_intervention_refuses_a_delta_with_ablate():
    """intervene(delta=1.0, ablate=True) ignored the delta; None marks a delta not given."""
    assert check_intervention(0, None, False, 3) == ([0], [1.0])
    assert check_intervention([0, 2], [2.0, -1.0], False, 3) == ([0, 2], [2.0, -1.0])
    assert check_intervention([0, 2], None, True, 3) == ([0, 2], None)
    for delta in (1.0, 0.0, [1.0, 2.0]):
        with pytest.raises(ValueError, match=r"delta=.* with ablate=True: ablation .* takes no delta; pass either "
                                             r"delta or ablate=True"):
            check_intervention([0, 1], delta, True, 3)
    with pytest.raises(ValueError, match=r"subnetwork 3 out of range"):
        check_intervention(3, None, True, 3)


def test_intervene_refuses_a_delta_with_ablate_and_defaults_to_one():
    """dec.intervene(delta=..., ablate=True) ran the ablation and dropped the delta silently."""
    model = tiny_lm("bridge", dtype=torch.float64)
    dec = dec_of(model)
    before = params(model)
    with pytest.raises(ValueError, match=r"delta=2.0 with ablate=True"):
        dec.intervene(subnetwork=[0, 1], delta=2.0, ablate=True)
    with pytest.raises(TypeError, match=r"ablate must be True or False"):
        dec.intervene(subnetwork=0, ablate="yes")
    assert_restored(model, before)
    x = tokens(2, 6)
    with torch.no_grad():
        with dec.intervene(subnetwork=1):
            default = model(x)
        with dec.intervene(subnetwork=1, delta=1.0):
            one = model(x)
    assert torch.equal(default, one)
    assert_restored(model, before)


def test_the_span_basis_keeps_distinct_subnetworks_of_many_weights():
    """The rank tolerance grew with the number of weights: from ~8e6 float32 weights it exceeded
    the largest singular value and ablation changed nothing; on 2e6 weights two unit vectors at
    cosine 0.97 lost their second direction. Neither depends on n now."""
    from l3d_lens.interventions import span_basis

    eps = torch.finfo(torch.float32).eps
    g = torch.Generator().manual_seed(0)
    one = torch.randn(10_000_000, 1, generator=g, dtype=torch.float64)
    assert span_basis(one, eps).shape == (10_000_000, 1)
    a = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    b = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    a, b = a / a.norm(), b - (b @ a) * a
    b = 0.97 * a + (1 - 0.97 ** 2) ** 0.5 * b / b.norm()
    pair = torch.stack([a, b], 1).float().double()  # float32 subnetworks, projected in float64
    basis = span_basis(pair, eps)
    assert basis.shape[1] == 2
    assert torch.allclose(basis @ (basis.T @ pair), pair, atol=1e-10)
    assert span_basis(torch.stack([a, 3 * a], 1).float().double(), eps).shape[1] == 1
