"""Review fixes: NaN effects outside head/neuron slices, top_logits' default positions in
sequence mode, index-list errors in selectors, and checked ``impacts=``."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.selection import select

from .helpers import tiny_lm, tokens

torch.set_num_threads(1)


def dec_of(model, components, **kw):
    base = dict(components=components, n_subnetworks=2, rank=2, epochs=1, batch_size=8, dtype="float64")
    base.update(kw)
    return l3d_lens.decompose(model, tokens(8, 6), l3d_lens.L3DConfig(**base), progress=False)


# --- 1. effects: NaN where a unit's output weights are not decomposed -------------------------

def test_effects_are_nan_outside_head_and_neuron_slices(lm_kind):
    dec = dec_of(tiny_lm(lm_kind), ["blocks.0.mlp[3,5]", "blocks.1.attn[1]"])
    e = dec.effects()
    heads, neurons, mlp = e["heads"], e["neurons"], e["mlp"]
    assert torch.isnan(heads[:, 0]).all() and torch.isnan(heads[:, 1, 0]).all()
    assert torch.isfinite(heads[:, 1, 1]).all() and (heads[:, 1, 1] != 0).any()
    picked = torch.zeros(neurons.shape[-1], dtype=torch.bool)
    picked[[3, 5]] = True
    assert torch.isfinite(neurons[:, 0, picked]).all() and torch.isnan(neurons[:, 0, ~picked]).all()
    assert torch.isnan(neurons[:, 1]).all()
    assert torch.allclose(mlp[:, 0], neurons[:, 0, picked].sum(1)) and torch.isnan(mlp[:, 1]).all()
    assert sorted(dec.neuron_effects().neuron.unique().tolist()) == [3, 5]
    share = dec.head_effects(as_tensor=True, share=True)  # what the report and CLI read: no NaN
    assert not torch.isnan(share).any() and torch.allclose(share.sum((1, 2)), torch.ones(2, dtype=share.dtype))


def test_head_effect_averages_only_the_routes_that_cover_the_head():
    dec = dec_of(tiny_lm("bridge"), ["blocks.0.attn.W_O", "blocks.0.attn.W_V[1]"], include_biases=False)
    adapter = dec.adapter
    subs = dec.subnetworks()

    def route(kind, head):  # <v_k|head, W0|head>
        axis = adapter.sites[f"blocks.0.attn.{kind}"].modes.index("head")
        v = subs[f"blocks.0.attn.{kind}"].double().select(1 + axis, head)
        w = adapter.weight(f"blocks.0.attn.{kind}").double().select(axis, head)
        return (v * w).flatten(1).sum(1)

    heads = dec.effects()["heads"]
    assert torch.allclose(heads[:, 0, 0], route("W_O", 0))
    assert torch.allclose(heads[:, 0, 1], (route("W_O", 1) + route("W_V", 1)) / 2)


# --- 2. top_logits: the decomposed position by default in sequence mode -----------------------

def test_top_logits_defaults_to_the_decomposed_position():
    model = tiny_lm("bridge")
    x = tokens(4, 6, seed=3)
    every = list(range(6))
    seq = dec_of(model, ["blocks.0.attn"], sample="sequence", position=-1)
    default = seq.top_logits(x, 0, k=5)
    pd.testing.assert_frame_equal(default, seq.top_logits(x, 0, k=5, positions=[-1]))
    assert not default.equals(seq.top_logits(x, 0, k=5, positions=every))
    for cfg in (dict(sample="sequence", position="all"), dict(sample="token")):
        dec = dec_of(model, ["blocks.0.attn"], **cfg)
        pd.testing.assert_frame_equal(dec.top_logits(x, 0, k=5), dec.top_logits(x, 0, k=5, positions=every))


def test_top_logits_of_a_plain_module_reads_its_whole_output():
    """A plain module's sample is its whole [rows, d] output (position means nothing there)."""
    model = torch.nn.Linear(5, 4)
    x = torch.rand(6, 3, 5, generator=torch.Generator().manual_seed(0))
    dec = l3d_lens.decompose(model, x, l3d_lens.L3DConfig(components="weight", n_subnetworks=2, rank=1, epochs=1,
                                                          reference="zero"), progress=False)
    every = dec.top_logits(x, 0, k=4, positions=[0, 1, 2])
    pd.testing.assert_frame_equal(dec.top_logits(x, 0, k=4), every)
    assert not every.equals(dec.top_logits(x, 0, k=4, positions=[-1]))


# --- 3. selectors: index-list errors say what is wrong ----------------------------------------

@pytest.mark.parametrize("selector, match", [
    ("blocks.0.attn[-1]", r"negative index '-1'.*\[i,j,a:b\]"),
    ("blocks.0.attn[]", r"empty index list.*\[i,j,a:b\]"),
    ("blocks.0.attn [0]", r"space before the index list.*\[i,j,a:b\]"),
    ("blocks.0.attn[0,,1]", r"empty entry in \[0,,1\].*\[i,j,a:b\]"),
    ("blocks.0.attn[0,1,]", r"empty entry"),
    ("blocks.0.attn[1:-1]", r"negative index"),
    ("blocks.0.attn[a]", r"bad index 'a' in \[a\] \(an index list: write \[i,j,a:b\]"),
])
def test_bad_index_lists_are_named(selector, match):
    adapter = make_adapter(tiny_lm("bridge"))
    with pytest.raises(ValueError, match=match):
        select(adapter, (selector,))


def test_good_index_lists_and_globs_still_resolve():
    adapter = make_adapter(tiny_lm("bridge"))
    got = {s.name: s.indices for s in select(adapter, ("blocks.0.attn[ 1 ]", "blocks.1.mlp[0:3, 7]"), False)}
    assert got["blocks.0.attn.W_Q"] == (1,) and got["blocks.1.mlp.W_out"] == (0, 1, 2, 7)
    assert [s.name for s in select(adapter, ("blocks.*.attn.W_[QK]",))] == [
        "blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.1.attn.W_Q", "blocks.1.attn.W_K"]
    # a glob range at the end is a glob, not an index list (it was read as "negative index '0-1'")
    assert select(adapter, ("blocks.[0-1]",)) == select(adapter, ("blocks.0", "blocks.1"))


# --- 4. impacts= is checked against data -------------------------------------------------------

def test_impacts_of_the_wrong_shape_are_rejected():
    dec = dec_of(tiny_lm("bridge"), ["blocks.0.attn"])
    x = tokens(4, 6, seed=5)
    imp = dec.impact(x, n_references=1)
    for bad in (imp[:, :3], imp[:3], imp[:, :, :1], imp.reshape(4 * 6, -1)):
        with pytest.raises(ValueError, match=r"impacts has shape .* must be \(4, 6, 2\)"):
            dec.top_samples(x, 0, k=3, impacts=bad)
        with pytest.raises(ValueError, match=r"impacts has shape .* must be \(4, 6, 2\)"):
            dec.intervention_curve(x, 0, [1.0], impacts=bad)
    assert len(dec.top_samples(x, 0, k=3, impacts=imp)) == 3
    seq = dec_of(tiny_lm("bridge"), ["blocks.0.attn"], sample="sequence")
    with pytest.raises(ValueError, match=r"must be \(4, 2\)"):
        seq.top_samples(x, 0, impacts=imp)


# --- 5. a contrastive decomposition's analyses, and lists of batches ---------------------------

def test_top_samples_and_curve_of_a_contrastive_decomposition_take_the_reference(lm_kind):
    """They computed impacts without reference data and failed, pointing at decompose."""
    clean, corrupted = tokens(8, 6, seed=3), tokens(8, 6, seed=4)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=2, epochs=1, dtype="float64",
                             sample="sequence", reference="paired")
    dec = l3d_lens.decompose(tiny_lm(lm_kind), clean, cfg, reference=corrupted, progress=False)
    imp = dec.impact(clean, reference=corrupted)
    assert dec.top_samples(clean, 1, k=3, reference=corrupted).equals(dec.top_samples(clean, 1, k=3, impacts=imp))
    curve = dec.intervention_curve(clean, 1, [0.5, 2.0], reference=corrupted)
    assert curve.equals(dec.intervention_curve(clean, 1, [0.5, 2.0], impacts=imp))
    for call in (lambda: dec.top_samples(clean, 1), lambda: dec.intervention_curve(clean, 1, [1.0])):
        with pytest.raises(ValueError, match=r"contrastive \(reference='paired'\): pass its reference="):
            call()


def test_analyses_join_a_list_of_batches_and_name_a_stream():
    """dec.impact on a list of batches in token mode raised AttributeError ('list' has no shape),
    as did top_samples and intervention_curve; decompose and coefficients take lists."""
    dec = dec_of(tiny_lm("bridge"), ["blocks.0.attn"])
    x = tokens(6, 6, seed=5)
    parts = [x[:4], x[4:]]
    assert torch.equal(dec.impact(parts, n_references=2), dec.impact(x, n_references=2))
    assert dec.top_samples(parts, 0, k=4).equals(dec.top_samples(x, 0, k=4))
    assert dec.intervention_curve(parts, 0, [1.0]).equals(dec.intervention_curve(x, 0, [1.0]))
    assert dec.top_logits(parts, 0, k=3).equals(dec.top_logits(x, 0, k=3))
    with pytest.raises(ValueError, match=r"batches of different sample shapes \[\(5,\), \(6,\)\]"):
        dec.impact([x[:4], x[4:, :5]])
    with pytest.raises(TypeError, match=r"data must be a tensor \[n, \.\.\.\] or a list of tensor batches here"):
        dec.top_samples(iter([x]), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine): run where a "
                                                          "GPU is lent, e.g. by benchmarks/gpu_toy.py's check")
def test_every_analysis_runs_on_the_models_gpu():
    """Factors live on the model's device; attribution read them with .numpy(), and the curve
    indexed a CPU mask with device indices."""
    model = tiny_lm("hooked", dtype=torch.float32).to("cuda")
    x = tokens(8, 6).to("cuda")
    dec = l3d_lens.decompose(model, x, l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.mlp"],
                                                          n_subnetworks=2, rank=2, epochs=1), progress=False)
    assert dec.attribution().groupby("subnetwork")["share"].sum().tolist() == pytest.approx([1.0, 1.0])
    assert dec.head_attribution(as_tensor=True).shape == (2, 2, 2) and len(dec.neuron_attribution()) > 0
    assert len(dec.top_samples(x, 0, k=3)) == 3 and len(dec.top_logits(x, 0, k=3)) == 3
    assert len(dec.intervention_curve(x, 0, [1.0])) == 1 and dec.head_effects(as_tensor=True).shape == (2, 2, 2)
