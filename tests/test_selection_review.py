"""Selection review fixes: one index list over heads and neurons at once, a bias glob that
include_biases=False empties, and malformed index lists reported as unknown names."""

from __future__ import annotations

import pytest
import torch

import l3d_lens
from l3d_lens.adapters import make_adapter
from l3d_lens.decomposition import build_task
from l3d_lens.selection import select

from .helpers import tiny_lm, tokens

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(tiny_lm("bridge"))


def picked(adapter, *selectors, include_biases=True):
    return {s.name: s.indices for s in select(adapter, selectors, include_biases)}


# --- F2: one index list addresses heads or neurons, not both ------------------------------------

@pytest.mark.parametrize("selector, fix", [
    ("blocks.1[0]", r"'blocks.1.attn\[0\]' for heads or 'blocks.1.mlp\[0\]' for neurons"),
    ("*[1]", r"'blocks.\*.attn\[1\]' for heads or 'blocks.\*.mlp\[1\]' for neurons"),
    ("blocks.*[0:2]", r"'blocks.\*.attn\[0:2\]' for heads or 'blocks.\*.mlp\[0:2\]' for neurons"),
])
def test_one_index_list_over_attention_and_mlp_is_refused(lm_kind, selector, fix):
    """'blocks.1[0]' picked head 0 of every attention weight and neuron 0 of W_in/b_in/W_out."""
    with pytest.raises(ValueError, match=r"one index list must address one kind of unit.*" + fix):
        select(make_adapter(tiny_lm(lm_kind)), (selector,))


def test_one_index_list_is_refused_before_any_work():
    with pytest.raises(ValueError, match="one index list must address one kind of unit"):
        build_task(tiny_lm("bridge"), l3d_lens.L3DConfig(components="blocks.1[0]"))


def test_documented_index_lists_still_resolve(adapter):
    assert picked(adapter, "blocks.*.attn[1]")["blocks.1.attn.W_O"] == (1,)
    assert picked(adapter, "blocks.0.mlp[0:8]") == {n: tuple(range(8)) for n in
                                                    ("blocks.0.mlp.W_in", "blocks.0.mlp.b_in", "blocks.0.mlp.W_out")}
    assert picked(adapter, "blocks.0.attn.W_Q[1]") == {"blocks.0.attn.W_Q": (1,)}
    assert picked(adapter, "blocks.0.attn[0,1]")["blocks.0.attn.W_Q"] is None  # every head = the whole weight
    # a block of an attention-only model holds heads only: its index list is not ambiguous
    only_heads = picked(make_adapter(tiny_lm("bridge", attn_only=True)), "blocks.1[0]")
    assert only_heads["blocks.1.attn.W_Q"] == (0,) and all(".attn." in n for n in only_heads)


# --- F3: a bias glob emptied by include_biases=False says so ------------------------------------

@pytest.mark.parametrize("selector, shown", [
    ("blocks.*.attn.b_O", r"\(blocks.0.attn.b_O, blocks.1.attn.b_O\)"),
    ("blocks.0.attn.b_*", r"\(blocks.0.attn.b_Q, blocks.0.attn.b_K, blocks.0.attn.b_V, blocks.0.attn.b_O\)"),
])
def test_bias_glob_without_biases_names_the_filter(adapter, selector, shown):
    with pytest.raises(ValueError, match=r"matches only biases " + shown + r", which include_biases=False leaves "
                                         r"out; name them exactly \(e.g. 'blocks.0.attn.b_.'\) or set include_biases=True"
                       ) as err:
        select(adapter, (selector,), False)
    assert "matches no weight" not in str(err.value)
    assert "blocks.0.attn.b_O" in picked(adapter, selector)  # with biases the same glob selects them


def test_exact_bias_name_is_still_taken_without_biases(adapter):
    assert picked(adapter, "blocks.0.attn.b_O", include_biases=False) == {"blocks.0.attn.b_O": None}


# --- F4: a malformed index list after a real name is a bad index list ---------------------------

@pytest.mark.parametrize("selector, bad", [
    ("blocks.0.attn[a]", r"bad index 'a' in \[a\] "),
    ("blocks.0.mlp[0-3]", r"bad index '0-3' in \[0-3\]; a range is start:stop with stop left out, here 0:4"),
    ("blocks.0.attn[1e0]", r"bad index '1e0' in \[1e0\]"),
    ("blocks.0.attn[0, b]", r"bad index 'b' in \[0, b\]"),
])
def test_malformed_index_list_names_the_bad_entry(adapter, selector, bad):
    with pytest.raises(ValueError, match=bad + r".*\(an index list: write \[i,j,a:b\] of indices >= 0") as err:
        select(adapter, (selector,))
    assert "available:" not in str(err.value)


def test_globs_with_brackets_are_untouched(adapter):
    assert list(picked(adapter, "blocks.0.attn.W_[QK]")) == ["blocks.0.attn.W_Q", "blocks.0.attn.W_K"]
    assert picked(adapter, "blocks.[0-1]") == picked(adapter, "blocks.0", "blocks.1")
    with pytest.raises(ValueError, match=r"'blocks.0.attn.W_\[XY\]' matches no weight .*; available: "):
        select(adapter, ("blocks.0.attn.W_[XY]",))


def test_a_saved_mixed_index_list_still_loads_as_it_was_computed(tmp_path, monkeypatch):
    """'blocks.1[0]' sliced head 0 and neuron 0 at once before new runs refused it: a decomposition
    saved with it (made here as that l3d_lens made it) loads onto the same model with a warning, on
    the weights it was computed on; a new run is refused."""
    import warnings

    import l3d_lens
    from l3d_lens import decomposition

    model = tiny_lm("bridge", dtype=torch.float64)
    cfg = l3d_lens.L3DConfig(components="blocks.1[0]", n_subnetworks=2, rank=1, epochs=1)
    data = tokens(8, 6)
    with pytest.raises(ValueError, match="one index list must address one kind of unit"):
        l3d_lens.decompose(model, data, cfg, progress=False)
    monkeypatch.setattr(decomposition, "select", lambda *a, **k: select(*a, **{**k, "saved": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = l3d_lens.decompose(model, data, cfg, progress=False)
    monkeypatch.undo()
    assert {name.split(".")[2] for name in dec.weight_names} == {"attn", "mlp"}
    dec.save(tmp_path / "d")
    with pytest.warns(UserWarning, match=r"selector 'blocks.1\[0\]' \(saved by an earlier l3d_lens\) slices heads "
                                         r"and neurons.*'blocks.1.attn\[0\]' for heads or 'blocks.1.mlp\[0\]'"):
        loaded = l3d_lens.Decomposition.load(tmp_path / "d", model)
    assert loaded.weight_names == dec.weight_names
    assert torch.equal(loaded.coefficients(data), dec.coefficients(data))
