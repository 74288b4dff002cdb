"""The effect readout (l3d_lens.analysis.effects) against autograd through hooks.

Its claim: for a direction v in parameter space, <v|u, W0|u> over a unit's output weights is
the directional derivative of the divergence when the unit's output is scaled, if v is the
sample's gradient. So, with the per-sample gradients (torch.func oracle, tests/reference.py)
used as "subnetworks", every unit's effect must equal d D_i / d a with the unit's output
scaled by (1 + a) through a hook (hook_z for a head, hook_post for a neuron, hook_mlp_out for
an MLP layer). Both head routes (W_O; W_V with b_V) must agree. Tolerance 1e-8 relative
(float64; the TL 4 bridge computes some ops in float32 internally).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.analysis.effects import combined, scaling_effects, weighted

from .helpers import tiny_lm, tokens
from .reference import per_sample_grads

LAYER = 1
NAMES = [f"blocks.{LAYER}.attn.W_V", f"blocks.{LAYER}.attn.b_V", f"blocks.{LAYER}.attn.W_O",
         f"blocks.{LAYER}.mlp.W_out", f"blocks.{LAYER}.mlp.b_out"]


def scaled_derivative(model, x, ref, hook_name, index):
    """d/da of KL(ref || model(x)) at the last position with hook ``hook_name`` scaled by
    (1 + a) on ``index`` (a head or neuron; None = the whole activation), one per sample."""
    out = []
    with torch.no_grad():
        ref_logp = model(ref)[:, -1].log_softmax(-1)
    for i in range(x.shape[0]):
        a = torch.zeros((), dtype=torch.float64, requires_grad=True)

        def hook(act, hook):
            scale = torch.ones(act.shape[2:] if index is not None else (), dtype=act.dtype)
            if index is not None:
                scale = scale.clone()
                scale[index] = 1 + a
            else:
                scale = scale * (1 + a)
            return act * scale

        with model.hooks(fwd_hooks=[(hook_name, hook)]):
            logp = model(x[i : i + 1])[0, -1].log_softmax(-1)
        div = F.kl_div(logp, ref_logp[i], log_target=True, reduction="sum")
        out.append(torch.autograd.grad(div, a)[0].detach())
    return torch.stack(out)


@pytest.fixture
def setup(lm_kind):
    model = tiny_lm(lm_kind)
    x, ref = tokens(4, 5, seed=1), tokens(4, 5, seed=2)
    grads = per_sample_grads(model, NAMES, x, ref, "sequence")
    adapter = make_adapter(model)
    weights = {n: adapter.weight(n) for n in NAMES}
    return model, x, ref, grads, adapter, weights


def test_effects_are_output_scaling_derivatives(setup):
    model, x, ref, grads, adapter, weights = setup
    e = scaling_effects(grads, weights, adapter.sites, adapter.n_layers, adapter.n_heads, adapter.d_mlp)
    for h in range(adapter.n_heads):
        want = scaled_derivative(model, x, ref, f"blocks.{LAYER}.attn.hook_z", (h, slice(None)))
        assert e["heads"][:, LAYER, h] == pytest.approx(want, rel=1e-8, abs=1e-10)
    for n in (0, 5, adapter.d_mlp - 1):
        want = scaled_derivative(model, x, ref, f"blocks.{LAYER}.mlp.hook_post", n)
        assert e["neurons"][:, LAYER, n] == pytest.approx(want, rel=1e-8, abs=1e-10)
    want = scaled_derivative(model, x, ref, f"blocks.{LAYER}.hook_mlp_out", None)
    assert e["mlp"][:, LAYER] == pytest.approx(want, rel=1e-8, abs=1e-10)
    assert torch.isnan(e["heads"][:, 0]).all() and torch.isnan(e["mlp"][:, 0]).all()  # layer 0 not given


def test_head_routes_agree_and_either_suffices(setup):
    _, _, _, grads, adapter, weights = setup
    args = (adapter.sites, adapter.n_layers, adapter.n_heads, adapter.d_mlp)
    both = scaling_effects(grads, weights, *args)["heads"][:, LAYER]
    only_o = scaling_effects({n: grads[n] for n in NAMES[2:3]}, weights, *args)["heads"][:, LAYER]
    only_v = scaling_effects({n: grads[n] for n in NAMES[:2]}, weights, *args)["heads"][:, LAYER]
    assert only_o == pytest.approx(both, rel=1e-8) and only_v == pytest.approx(both, rel=1e-8)
    bias_only = scaling_effects({NAMES[1]: grads[NAMES[1]]}, weights, *args)["heads"]
    assert torch.isnan(bias_only).all()  # b_V alone is not a route to the head's output


def test_weighted_and_combined():
    e = torch.tensor([[1.0, -2.0, float("nan")], [0.5, 1.0, float("nan")]], dtype=torch.float64)
    c = torch.tensor([[2.0, 0.0], [0.0, -4.0], [1.0, 1.0]], dtype=torch.float64)
    assert weighted(e, c)[:, :2].tolist() == [[1.0, 2.0], [0.5 * 5 / 3, 5 / 3]]
    # per sample: [2, -4] ; [-2, -4] ; [1.5, -1]
    assert combined(e, c)[:2].tolist() == pytest.approx([(2 + 2 + 1.5) / 3, (4 + 4 + 1) / 3])
    assert torch.isnan(combined(e, c)[2])


def test_decomposition_head_and_neuron_effects(lm_kind):
    model = tiny_lm(lm_kind)
    x = tokens(6, 5, seed=1)
    cfg = l3d_lens.L3DConfig(components=["blocks.1.attn.W_O", "blocks.1.mlp.W_out", "blocks.0.attn.W_Q"],
                             n_subnetworks=3, rank=2, epochs=1, dtype="float64", sample="sequence")
    dec = l3d_lens.decompose(model, x, cfg, progress=False)
    raw = dec.head_effects(as_tensor=True)
    assert raw.shape == (3, 2, model.cfg.n_heads)
    assert torch.isnan(raw[:, 0]).all() and (raw[:, 1] >= 0).all()  # layer 0: only W_Q, no output route
    on_data = dec.head_effects(x, seed=0, as_tensor=True)
    scale = dec.coefficients(x, seed=0).abs().double().mean(0)
    assert on_data[:, 1] == pytest.approx(raw[:, 1] * scale[:, None], rel=1e-12)
    share = dec.head_effects(as_tensor=True, share=True)
    assert share.flatten(1).sum(1) == pytest.approx(torch.ones(3, dtype=torch.float64), rel=1e-12)
    assert share[:, 1] == pytest.approx(raw[:, 1] / raw[:, 1].sum(1, keepdim=True), rel=1e-12)
    assert (share[:, 0] == 0).all()  # NaN (no output route) counts as no effect
    df = dec.head_effects()
    assert list(df.columns) == ["subnetwork", "layer", "head", "effect"] and len(df) == 3 * 2 * model.cfg.n_heads
    neurons = dec.neuron_effects()
    assert set(neurons["layer"]) == {1} and len(neurons) == 3 * model.cfg.d_mlp
