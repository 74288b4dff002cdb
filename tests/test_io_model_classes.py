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

from .helpers import HAS_HOOKED, as_earlier_save

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
    as_earlier_save(old)
    loaded = Decomposition.load(old, induction.load("hooked"))
    assert all(torch.equal(loaded.factors[k], dec.factors[k]) for k in dec.factors)
    with pytest.raises(ValueError, match=r"saved from a hooked_transformer model .* this is a transformer_bridge"):
        Decomposition.load(old, induction.load("bridge"))


def test_a_gpt2_decomposition_crosses_between_hooked_and_bridge(tmp_path):
    """A GPT-2 bridge keeps the fused qkv weight as a parameter of its own, of which W_Q, W_K and
    W_V are views: it is covered by them, so a HookedTransformer of the same weights matches."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from .helpers import write_tiny_gpt2

    folder = write_tiny_gpt2(tmp_path / "gpt2", model=True)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, dtype=torch.float32,
                                                 tokenizer=AutoTokenizer.from_pretrained(folder))
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=128, d_vocab=257, n_ctx=64,
                                  act_fn="gelu_new", normalization_type="LN", default_prepend_bos=False)
    hooked = HookedTransformer(cfg)
    hooked.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    hooked.eval()
    x = torch.randint(0, 256, (6, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hooked(x), bridge(x))  # the same function, bit for bit
    for components in (["blocks.1.attn"], ["blocks.0.mlp"]):
        dec = decompose(hooked, x, L3DConfig(components=components, n_subnetworks=2, rank=1, epochs=1, seed=0,
                                             include_biases=False), progress=False)
        dec.save(tmp_path / components[0])
        loaded = Decomposition.load(tmp_path / components[0], bridge)
        torch.testing.assert_close(loaded.coefficients(x[:2]), dec.coefficients(x[:2]), rtol=1e-5, atol=1e-7)
        with torch.no_grad():  # the fused qkv of layer 0 is still checked, through W_Q/W_K/W_V
            qkv = next(p for n, p in bridge.named_parameters() if "h.0" in n and "qkv" in n and p.dim() == 2)
            qkv.mul_(2)
        try:
            if components == ["blocks.1.attn"]:
                with pytest.raises(ValueError, match="parameters outside the decomposed weights differ"):
                    Decomposition.load(tmp_path / components[0], bridge)
        finally:
            with torch.no_grad():
                qkv.div_(2)


def test_an_earlier_save_whose_selection_now_gives_more_weights_loads_as_computed(tmp_path):
    """K and V of a HookedTransformer with as many key/value heads as query heads were not
    decomposed before 0464d22: a save of ``blocks.0.attn`` from then covers Q and O only, and
    loads with those, with a warning, instead of being refused."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=20,
                                                      n_ctx=8, attn_only=True, n_key_value_heads=2)).eval()
    x = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(0))
    cfg = L3DConfig(components=["blocks.0.attn.W_Q", "blocks.0.attn.W_O"], n_subnetworks=2, rank=1, epochs=1, seed=0,
                    include_biases=False)
    dec = decompose(model, x, cfg, progress=False)
    dec.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "decomposition.json").read_text())
    meta["config"]["components"] = ["blocks.0.attn"]  # as the earlier l3d_lens saved it: its selection gave Q and O
    (tmp_path / "d" / "decomposition.json").write_text(json.dumps(meta))
    as_earlier_save(tmp_path / "d")
    with pytest.warns(UserWarning, match=r"also select \['blocks.0.attn.W_K', 'blocks.0.attn.W_V'\].*computed on"):
        loaded = Decomposition.load(tmp_path / "d", model)
    assert loaded.weight_names == ["blocks.0.attn.W_Q", "blocks.0.attn.W_O"]
    torch.testing.assert_close(loaded.coefficients(x[:2]), dec.coefficients(x[:2]), rtol=0, atol=0)
    meta["weights"] = ["blocks.0.attn.W_O", "blocks.0.attn.W_Q"]  # not what the selection gives, in part or whole
    (tmp_path / "d" / "decomposition.json").write_text(json.dumps(meta))
    as_earlier_save(tmp_path / "d")
    with pytest.raises(ValueError, match="the saved decomposition covers"):
        Decomposition.load(tmp_path / "d", model)
