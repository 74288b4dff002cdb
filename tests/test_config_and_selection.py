"""Bad configuration and bad selections fail at once, naming the problem and the choices."""

from __future__ import annotations

import json

import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.selection import select

from .helpers import TinyMLP, tiny_lm


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), r"top_k.*\(0, 1\]"),
    (dict(top_k=1.5), r"top_k.*\(0, 1\]"),
    (dict(n_subnetworks=0), "n_subnetworks must be an int >= 1"),
    (dict(divergence="l1"), "divergence='l1' is not valid; choose one of 'auto', 'kl', 'mse'"),
    (dict(sample="tokens"), "choose one of 'auto', 'token', 'sequence'"),
    (dict(reference="other"), "choose one of 'random', 'mean', 'uniform', 'zero', 'paired'"),
    (dict(engine="turbo"), "choose one of 'fast', 'exact'"),
    (dict(rank=0), "rank must be >= 1"),
    (dict(rank=1.5), r"fraction must be in \(0, 1\)"),
    (dict(rank={"blocks.0.attn.W_Q": (2, 0)}), "one int >= 1 per mode"),
    (dict(position="last"), "position must be an int"),
    (dict(epochs=0), "epochs must be an int >= 1"),
    (dict(lr=-1.0), "lr must be a finite number > 0"),
    (dict(lr=float("inf")), "lr must be a finite number > 0"),
    (dict(dtype="float16"), "choose one of 'float32', 'float64'"),
    (dict(resample_epochs=(0, 5)), r"resample_epochs must be a tuple of increasing, distinct epochs in 1\.\.9"),
    (dict(resample_epochs=(5, 10)), r"epochs in 1\.\.9 \(e\.g\. \(25, 50, 75\)\), or \(\) for no resampling"),
    (dict(resample_epochs=(6, 3)), "increasing, distinct"),
    (dict(resample_epochs=5), r"got 5"),
    (dict(resample_epochs=(1,), epochs=1), "none: epochs=1 leaves no epoch to resample at"),
    (dict(resample_max=0), r"resample_max must be None \(every dead subnetwork\) or an int >= 1"),
    (dict(loss_norm="sample", loss_norm_epochs=0), r"loss_norm_epochs must be None \(all epochs\) or an int >= 1"),
    (dict(loss_norm="sample", loss_norm_epochs=True), "got True"),
    (dict(loss_norm_epochs=5), "from loss_norm='sample' to the batch form; with loss_norm='batch' there is nothing"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        l3d_lens.L3DConfig(components="blocks.0.attn", **kwargs)


def test_config_requires_components():
    with pytest.raises(ValueError, match="components must be a non-empty selector"):
        l3d_lens.L3DConfig(components=[])


def test_config_is_frozen_and_round_trips():
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.*.mlp"], rank={"blocks.0.attn.W_Q": (1, 2, 3)})
    with pytest.raises(Exception):
        cfg.top_k = 0.5
    again = l3d_lens.L3DConfig.from_dict(cfg.to_dict())
    assert again.components == cfg.components and again.to_dict() == cfg.to_dict()
    resampled = cfg.replace(resample_epochs=[2, 5])  # a list (as read back from JSON) becomes a tuple
    assert resampled.resample_epochs == (2, 5) and resampled.to_dict()["resample_epochs"] == [2, 5]
    loaded = l3d_lens.L3DConfig.from_dict(json.loads(json.dumps(resampled.to_dict())))
    assert loaded.resample_epochs == (2, 5) and loaded.to_dict() == resampled.to_dict()


def names(model, *selectors, include_biases=True):
    return [s.name for s in select(make_adapter(model), selectors, include_biases)]


def test_selectors(lm_kind):
    model = tiny_lm(lm_kind)
    attn = names(model, "blocks.0.attn")
    assert attn == [f"blocks.0.attn.{w}" for w in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")]
    assert names(model, "blocks.0.attn", include_biases=False) == [f"blocks.0.attn.W_{x}" for x in "QKVO"]
    assert names(model, "blocks.*.mlp.W_in") == ["blocks.0.mlp.W_in", "blocks.1.mlp.W_in"]
    assert names(model, "blocks.1.attn.b_O", include_biases=False) == ["blocks.1.attn.b_O"]
    block = names(model, "blocks.1")
    assert "blocks.1.attn.W_Q" in block and "blocks.1.mlp.W_out" in block and "blocks.1.ln1.w" in block
    assert not any(n.startswith("blocks.0") for n in block)
    assert names(model, "embed", "unembed")[0] == "embed.W_E" and "unembed.W_U" in names(model, "unembed")


def test_head_and_neuron_subsets(lm_kind):
    adapter = make_adapter(tiny_lm(lm_kind))
    sel = {s.name: s for s in select(adapter, ("blocks.0.attn[1]", "blocks.1.mlp[0:4,9]"))}
    assert "blocks.0.attn.b_O" not in sel and "blocks.1.mlp.b_out" not in sel  # no head / neuron axis
    assert sel["blocks.0.attn.W_Q"].shape == (1, 16, 8) and sel["blocks.0.attn.W_Q"].indices == (1,)
    assert sel["blocks.1.mlp.W_in"].shape == (16, 5) and sel["blocks.1.mlp.W_out"].shape == (5, 16)
    assert sel["blocks.1.mlp.W_in"].indices == (0, 1, 2, 3, 9)
    full = select(adapter, ("blocks.0.attn[0,1]",))
    assert all(s.axis is None for s in full)  # every head = the whole weight


@pytest.mark.parametrize("selector, match", [
    ("blocks.7.attn", r"layer 7 out of range; the model has 2 layers \(0..1\)"),
    ("blocks.0.attn[5]", r"head 5 out of range for blocks.0.attn.W_Q; valid: 0..1"),
    ("blocks.0.mlp[40]", r"neuron 40 out of range for blocks.0.mlp.W_in; valid: 0..31"),
    ("blocks.0.attention", r"matches no weight; available: embed.W_E, pos_embed.W_pos, .*blocks.\{0..1\}.attn.W_Q"),
    ("unembed[1]", "selects heads of attention weights or neurons of MLP weights"),
    ("blocks.0.attn[3:1]", "bad range"),
])
def test_bad_selectors(lm_kind, selector, match):
    with pytest.raises(ValueError, match=match):
        select(make_adapter(tiny_lm(lm_kind)), (selector,))


def test_module_selection():
    model = TinyMLP()
    assert names(model, "fc1") == ["fc1.weight", "fc1.bias"]
    assert names(model, "*", include_biases=False) == ["scale", "fc1.weight", "fc2.weight"]
    with pytest.raises(ValueError, match="matches no weight; available: scale, fc1.weight, fc1.bias, fc2.weight"):
        names(model, "fc3")


def test_weight_layout_matches_transformer_lens(lm_kind):
    """Our TL-layout view of each weight equals TransformerLens' own W_Q / W_O / W_in views."""
    model = tiny_lm(lm_kind)
    adapter = make_adapter(model)
    for i in range(2):
        for kind in ("W_Q", "W_K", "W_V", "W_O"):
            assert torch.equal(adapter.weight(f"blocks.{i}.attn.{kind}"), getattr(model.blocks[i].attn, kind).detach())
        assert adapter.weight(f"blocks.{i}.mlp.W_in").shape == (16, 32)
    assert adapter.weight("unembed.W_U").shape == (16, 20)
