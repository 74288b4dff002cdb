"""Review fixes of l3d_lens.patching: the public attribution_patching / activation_patching
run in eval mode and check their units like compare_with_patching; heads / neurons may be a
[k, 2] integer array or integer rows (np.argwhere, tensor.nonzero()); the GQA warning of the
L3D config is shown once; summary() shows the MLP and neuron tables; top_k_overlap and auroc
refuse inputs they used to misread; a sweep of over 10,000 patched forwards warns first."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch

import l3d_lens.decomposition
from l3d_lens.patching import (
    activation_patching,
    attribution_patching,
    auroc,
    compare_with_patching,
    default_l3d_config,
    top_k_overlap,
)

from . import test_patching
from .helpers import tiny_lm

torch.set_num_threads(1)


pairs = functools.partial(test_patching.pairs, n=4)


def metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 7].mean()


class Reached(Exception):
    """Raised in place of the expensive step: the input was accepted up to there."""


def stop(*args, **kwargs):
    raise Reached


def source_cache(model, tokens, names):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=lambda n: n in names)[1]


# --- 1. the public helpers: eval mode, checked units -----------------------------------------


def test_public_helpers_run_in_eval_mode_and_leave_the_mode(lm_kind):
    """In train mode, dropout made each call of attribution_patching give another estimate;
    both helpers now run in eval mode and put the model back in train mode."""
    model = tiny_lm(lm_kind, dtype=torch.float64)
    model.train()
    clean, corrupted = pairs()
    seen = []

    def recording(logits):
        seen.append(model.training)
        return metric(logits)

    attribution_patching(model, clean, corrupted, recording, heads=[(0, 1)])
    cache = source_cache(model, corrupted, ["blocks.0.attn.hook_z"])
    activation_patching(model, clean, cache, recording, [(0, 1)], [], [])  # empty: none, as before
    assert seen and not any(seen), "the metric ran on a model in train mode"
    assert model.training and all(m.training for m in model.modules())


def test_public_helpers_check_their_units(lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float64)
    clean, corrupted = pairs()
    every = [(0, 0), (0, 1), (1, 0), (1, 1)]
    # heads=True was a TypeError ('bool' object is not iterable)
    est = attribution_patching(model, clean, corrupted, metric, heads=True)["heads"]
    assert torch.equal(est, attribution_patching(model, clean, corrupted, metric, heads=every)["heads"])
    cache = source_cache(model, corrupted, ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"])
    eff = activation_patching(model, clean, cache, metric, heads=True)["heads"]
    assert torch.equal(eff, activation_patching(model, clean, cache, metric, heads=every)["heads"])
    assert est.shape == eff.shape == (4,) and est.abs().max() > 0
    # no units was torch's "`inputs` argument to `grad()` cannot be empty"
    with pytest.raises(ValueError, match="nothing to patch: heads, mlp_layers and neurons are all off"):
        attribution_patching(model, clean, corrupted, metric)
    with pytest.raises(ValueError, match="nothing to patch"):
        activation_patching(model, clean, cache, metric)
    with pytest.raises(ValueError, match=r"heads: \(layer 2, head 0\) does not exist"):
        attribution_patching(model, clean, corrupted, metric, heads=[(2, 0)])
    with pytest.raises(ValueError, match="mlp_layers: layer 5 does not exist"):
        attribution_patching(model, clean, corrupted, metric, mlp_layers=[5])
    with pytest.raises(ValueError, match="same shape"):
        attribution_patching(model, clean, corrupted[:, :4], metric, heads=True)
    with pytest.raises(ValueError, match=r"source_cache lacks the hook points \['blocks.0.hook_mlp_out'\]"):
        activation_patching(model, clean, cache, metric, mlp_layers=[0])
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        attribution_patching(torch.nn.Linear(3, 3), clean, corrupted, metric, heads=True)


# --- 3. units from arrays ----------------------------------------------------------------------


def accepted(model, clean, corrupted, **units):
    """True if compare_with_patching accepts the units (it stops at the L3D run)."""
    try:
        compare_with_patching(model, clean, corrupted, metric, cfg=default_l3d_config(model, 4, mlp=True, epochs=1),
                              **units)
    except Reached:
        return True
    return False


@pytest.mark.parametrize("units", [
    dict(heads=np.argwhere(np.array([[False, True], [True, False]]))),     # [k, 2] int64 array
    dict(heads=torch.tensor([[0, 1], [1, 0]])),                            # [k, 2] int64 tensor
    dict(heads=[torch.tensor([0, 1]), np.array([1, 0])]),                   # integer rows
    dict(heads=[(np.int64(0), torch.tensor(1))]),                           # integer scalars
    dict(heads=False, neurons=np.argwhere(np.eye(2, 32, dtype=bool))),
], ids=["argwhere", "tensor", "rows", "scalars", "neurons"])
def test_units_from_integer_arrays_are_accepted(units, monkeypatch):
    monkeypatch.setattr(l3d_lens.decomposition, "decompose", stop)
    model = tiny_lm("bridge", dtype=torch.float64)
    clean, corrupted = pairs()
    assert accepted(model, clean, corrupted, **units)


def test_array_units_give_the_same_scores():
    model = tiny_lm("bridge", dtype=torch.float64)
    clean, corrupted = pairs()
    listed = attribution_patching(model, clean, corrupted, metric, heads=[(0, 1), (1, 0)])["heads"]
    mask = np.array([[False, True], [True, False]])
    for heads in (np.argwhere(mask), torch.from_numpy(mask).nonzero(), [np.array([0, 1]), torch.tensor([1, 0])]):
        assert torch.equal(attribution_patching(model, clean, corrupted, metric, heads=heads)["heads"], listed)


def test_public_helpers_return_values_in_the_order_given():
    """They returned their units sorted: a caller zipping the values with its own list labelled
    the wrong units (the order given, as before the helpers were checked)."""
    model = tiny_lm("bridge", dtype=torch.float64)
    clean, corrupted = pairs()
    names = [f"blocks.{i}.{hook}" for i in range(2) for hook in ("attn.hook_z", "hook_mlp_out", "mlp.hook_post")]
    cache = source_cache(model, corrupted, names)
    units = dict(heads=[(1, 0), (0, 1)], mlp_layers=[1, 0], neurons=[(1, 3), (0, 2)])
    backwards = {k: v[::-1] for k, v in units.items()}
    for helper, source in ((attribution_patching, corrupted), (activation_patching, cache)):
        given, reversed_ = helper(model, clean, source, metric, **units), helper(model, clean, source, metric,
                                                                               **backwards)
        for level in ("heads", "mlp", "neurons"):
            assert torch.equal(given[level], reversed_[level].flip(0)), (helper.__name__, level)
            assert not torch.equal(given[level], reversed_[level])


def test_a_tuple_of_index_arrays_is_refused():
    """``np.nonzero(mask)`` with two hits is two index arrays of length 2, which read as the pairs
    (rows) and (columns): heads L0H1 and L1H0 were scored as L0H1 and L1H0 only by chance."""
    model = tiny_lm("bridge", dtype=torch.float64)
    clean, corrupted = pairs()
    mask = np.array([[False, True], [False, True]])  # heads (0, 1) and (1, 1)
    for heads in (np.nonzero(mask), torch.where(torch.from_numpy(mask))):
        with pytest.raises(TypeError, match=r"heads: a tuple of index arrays \(np.nonzero\(mask\) or "
                                            r"torch.where\(mask\)\) is not a list of \(layer, head\) pairs; pass "
                                            r"np.argwhere\(mask\)"):
            attribution_patching(model, clean, corrupted, metric, heads=heads)


@pytest.mark.parametrize("heads, match", [
    ([(0, True)], "pair of ints"),
    ([np.array([True, False])], "pair of ints"),
    (np.array([[0.0, 1.0]]), "pair of ints"),
    ([torch.tensor([0.0, 1.0])], "pair of ints"),
    ([np.array([0, 1, 1])], "pair of ints"),
    (torch.tensor([[True, False], [False, True]]), "pair of ints"),
    (np.array([0, 1]), r"an array must be \[k, 2\] \(layer, head\) pairs of ints .* got shape \(2,\)"),
    ("01", "must be True/False or an iterable"),
])
def test_units_that_are_not_integer_pairs_are_refused(heads, match):
    model = tiny_lm("bridge", dtype=torch.float64)
    clean, corrupted = pairs()
    with pytest.raises(TypeError, match=match):
        compare_with_patching(model, clean, corrupted, metric, heads=heads)


# --- 4. the GQA warning, once ----------------------------------------------------------------


def test_the_config_warning_is_shown_once():
    model = tiny_lm("bridge", dtype=torch.float64, n_key_value_heads=1)
    clean, corrupted = pairs()
    cfg = default_l3d_config(model, 4, epochs=2)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        compare_with_patching(model, clean, corrupted, metric, cfg=cfg)
    gqa = [w for w in shown if "leaves out" in str(w.message)]
    assert len(gqa) == 1, [str(w.message) for w in gqa]
    assert "W_K" in str(gqa[0].message) and gqa[0].filename == __file__  # at the caller's line


# --- 5. summary without heads ------------------------------------------------------------------


def test_summary_shows_the_mlp_and_neuron_tables():
    model = tiny_lm("bridge", dtype=torch.float64)
    clean, corrupted = pairs()
    res = compare_with_patching(model, clean, corrupted, metric, heads=False, mlp=True, neurons=[(0, 1), (1, 2)],
                                cfg=default_l3d_config(model, 4, mlp=True, epochs=2))
    text = res.summary()
    assert "top 2 MLP layers by activation patching:" in text
    assert "top 2 neurons by activation patching:" in text
    assert text.count("rank_patching") == 2 and "neuron" in text.splitlines()[-3]
    assert "heads by" not in text


# --- 6. statistics ---------------------------------------------------------------------------


def test_top_k_overlap_refuses_a_k_above_n_and_vectors_of_different_lengths():
    with pytest.raises(ValueError, match=r"k must be an int in 1\.\.3 \(the number of scores\), got 5"):
        top_k_overlap([1, 2, 3], [3, 2, 1], 5)  # was 0.6 for the same top set
    with pytest.raises(ValueError, match="3 vs 4 scores"):
        top_k_overlap([1, 2, 3], [3, 2, 1, 0], 2)
    with pytest.raises(ValueError, match="k must be an int"):
        top_k_overlap([1, 2, 3], [3, 2, 1], 0)
    assert top_k_overlap([1, 2, 3], [3, 2, 1], 3) == 1.0
    assert top_k_overlap(np.array([1, 2, 3]), [1, 2, 3], np.int64(1)) == 1.0


def test_auroc_labels_must_be_binary():
    with pytest.raises(ValueError, match="labels must be bools or 0/1 .* got 2"):
        auroc([0.1, 0.2, 0.3], [1, 0, 2])
    with pytest.raises(ValueError, match="labels must be bools or 0/1 .* got nan"):
        auroc([0.1, 0.2, 0.3], [1, 0, float("nan")])
    assert auroc([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.3], np.array([True, False, False])) == 0.0
    assert auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.0, 1.0, 0.0])) == 0.5


# --- 7. a long sweep warns first --------------------------------------------------------------


def test_more_than_ten_thousand_patched_forwards_warn_before_the_sweep(monkeypatch):
    import transformer_lens.patching as tl_patching

    model = tiny_lm("bridge", dtype=torch.float32, d_mlp=5001)  # 2 x 5001 neurons
    clean, corrupted = pairs()
    monkeypatch.setattr(tl_patching, "generic_activation_patch", stop)
    expected = r"will run 10,002 patched forward passes, one per unit .* 10,002 neurons\); to reduce it, select neurons"
    with pytest.warns(UserWarning, match=expected), pytest.raises(Reached):
        compare_with_patching(model, clean, corrupted, metric, heads=False, neurons=True,
                              cfg=default_l3d_config(model, 4, mlp=True, epochs=1))
    cache = source_cache(model, corrupted, ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"])
    with pytest.warns(UserWarning, match=expected), pytest.raises(Reached):
        activation_patching(model, clean, cache, metric, neurons=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a short sweep: no warning
        with pytest.raises(Reached):
            activation_patching(model, clean, cache, metric, neurons=[(0, 1), (1, 5000)])
