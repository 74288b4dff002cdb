"""Review 4 of the analyses' text: top_samples' context joins token strings as they are,
Decomposition's repr says what a plain module's sample is, and PatchingComparison's repr is
one line instead of its whole tables."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import l3d_lens
from l3d_lens.analysis.impact import context_text
from l3d_lens.patching import PatchingComparison, compare_with_patching, default_l3d_config
from l3d_lens.zoo import induction

from .helpers import LM_KINDS, TinyMLP, tiny_lm, tokens

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:the last epoch.s reconstruction loss")

BPE = ["Hel", "lo", " world", ",", " un", "believ", "able"]


def bpe_to_str(ids: torch.Tensor) -> list[str]:
    """Token strings as a GPT-2 tokenizer gives them: subwords, and a word's own leading space."""
    return [BPE[i % len(BPE)] for i in ids.reshape(-1).tolist()]


def lm_dec(sample: str = "token"):
    model = tiny_lm(LM_KINDS[0])
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=2, rank=1, epochs=1, batch_size=8,
                             dtype="float64", sample=sample)
    return l3d_lens.decompose(model, tokens(8, 6), cfg, progress=False)


# --- 1. top_samples' context --------------------------------------------------------------------

def test_top_samples_context_joins_subword_tokens_as_they_are():
    """" ".join split words and doubled the spaces: 'Hel lo  world ,  un believ able'."""
    assert context_text(torch.arange(7), bpe_to_str) == "Hello world, unbelievable"
    dec = lm_dec()
    x = (torch.arange(36) % 7).reshape(6, 6)
    top = dec.top_samples(x, 0, k=3, context=6, to_str=bpe_to_str)
    for row in top.itertuples():
        ids = x[row.sequence, max(0, row.position - 5): row.position + 1]
        assert row.context == "".join(bpe_to_str(ids))
        assert "  " not in row.context and "Hel lo" not in row.context


def test_top_samples_context_of_the_zoo_words_has_one_space_between_words():
    """``induction.to_str_words`` gives each word its leading space, as a tokenizer would."""
    dec = lm_dec()
    x = tokens(6, 6, seed=3)
    top = dec.top_samples(x, 1, k=4, context=4, to_str=induction.to_str_words)
    for row in top.itertuples():
        ids = x[row.sequence, max(0, row.position - 3): row.position + 1]
        bare = induction.to_str_tokens(ids)
        assert "  " not in row.context
        assert row.context.split() == [w for w in bare if w]


def test_top_samples_context_of_raw_ids_keeps_a_space_between_them():
    dec = lm_dec()
    x = tokens(6, 6, seed=3)
    top = dec.top_samples(x, 0, k=3, context=3)
    for row in top.itertuples():
        ids = x[row.sequence, max(0, row.position - 2): row.position + 1]
        assert row.context == " ".join(str(i) for i in ids.tolist())


# --- 2. Decomposition's repr ---------------------------------------------------------------------

def test_repr_of_a_plain_module_decomposition_says_a_sample_is_a_row():
    """Its config reads sample='sequence', but a plain module has no sequences: each row of
    its input is a sample."""
    x = torch.rand(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dec = l3d_lens.decompose(TinyMLP(), x, l3d_lens.L3DConfig(components=["fc1"], n_subnetworks=2, rank=1, epochs=1,
                                                               dtype="float64"), progress=False)
    text = repr(dec)
    assert "sample=row" in text and "sequence" not in text
    assert text.startswith("Decomposition(2 subnetworks of ") and "loss=" in text


def test_repr_of_a_language_model_decomposition_names_its_sample_setting():
    assert "sample='token'" in repr(lm_dec("token"))
    assert "sample='sequence'" in repr(lm_dec("sequence"))


# --- 3. PatchingComparison's repr ----------------------------------------------------------------

def by_hand() -> PatchingComparison:
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "patching": [0.5, -0.1, 0.0, 0.3],
                          "attribution": [0.4, -0.2, 0.0, 0.3], "l3d": [0.9, 0.1, 0.0, 0.2],
                          "l3d_share": [0.5, 0.2, 0.1, 0.2], "rank_patching": [1.0, 3.0, 4.0, 2.0],
                          "rank_attribution": [1.0, 3.0, 4.0, 2.0], "rank_l3d": [1.0, 3.0, 4.0, 2.0]})
    agreement = pd.DataFrame([
        {"level": "head", "method_a": "patching", "method_b": "attribution", "spearman": 0.8, "top_k": 2,
         "top_k_overlap": 1.0, "top_k_chance": 0.5},
        {"level": "head", "method_a": "patching", "method_b": "l3d", "spearman": 0.4, "top_k": 2,
         "top_k_overlap": 0.5, "top_k_chance": 0.5},
        {"level": "head", "method_a": "attribution", "method_b": "l3d", "spearman": 0.4, "top_k": 2,
         "top_k_overlap": 0.5, "top_k_chance": 0.5}])
    return PatchingComparison(heads=heads, mlp=None, neurons=None, agreement=agreement,
                              auroc={"patching": 1.0, "attribution": 1.0, "l3d": 0.75, "l3d_share": 0.5},
                              metric_clean=2.5, metric_corrupted=-1.25, direction="noise", top_k=2, noise_floor=0.01)


def test_patching_comparison_repr_is_one_line_of_its_headline_numbers():
    """The dataclass repr printed every DataFrame whole (heads, agreement, ...)."""
    res = by_hand()
    text = repr(res)
    assert "\n" not in text and len(text) < 400
    assert "rank_patching" not in text and "l3d_share  " not in text  # no table
    assert text.startswith("PatchingComparison(direction='noise'; ")
    assert "metric clean 2.5, corrupted -1.25" in text and "4 heads" in text and "top_k=2" in text
    assert "head attribution rho 0.800, top-2 overlap 1.000 (chance 0.500)" in text
    assert "head l3d rho 0.400, top-2 overlap 0.500 (chance 0.500)" in text
    assert "AUROC patching 1.000, attribution 1.000, l3d 0.750, l3d_share 0.500" in text


def test_patching_comparison_keeps_its_fields_and_summary():
    res = by_hand()
    assert res.heads is not None and len(res.heads) == 4 and res.mlp is None and len(res.agreement) == 3
    summary = res.summary()
    assert "rank_patching" in summary and summary.startswith("metric clean 2.5000, corrupted -1.2500")
    assert repr(res) not in summary


def test_patching_comparison_repr_of_a_real_comparison():
    model = tiny_lm(LM_KINDS[0])
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 20, (6, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, :3] = torch.randint(0, 20, (6, 3), generator=g)

    def metric(logits):
        return logits[:, -1, 3].mean() - logits[:, -1, 7].mean()

    res = compare_with_patching(model, clean, corrupted, metric, cfg=default_l3d_config(model, 4, epochs=1, mlp=True),
                                heads=True, mlp=True, top_k=2)
    text = repr(res)
    assert "\n" not in text and "4 heads + 2 MLP layers" in text
    assert "head l3d rho" in text and "mlp attribution rho" in text
