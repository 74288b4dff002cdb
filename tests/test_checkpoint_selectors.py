"""A checkpoint compares selectors by what they select on the model, not by how they are spelt:
one written with a selector that a new run refuses as ambiguous resumes under the spelling the
refusal names, and two spellings of one selection are one run."""

from __future__ import annotations

import pytest
import torch

import l3d_lens

from .helpers import tiny_lm, tokens
from .test_checkpoint_review2 import edit_state, interrupted, same

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:the last epoch.s reconstruction loss")


def cfg_of(*components, **kw):
    return l3d_lens.L3DConfig(components=list(components), n_subnetworks=2, rank=1, epochs=2, batch_size=4,
                              include_biases=False, **kw)


@pytest.fixture(scope="module")
def deep():
    """12 layers: 'blocks.1[0]' is head 0 of block 1 or, as a glob, block 10."""
    return tiny_lm("bridge", n_layers=12, attn_only=True)


def spelt(components):
    def edit(state):
        state["identity"]["config"]["components"] = components
    return edit


def test_a_checkpoint_of_a_now_ambiguous_selector_resumes_under_its_new_spelling(deep, tmp_path, monkeypatch):
    x = tokens(12, 5)
    new = cfg_of("blocks.1.attn[0]")
    with pytest.raises(ValueError, match=r"selector 'blocks.1\[0\]' is ambiguous"):
        l3d_lens.decompose(deep, x, cfg_of("blocks.1[0]"), progress=False)
    interrupted(monkeypatch, deep, x, new, tmp_path, at=3)
    edit_state(tmp_path, spelt(["blocks.1[0]"]))  # as an earlier l3d_lens, which read it as head 0, saved it
    resumed = l3d_lens.decompose(deep, x, new, progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(deep, x, new, progress=False))
    assert resumed.cfg.components == ("blocks.1.attn[0]",)


def test_two_spellings_of_one_selection_are_one_run(tmp_path, monkeypatch):
    model = tiny_lm("bridge", n_layers=2, attn_only=True)
    x = tokens(12, 5)
    interrupted(monkeypatch, model, x, cfg_of("blocks.0.attn.W_Q", "blocks.0.attn.W_K"), tmp_path, at=3)
    other = cfg_of("blocks.0.attn.W_[QK]")
    resumed = l3d_lens.decompose(model, x, other, progress=False, checkpoint=tmp_path)
    assert same(resumed, l3d_lens.decompose(model, x, other, progress=False))


@pytest.mark.parametrize("components", [["blocks.1[0]"], ["blocks.1.attn[1]"], ["blocks.0.attn[0]"]])
def test_a_selector_of_other_weights_or_units_still_belongs_to_another_run(deep, tmp_path, monkeypatch, components):
    x = tokens(12, 5)
    interrupted(monkeypatch, deep, x, cfg_of("blocks.1.attn[0]"), tmp_path, at=3)
    edit_state(tmp_path, spelt(components))
    with pytest.raises(ValueError, match=r"belongs to another run: config \(components: \[?'"):
        l3d_lens.decompose(deep, x, cfg_of("blocks.1.attn[1]" if components == ["blocks.1[0]"] else "blocks.1.attn[0]"),
                           progress=False, checkpoint=tmp_path)
