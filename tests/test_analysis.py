"""Impact, top samples, forward-mode logit effects and interventions."""

from __future__ import annotations

import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.interventions import perturbed_forward, weight_changes

from .helpers import TinyMLP, tiny_lm, tokens


def small_dec(model, **kw):
    base = dict(components=["blocks.0.attn", "blocks.1.mlp.W_in"], n_subnetworks=3, rank=2, epochs=1, batch_size=8,
                dtype="float64")
    base.update(kw)
    return l3d_lens.decompose(model, tokens(8, 6), l3d_lens.L3DConfig(**base), progress=False)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_intervene_moves_weights_and_restores_exactly(lm_kind):
    model = tiny_lm(lm_kind)
    dec = small_dec(model)
    adapter = make_adapter(model)
    w0 = adapter.weight("blocks.0.attn.W_Q").clone()
    before = params(model)
    v = dec.subnetworks()["blocks.0.attn.W_Q"]
    with dec.intervene(subnetwork=[1, 2], delta=[2.0, -0.5]):
        inside = adapter.weight("blocks.0.attn.W_Q")
        assert torch.allclose(inside, w0 + 2.0 * v[1] - 0.5 * v[2], atol=1e-12)
        if hasattr(model.blocks[0].attn, "W_Q"):  # TransformerLens' own view sees the change too
            assert torch.allclose(model.blocks[0].attn.W_Q, inside)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="inside"):
        with dec.intervene(subnetwork=0, delta=5.0):
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ablation_projects_subnetworks_out(lm_kind):
    model = tiny_lm(lm_kind)
    dec = small_dec(model)
    adapter = make_adapter(model)
    subs = dec.subnetworks()
    with dec.intervene(subnetwork=[0, 2], ablate=True):
        for k in (0, 2):
            dot = sum((adapter.weight(n).double() * subs[n][k].double()).sum() for n in subs)
            assert abs(dot.item()) < 1e-9
    before_dot = sum((adapter.weight(n) * subs[n][0]).sum() for n in subs)
    assert abs(before_dot.item()) > 1e-6  # the projection did something


@pytest.mark.parametrize("kwargs, match", [
    (dict(subnetwork=3), r"subnetwork 3 out of range; valid: 0..2"),
    (dict(subnetwork=[0, 0]), "repeats an index"),
    (dict(subnetwork=0, delta=float("nan")), "delta must be a finite number"),
    (dict(subnetwork=[0, 1], delta=[1.0]), "1 deltas for 2 subnetworks"),
])
def test_intervene_rejects_bad_input(kwargs, match):
    model = tiny_lm("bridge")
    dec = small_dec(model)
    before = params(model)
    with pytest.raises(ValueError, match=match):
        with dec.intervene(**kwargs):
            pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_output_derivative_matches_finite_difference(lm_kind):
    from l3d_lens.analysis.impact import output_derivative

    model = tiny_lm(lm_kind)
    dec = small_dec(model)
    x = tokens(3, 6, seed=4)
    jvp = output_derivative(dec, x, 1)
    adapter = make_adapter(model)
    eps = 1e-5
    plus = perturbed_forward(adapter, weight_changes(adapter, dec.subnetworks(), [1], [eps]), x)
    minus = perturbed_forward(adapter, weight_changes(adapter, dec.subnetworks(), [1], [-eps]), x)
    fd = (plus - minus) / (2 * eps)
    assert ((jvp - fd).abs().max() / fd.abs().max()).item() < 1e-4
    top = dec.top_logits(x, 1, k=4)
    assert len(top) == 4 and top["mean_abs_dlogit"].is_monotonic_decreasing
    assert top["mean_abs_dlogit"].iloc[0] == pytest.approx(jvp.abs().reshape(-1, jvp.shape[-1]).mean(0).max().item())


def test_impact_and_top_samples(lm_kind):
    model = tiny_lm(lm_kind)
    dec = small_dec(model)
    x = tokens(5, 6, seed=4)
    imp = dec.impact(x, n_references=3)
    assert imp.shape == (5, 6, 3) and (imp >= 0).all()
    one = dec.impact(x, n_references=1)
    assert torch.allclose(one.reshape(-1, 3), dec.coefficients(x, seed=0).abs())
    top = dec.top_samples(x, 2, k=4, impacts=imp)
    assert top["impact"].is_monotonic_decreasing and len(top) == 4
    best = top.iloc[0]
    assert best["impact"] == pytest.approx(imp[best["sequence"], best["position"], 2].item())
    assert best["context"].split()[-1] == str(x[best["sequence"], best["position"]].item())


def test_intervention_curve_on_a_module():
    model = TinyMLP()
    x = torch.rand(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dec = l3d_lens.decompose(model, x, l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=2, rank=1, epochs=2,
                                                           dtype="float64"), progress=False)
    curve = dec.intervention_curve(x, 0, deltas=[-1.0, 0.5], top_fraction=0.25)
    assert list(curve["delta"]) == [-1.0, 0.5]
    imp = dec.impact(x)[:, 0]
    top = torch.argsort(imp, descending=True)[:10]
    adapter = make_adapter(model)
    after = perturbed_forward(adapter, weight_changes(adapter, dec.subnetworks(), [0], [-1.0]), x)
    change = (after - model(x)).pow(2).sum(-1).detach()
    mask = torch.zeros(40, dtype=torch.bool)
    mask[top] = True
    assert curve["change_top"][0] == pytest.approx(change[mask].mean().item())
    assert curve["selectivity"][0] == pytest.approx(change[mask].mean().item() / change[~mask].mean().item())
    with pytest.raises(ValueError, match="finite numbers"):
        dec.intervention_curve(x, 0, deltas=[float("inf")])
