"""What the gradient engines refuse, where their shortcuts would give silently wrong numbers,
and what they must leave untouched: a layer the model calls twice on different inputs, a
model that reshapes its samples before a decomposed layer, weights tied into two modules, and
the model's own ``.grad`` (the exact engine used to leave it filled)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import l3d_lens

from .helpers import TinyMLP, tiny_lm, tokens

torch.set_num_threads(1)


def cfg(components, engine="fast", **kw):
    return l3d_lens.L3DConfig(components=components, n_subnetworks=2, rank=1, epochs=1, batch_size=8,
                              reference="zero", engine=engine, **kw)


class SharedLayer(nn.Module):
    """One Linear applied twice: its per-sample gradient is in_1 (x) dout_1 + in_2 (x) dout_2."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.rec, self.fc_out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc_out(torch.tanh(self.rec(torch.tanh(self.rec(self.fc_in(x))))))


class Flattening(nn.Module):
    """Reshapes [n, 5, 4] rows to [n * 5, 4] before its first Linear."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 3), nn.Linear(15, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x.reshape(-1, 4))).reshape(x.shape[0], -1))


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight matrix, as tied embeddings do."""

    def __init__(self):
        super().__init__()
        self.enc, self.mid, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.mid(self.enc(x))))


def test_fast_engine_refuses_a_layer_called_twice_on_different_inputs_exact_is_right():
    torch.manual_seed(0)
    model, x = SharedLayer(), torch.randn(16, 4)
    with pytest.raises(ValueError, match=r"rec:in: the model calls that layer more than once .* use engine='exact'"):
        l3d_lens.decompose(model, x, cfg(["rec"]), progress=False)
    dec = l3d_lens.decompose(model, x, cfg(["rec"], engine="exact"), progress=False)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def d(rec, row):  # the oracle: torch.func per-sample gradient of 0.5 ||f(x)||^2 (zero reference)
        return 0.5 * torch.func.functional_call(model, {**params, **rec}, (row[None],)).pow(2).sum()

    rec = {n: params[n] for n in ("rec.weight", "rec.bias")}
    g = torch.func.vmap(torch.func.grad(d), in_dims=(None, 0))(rec, x)
    expected = sum(v.flatten(1).pow(2).sum(1) for v in g.values())
    assert torch.allclose(dec.gradient_norms(x), expected, rtol=1e-5)  # float32: 1e-5 relative


def test_fast_engine_refuses_a_model_that_reshapes_its_samples_before_a_decomposed_layer():
    torch.manual_seed(0)
    model, x = Flattening(), torch.randn(16, 5, 4)
    # found before training, on the data's first two rows (check_shortcut), at the layer's output
    with pytest.raises(ValueError, match=r"batch axis first .* fc:out saw shape \(10, 3\) for a batch of 2"):
        l3d_lens.decompose(model, x, cfg(["fc"]), progress=False)
    dec = l3d_lens.decompose(model, x, cfg(["fc"], engine="exact"), progress=False)
    assert dec.coefficients(x).shape == (16, 2)


def test_tied_weights_are_refused_up_front_naming_every_use():
    torch.manual_seed(0)
    model = Tied()
    assert model.enc.weight is model.dec.weight
    for engine in ("fast", "exact"):
        with pytest.raises(ValueError, match=r"enc.weight is tied to other weights \(enc.weight, dec.weight: "
                                             r"one Parameter, or Parameters sharing its memory\).*Untie it"):
            l3d_lens.decompose(model, torch.randn(8, 4), cfg(["enc"], engine=engine), progress=False)
    l3d_lens.decompose(model, torch.randn(8, 4), cfg(["mid"]), progress=False)  # untied weights still go


def assert_untouched(model, before, dec, x):
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    assert all(torch.equal(before[n], p) and isinstance(p, nn.Parameter) for n, p in model.named_parameters())
    from l3d_lens.engine import per_sample_gradients
    grads = per_sample_gradients(dec._task, x, torch.Generator().manual_seed(0))
    assert not any(g.requires_grad for g in grads.values())


def test_exact_engine_leaves_no_grad_and_no_graph_on_a_module():
    model, x = TinyMLP(), torch.rand(8, 5, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert_untouched(model, before, l3d_lens.decompose(model, x, cfg(["fc1"], engine="exact"), progress=False), x)


def test_exact_engine_leaves_no_grad_and_no_graph_on_a_language_model(lm_kind):
    model, x = tiny_lm(lm_kind), tokens(4, 5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = cfg(["blocks.0.attn"], engine="exact", dtype="float64").replace(reference="uniform")
    assert_untouched(model, before, l3d_lens.decompose(model, x, c, progress=False), x)


def test_a_non_finite_activation_is_not_mistaken_for_a_shared_layer(lm_kind):
    """TL 3.x runs ln1 once each for q, k and v; with NaN in the residual the three copies are
    still the same activation, and the run must stop on the non-finite gradient instead."""
    model, x = tiny_lm(lm_kind), tokens(4, 5)
    with torch.no_grad():
        model.get_parameter(next(n for n, _ in model.named_parameters() if "embed" in n and "pos" not in n))[
            x[0, 0]] = float("nan")
    c = cfg(["blocks.0.attn.W_Q"], dtype="float64").replace(reference="uniform")
    with pytest.raises(FloatingPointError, match="non-finite"):
        l3d_lens.decompose(model, x, c, progress=False)
