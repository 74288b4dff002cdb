"""Fixes from the review of this stop's own changes: a NaN patching score ranked as no effect
under the new noise floor; a selector covering weights left out for different reasons gave the
first reason for all of them (and its name cap could hide the second kind); induction.load took
path= and variant= together, silently using the path."""

from __future__ import annotations

import warnings

import pytest
import torch

import l3d_lens
from l3d_lens.cli import induction_pairs
from l3d_lens.decomposition import build_task
from l3d_lens.patching import compare_with_patching
from l3d_lens.zoo import induction

from .helpers import HAS_HOOKED

torch.set_num_threads(1)


def test_a_nan_patching_score_is_an_error_naming_the_head():
    model = induction.load()
    clean, corrupted, metric = induction_pairs(8, seed=100)
    with torch.no_grad():
        m_clean, m_corr = metric(model(clean)).item(), metric(model(corrupted)).item()

    def breaks_off_both_runs(logits):
        v = metric(logits)
        far = abs(v.item() - m_clean) > 0.05 and abs(v.item() - m_corr) > 0.05
        return v + (float("nan") if far else 0.0)

    with pytest.raises(ValueError, match=r"activation patching gave nan for heads \(\d, \d\) \(\d+ non-finite of 8\)"):
        compare_with_patching(model, clean, corrupted, breaks_off_both_runs)


@pytest.mark.skipif(not HAS_HOOKED, reason="HookedTransformer was removed in TransformerLens 4")
def test_each_reason_gets_its_own_warning_and_names():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(
            n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=24, d_vocab=20, n_ctx=8, act_fn="gelu", seed=0,
            n_key_value_heads=1, use_qk_norm=True, normalization_type="RMS"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_task(model, l3d_lens.L3DConfig(components=["blocks.*.attn"]))
    said = [str(w.message) for w in caught if "leaves out" in str(w.message)]
    assert len(said) == 2
    assert said[0].startswith("selector 'blocks.*.attn' leaves out blocks.0.attn.W_K, ") and \
        "and 4 more: grouped-query attention" in said[0]
    assert said[1].startswith("selector 'blocks.*.attn' leaves out blocks.0.attn.q_norm.w, blocks.0.attn.k_norm.w, ")
    assert said[1].endswith("an MLP's own LayerNorm or MoE experts)") and "grouped-query" not in said[1]


def test_induction_load_refuses_a_path_with_a_variant(tmp_path):
    induction.save(induction.load(), tmp_path / "m")
    with pytest.raises(ValueError, match="either variant= .* or path="):
        induction.load(variant="redundant", path=tmp_path / "m")
