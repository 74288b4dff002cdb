"""Selection review 3: an index with a leading zero is refused (``[01]`` reads as "0 or 1"
where a glob may stand, and as head 1 as a number), naming the spellings that select; a
selection saved by an earlier l3d_lens keeps the number it was computed with."""

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
def adapter():
    return make_adapter(tiny_lm("bridge", n_layers=2))


@pytest.mark.parametrize("selector, zero", [("blocks.1.attn[01]", "01"), ("blocks.0.mlp[3,007]", "007"),
                                            ("blocks.0.mlp[00:5]", "00"), ("blocks.1.attn.W_Q[0:01]", "01")])
def test_an_index_with_a_leading_zero_is_refused(adapter, selector, zero):
    """'blocks.1.attn[01]' selected head 1 alone, where heads 0 and 1 (as a glob reads it) may
    have been meant."""
    with pytest.raises(ValueError, match=rf"selector '{re.escape(selector)}': index "
                                         rf"'{zero}' has a leading zero, which a glob reads as a set of digits "
                                         r"\(\[01\]: 0 or 1\); write several indices as 0,1 or a range as 0:2"):
        select(adapter, (selector,))


@pytest.mark.parametrize("selector", ["blocks.1.attn[0]", "blocks.0.mlp[0,10]", "blocks.0.mlp[0:10]",
                                      "blocks.0.mlp[ 0 : 10 ]"])
def test_zero_and_numbers_with_a_zero_inside_still_select(adapter, selector):
    assert select(adapter, (selector,))


def test_a_saved_selection_keeps_the_number_it_was_computed_with(adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = {s.name: s.indices for s in select(adapter, ("blocks.0.mlp[010]",), saved=True)}
    assert saved == {s.name: s.indices for s in select(adapter, ("blocks.0.mlp[10]",))}


def test_the_ambiguity_message_suggests_index_lists_that_select():
    """'blocks.1[01]' on 12 layers: the heads' spelling it suggested was 'blocks.1.attn[01]'."""
    deep = make_adapter(tiny_lm("bridge", n_layers=12, attn_only=True))
    with pytest.raises(ValueError, match=r"write 'blocks.1.attn\[0,1\]' for heads .* or 'blocks.1\[01\].\*' for the "
                                         "glob"):
        select(deep, ("blocks.1[01]",))
    assert {s.indices for s in select(deep, ("blocks.1.attn[0,1]",))} == {None}  # both of 2 heads


def test_the_refusal_names_the_number_an_earlier_l3d_lens_read(adapter):
    """A checkpoint of 'blocks.1.attn[01]' (head 1) resumes under 'blocks.1.attn[1]'; the advice
    '0,1' alone led to a checkpoint of another run."""
    with pytest.raises(ValueError, match=r"\(an earlier l3d_lens read '01' as 1: write 1 to resume a run of it\)$"):
        select(adapter, ("blocks.1.attn[01]",))
