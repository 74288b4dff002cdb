"""Selection review 2: a dash range right after a name is ambiguous (units of a block, or a glob
over blocks 10-11), a bracket after a '.' is a glob segment, and an index range is bounded
before it is expanded."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from l3d_lens.adapters import make_adapter
from l3d_lens.selection import select

from .helpers import tiny_lm

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def deep():
    """12 layers: 'blocks.1[0-1]' also matches blocks.10 and blocks.11 as a glob."""
    return make_adapter(tiny_lm("bridge", n_layers=12))


def picked(adapter, *selectors):
    return {s.name: s.indices for s in select(adapter, selectors)}


def blocks(adapter, *selectors):
    return sorted({name.split(".")[1] for name in picked(adapter, *selectors)}, key=int)


# --- a dash range right after a name: both readings named, neither taken -------------------------

def test_dash_range_after_a_block_name_is_refused_naming_both_readings(deep):
    """It selected the whole of blocks 10 and 11 where 'heads 0-1 of layer 1' was meant."""
    with pytest.raises(ValueError, match=r"selector 'blocks.1\[0-1\]' is ambiguous: \[0-1\] right after a name reads "
                                         r"as heads or neurons \[0-1\] of blocks.1, or as a glob over blocks.10, "
                                         r"blocks.11; write 'blocks.1.attn\[0:2\]' for heads or 'blocks.1.mlp\[0:2\]' "
                                         r"for neurons \(an index range is start:stop with stop left out\), or "
                                         r"'blocks.1\[0-1\].\*' for the glob"):
        select(deep, ("blocks.1[0-1]",))


def test_the_suggested_spellings_select_what_they_say(deep):
    heads = picked(deep, "blocks.1.attn[0:2]")
    assert set(heads) == {f"blocks.1.attn.{w}" for w in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O")}
    assert picked(deep, "blocks.1.mlp[0:2]") == {f"blocks.1.mlp.{w}": (0, 1) for w in ("W_in", "b_in", "W_out")}
    assert picked(deep, "blocks.1[0-1].*") == picked(deep, "blocks.10", "blocks.11")


def test_dash_range_on_an_attention_only_block_names_heads_only():
    adapter = make_adapter(tiny_lm("bridge", n_layers=12, attn_only=True))
    with pytest.raises(ValueError, match=r"reads as heads \[0 - 1, 1\] of blocks.1, or as a glob over blocks.10, "
                                         r"blocks.11; write 'blocks.1.attn\[0:2, 1\]' for heads \(an index range"):
        select(adapter, ("blocks.1[0 - 1, 1]",))
    assert picked(adapter, "blocks.1.attn[0:2, 1]")["blocks.1.attn.W_Q"] is None  # both heads: the whole weight


def test_dash_range_that_matches_nothing_as_a_glob_is_still_a_bad_index(deep):
    with pytest.raises(ValueError, match=r"bad index '0-1' in \[0-1\]; a range is start:stop with stop left out, "
                                         r"here 0:2"):
        select(deep, ("blocks.1.attn[0-1]",))


# --- a bracket after a '.' is a glob segment --------------------------------------------------

@pytest.mark.parametrize("selector, expected", [
    ("blocks.[01]", ["0", "1"]),
    ("blocks.[0-1]", ["0", "1"]),
    ("blocks.[5]", ["5"]),
    ("blocks.[01].attn", ["0", "1"]),
])
def test_bracket_after_a_dot_is_a_glob_segment(deep, selector, expected):
    """'blocks.[01]' was read as an index list and refused as matching no weight."""
    assert blocks(deep, selector) == expected


def test_glob_segment_that_matches_nothing_is_not_called_an_index_list():
    with pytest.raises(ValueError, match=r"'blocks.\[5\]' matches no weight; available: "):
        select(make_adapter(tiny_lm("bridge")), ("blocks.[5]",))


def test_documented_forms_keep_their_reading(deep):
    assert blocks(deep, "blocks.[0-1]") == ["0", "1"]
    assert picked(deep, "blocks.*.attn[1]")["blocks.11.attn.W_O"] == (1,)
    assert picked(deep, "blocks.0.mlp[3:9,20]")["blocks.0.mlp.W_in"] == (3, 4, 5, 6, 7, 8, 20)
    assert list(picked(deep, "blocks.0.attn.W_[QK]")) == ["blocks.0.attn.W_Q", "blocks.0.attn.W_K"]


# --- an index range is bounded before it is expanded --------------------------------------------

@pytest.mark.parametrize("selector, message", [
    (f"blocks.0.attn[0:{10 ** 18}]", r"head 2 out of range for blocks.0.attn.W_Q; valid: 0..1"),
    (f"blocks.0.mlp[1, 40:{10 ** 18}]", r"neuron 40 out of range for blocks.0.mlp.W_in; valid: 0..31"),
    ("blocks.0.mlp[1, 30:34]", r"neuron 32 out of range for blocks.0.mlp.W_in; valid: 0..31"),
])
def test_huge_index_range_is_refused_without_expanding_it(deep, selector, message):
    """Expanded first, [0:10**18] raised MemoryError (and [0:30000000] took seconds)."""
    with pytest.raises(ValueError, match=message):
        select(deep, (selector,))


def test_a_saved_dash_range_still_loads_as_the_glob_it_was_computed_on(deep):
    """An earlier l3d_lens read 'blocks.1[0-1]' as blocks 10 and 11: a saved selection keeps that."""
    with pytest.warns(UserWarning, match=r"selector 'blocks.1\[0-1\]' \(saved by an earlier l3d_lens\) is read as "
                                         r"the glob over blocks.10, blocks.11 .*'blocks.1\[0-1\].\*' for the glob"):
        saved = select(deep, ("blocks.1[0-1]",), saved=True)
    assert saved == select(deep, ("blocks.10", "blocks.11"))


# --- any list right after a name that also selects weights as a glob -----------------------------

@pytest.mark.parametrize("selector, glob, items", [("blocks.1[01]", "blocks.10, blocks.11", "0,1"),
                                                   ("blocks.1[0]", "blocks.10", "0"),
                                                   ("blocks.1[0,1]", "blocks.10, blocks.11", "0,1")])
def test_a_list_without_a_dash_that_also_globs_is_refused(selector, glob, items):
    """'blocks.1[01]' read as head 1 of block 1 (int('01')) on an attention-only model of 12
    layers, where blocks 10 and 11 may have been meant; refused now, naming both (the heads as
    an index list that selects: [01], the glob's 0 or 1, is 0,1)."""
    adapter = make_adapter(tiny_lm("bridge", n_layers=12, attn_only=True))
    pattern = (f"selector '{re.escape(selector)}' is ambiguous: .* reads as heads .* of blocks.1, or as a glob over "
               f"{glob}; write 'blocks.1.attn{re.escape(f'[{items}]')}' for heads")
    with pytest.raises(ValueError, match=pattern):
        select(adapter, (selector,))
    assert picked(adapter, f"blocks.1.attn[{items}]")  # the suggested spelling selects
    assert blocks(adapter, f"{selector}.*") == [b.strip().split(".")[1] for b in glob.split(",")]


def test_a_list_without_a_dash_that_globs_nothing_stays_an_index_list(deep):
    assert picked(deep, "blocks.2.attn[1]")["blocks.2.attn.W_Q"] == (1,)
    assert picked(make_adapter(tiny_lm("bridge", n_layers=2, attn_only=True)), "blocks.1[0]")["blocks.1.attn.W_Q"] == (0,)


def test_a_saved_list_without_a_dash_keeps_its_index_reading():
    """An earlier l3d_lens read 'blocks.1[01]' as indices: a saved selection keeps that, unwarned."""
    adapter = make_adapter(tiny_lm("bridge", n_layers=12, attn_only=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = {s.name: s.indices for s in select(adapter, ("blocks.1[01]",), saved=True)}
    assert saved == picked(adapter, "blocks.1.attn[1]")
