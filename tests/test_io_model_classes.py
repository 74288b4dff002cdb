"""A saved decomposition checks the model's other parameters in TransformerLens names and layout,
so it loads into the same weights as another model class (HookedTransformer <-> TransformerBridge,
one TransformerLens generation to the next); saves of earlier l3d_lens, which hashed them by the
model's own names, still load into their own class and say why they refuse another."""

from __future__ import annotations

import json

import pytest
import torch

from l3d_lens import Decomposition, L3DConfig, decompose
from l3d_lens.zoo import induction

from .helpers import HAS_HOOKED

pytestmark = pytest.mark.skipif(not HAS_HOOKED, reason="needs both model classes (TransformerLens 3.x)")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = induction.load("hooked")
    x = induction.repeated_sequences(16, seed=0)
    cfg = L3DConfig(components=["blocks.1.attn"], n_subnetworks=3, rank=2, epochs=1, include_biases=False, seed=0)
    dec = decompose(model, x, cfg, progress=False)
    folder = tmp_path_factory.mktemp("dec")
    dec.save(folder)
    return folder, dec, x


def test_a_hooked_transformers_decomposition_loads_into_a_bridge_of_the_same_weights(saved):
    folder, dec, x = saved
    bridge = induction.load("bridge")  # no b_U (the hooked model's is zeros), other parameter names
    loaded = Decomposition.load(folder, bridge)
    assert all(torch.equal(loaded.factors[k], dec.factors[k]) for k in dec.factors)
    torch.testing.assert_close(loaded.coefficients(x[:2]), dec.coefficients(x[:2]), rtol=1e-5, atol=1e-7)


def test_a_bridge_whose_other_parameters_differ_is_still_refused(saved):
    folder, _, _ = saved
    bridge = induction.load("bridge")
    with torch.no_grad():  # layer 0's attention is not decomposed, but shapes every gradient
        next(p for n, p in bridge.named_parameters() if n.startswith("layers.0.") and p.dim() == 2).mul_(1.5)
    with pytest.raises(ValueError, match=r"parameters outside the decomposed weights differ.*check_weights=False"):
        Decomposition.load(folder, bridge)


def test_a_nonzero_bias_is_not_taken_for_a_missing_one(saved):
    folder, _, _ = saved
    model = induction.load("hooked")
    with torch.no_grad():
        model.unembed.b_U.add_(0.01)
    with pytest.raises(ValueError, match="parameters outside the decomposed weights differ"):
        Decomposition.load(folder, model)


def test_an_earlier_save_loads_into_its_own_class_and_names_the_classes_when_refusing_another(saved, tmp_path):
    folder, dec, _ = saved
    old = tmp_path / "old"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    meta = json.loads((old / "decomposition.json").read_text())
    del meta["fingerprint"]["others_tl"]  # as l3d_lens wrote it before this fingerprint
    (old / "decomposition.json").write_text(json.dumps(meta))
    loaded = Decomposition.load(old, induction.load("hooked"))
    assert all(torch.equal(loaded.factors[k], dec.factors[k]) for k in dec.factors)
    with pytest.raises(ValueError, match=r"saved from a hooked_transformer model .* this is a transformer_bridge"):
        Decomposition.load(old, induction.load("bridge"))
