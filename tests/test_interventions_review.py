"""Interventions on tied weights (two sites, one Parameter) and integer-like / numpy / 0-d
tensor subnetwork indices and deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.interventions import check_deltas, check_subnetworks, edit_weights

from .helpers import tiny_lm, tokens

torch.set_num_threads(1)


def tied_bridge():
    """A tiny TransformerBridge whose unembedding is its embedding's Parameter (as in Hugging
    Face GPT-2): W_E [d_vocab, d_model] and W_U [d_model, d_vocab] are two layouts of it."""
    model = tiny_lm("bridge")
    model.get_submodule("unembed._original_component").weight = model.get_submodule("embed._original_component").weight
    adapter = make_adapter(model)
    assert adapter.native_parameter("embed.W_E") is adapter.native_parameter("unembed.W_U")
    return model, adapter


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def assert_restored(model, before):
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert torch.equal(p, before[n]), f"{n} not restored bit-exactly"


def test_edit_weights_tied_parameter_sums_changes_and_restores_exactly():
    model, adapter = tied_bridge()
    param = adapter.native_parameter("embed.W_E")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(adapter.weight("embed.W_E").shape, generator=g, dtype=torch.float64)
    b = torch.randn(adapter.weight("unembed.W_U").shape, generator=g, dtype=torch.float64)
    w0 = param.detach().clone()
    before = snapshot(model)
    with edit_weights(adapter, {"embed.W_E": a, "unembed.W_U": b}):
        assert torch.allclose(param, w0 + a + b.T, atol=1e-12)  # both edits, each in its own layout
    assert_restored(model, before)
    for exc in (RuntimeError("inside"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with edit_weights(adapter, {"embed.W_E": a, "unembed.W_U": b}):
                raise exc
        assert_restored(model, before)


def test_intervene_refuses_a_model_with_tied_weights_before_touching_it():
    """decompose refuses tied weights, and intervene(model) refuses to apply a decomposition of
    an untied model to one whose W_E and W_U are one Parameter: a move along W_U would also move
    W_E (edit_weights itself still restores such a model exactly: the test above)."""
    cfg = l3d_lens.L3DConfig(components=["embed", "unembed"], n_subnetworks=3, rank=2, epochs=1, batch_size=8,
                             dtype="float64")
    dec = l3d_lens.decompose(tiny_lm("bridge"), tokens(8, 6), cfg, progress=False)
    model, _ = tied_bridge()
    before = snapshot(model)
    for kw in (dict(delta=3.0), dict(ablate=True)):
        with pytest.raises(ValueError, match=r"embed.W_E is tied to other weights"):
            with dec.intervene(model, subnetwork=0, **kw):
                pass
        assert_restored(model, before)


@pytest.mark.parametrize("subnetwork, expected", [
    (np.int64(2), [2]),
    (torch.tensor(1), [1]),
    (torch.tensor([0.1, 0.7, 0.2]).argmax(), [1]),
    ([np.int32(0), torch.tensor(2)], [0, 2]),
    (np.array([2, 0]), [2, 0]),
    (torch.tensor([1, 2]), [1, 2]),
])
def test_check_subnetworks_accepts_integer_like(subnetwork, expected):
    ks = check_subnetworks(subnetwork, 3)
    assert ks == expected and all(type(k) is int for k in ks)


@pytest.mark.parametrize("subnetwork", [True, [0, True], torch.tensor(True), np.True_, 1.5, torch.tensor(1.0), [],
                                        "0", None])
def test_check_subnetworks_refuses_non_indices(subnetwork):
    with pytest.raises(ValueError, match=r"subnetwork must be an int or a non-empty list of ints in 0\.\.2, got "):
        check_subnetworks(subnetwork, 3)


@pytest.mark.parametrize("delta, n, expected", [
    (np.float32(0.5), 2, [0.5, 0.5]),
    (np.int64(3), 1, [3.0]),
    (torch.tensor(-2.0), 1, [-2.0]),
    ([np.float64(1.5), torch.tensor(2)], 2, [1.5, 2.0]),
    (torch.tensor([1.0, -1.0]), 2, [1.0, -1.0]),
])
def test_check_deltas_accepts_numbers(delta, n, expected):
    ds = check_deltas(delta, n)
    assert ds == expected and all(type(d) is float for d in ds)


@pytest.mark.parametrize("delta, match", [
    (True, r"delta must be a finite number or a list of 1 \(one per subnetwork\), got True"),
    (torch.tensor(True), r"delta must be a finite number or a list of 1 \(one per subnetwork\), got tensor\(True\)"),
    ("1", r"delta must be a finite number or a list of 1 \(one per subnetwork\), got '1'"),
    ([True], r"delta must be a finite number, got True"),
    ([np.True_], r"delta must be a finite number, got "),
    (torch.tensor(float("inf")), r"delta must be a finite number, got inf"),
    ([np.float64("nan")], r"delta must be a finite number, got "),
])
def test_check_deltas_refuses_non_numbers(delta, match):
    with pytest.raises(ValueError, match=match):
        check_deltas(delta, 1)


def test_intervene_takes_argmax_and_numpy_inputs():
    model = tiny_lm("bridge")
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=3, rank=2, epochs=1, batch_size=8,
                             dtype="float64")
    dec = l3d_lens.decompose(model, tokens(8, 6), cfg, progress=False)
    adapter = make_adapter(model)
    k = dec.fraction_active.argmax()
    w0 = adapter.weight("blocks.0.attn.W_Q").clone()
    v = dec.subnetworks()["blocks.0.attn.W_Q"][int(k)]
    with dec.intervene(subnetwork=k, delta=np.float32(2.0)):
        assert torch.allclose(adapter.weight("blocks.0.attn.W_Q"), w0 + 2.0 * v, atol=1e-6)
    assert torch.equal(adapter.weight("blocks.0.attn.W_Q"), w0)
    with pytest.raises(ValueError, match=r"subnetwork must be an int or a non-empty list of ints in 0\.\.2, got True"):
        with dec.intervene(subnetwork=True):
            pass
