"""A fractional rank is a fraction of each dimension of a weight as the model stores it (the
paper's "25 for 256"): an attention weight's n_heads * d_head is one dimension, so rank 0.1 of
W_Q holds every d_model x n_heads*d_head matrix of that rank, where a fraction of each
TransformerLens mode gave head rank 1 (every head of a subnetwork one matrix scaled). Saves and
checkpoints of the earlier rule load and resume as they were computed."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import l3d_lens
from l3d_lens import training
from l3d_lens.adapters import make_adapter
from l3d_lens.selection import select
from l3d_lens.subnetworks import resolve_ranks
from l3d_lens.zoo import induction

from .helpers import tiny_lm, tokens
from .test_checkpoint_review2 import interrupted, same

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:the last epoch.s reconstruction loss")


def mode_rank(t: torch.Tensor, m: int) -> int:
    return int(torch.linalg.matrix_rank(t.movedim(m, 0).reshape(t.shape[m], -1).double()))


@pytest.fixture(scope="module")
def selected():
    return select(make_adapter(induction.load()), ("blocks.0.attn", "blocks.1.attn[1]"), True)


def test_a_fraction_of_an_attention_weight_is_one_of_its_stored_dimensions(selected):
    ranks = resolve_ranks(selected, 0.1)
    assert ranks["blocks.0.attn.W_Q"] == (4, 7, 16)  # [4 heads, 64, 16]: 0.1 of 64 and of 4*16 is 7
    assert ranks["blocks.0.attn.W_O"] == (4, 16, 7)
    assert ranks["blocks.0.attn.b_Q"] == (4, 4)  # a vector of 64 as the model stores it: any vector
    assert ranks["blocks.1.attn.W_Q"] == (1, 2, 2)  # one head: [64, 16] stored, ranks 7 and 2
    assert resolve_ranks(selected, 0.1, rule=1)["blocks.0.attn.W_Q"] == (1, 2, 2)


def wide():
    """n_heads * d_head (64) above d_model (32), as Gemma-7B and Qwen3 have."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(n_layers=1, d_model=32, n_heads=8, d_head=8, d_vocab=20, n_ctx=8, attn_only=True,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    return select(make_adapter(TransformerBridge.boot_native(cfg)), ("blocks.0.attn",), True)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("model", ["induction", "wide", "heads"])
def test_every_stored_matrix_of_the_fractions_rank_fits_the_tucker_ranks(selected, fraction, model):
    """A random d_model x n_heads*d_head matrix of rank min(ceil(fraction * d_model),
    ceil(fraction * n_heads*d_head)), laid out as the TransformerLens tensor, has mode ranks
    within the resolved ones (so a subnetwork can be it), and no rank is larger than such
    matrices need: the d_model rank of two heads of four was ceil(fraction * d_model), so a
    subnetwork of them could be a matrix of up to that rank."""
    if model == "wide":
        selected = wide()
    if model == "heads":  # two of four heads: n_heads*d_head 32 below d_model 64
        selected = select(make_adapter(induction.load()), ("blocks.1.attn[0,2]",), True)
    gen = torch.Generator().manual_seed(0)
    for s in selected:
        if "head" not in s.site.modes or len(s.shape) != 3:
            continue
        ranks = resolve_ranks(selected, fraction)[s.name]
        h, dh = s.shape[s.site.modes.index("head")], s.shape[s.site.modes.index("d_head")]
        d_model = s.shape[s.site.modes.index("d_model")]
        r = min(math.ceil(fraction * d_model), math.ceil(fraction * h * dh))
        assert ranks[s.site.modes.index("head")] == min(h, r * dh)
        assert ranks[s.site.modes.index("d_head")] == min(dh, r * h)
        assert ranks[s.site.modes.index("d_model")] == r
        for _ in range(3):
            matrix = torch.randn(d_model, r, generator=gen, dtype=torch.float64) @ torch.randn(
                r, h * dh, generator=gen, dtype=torch.float64)
            t = matrix.reshape(d_model, h, dh).permute(1, 0, 2)  # [head, d_model, d_head]
            if s.site.modes == ("head", "d_head", "d_model"):
                t = t.permute(0, 2, 1)
            assert all(mode_rank(t, m) <= ranks[m] for m in range(3)), (s.name, ranks)


def test_a_subnetwork_of_the_default_rank_can_use_two_heads_differently():
    model = tiny_lm("bridge", n_layers=1, attn_only=True)
    x = tokens(16, 6)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn.W_Q"], n_subnetworks=2, epochs=1, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = l3d_lens.decompose(model, x, cfg, progress=False)
    v = dec.subnetworks()["blocks.0.attn.W_Q"][0]  # [2 heads, 16, 8]
    assert mode_rank(v, 0) == 2  # the two heads' matrices are not one matrix scaled


def earlier(monkeypatch):
    """Training as an l3d_lens before rule 2 read a fractional rank."""
    monkeypatch.setattr(training, "resolve_ranks", lambda selected, rank, rule=1: resolve_ranks(selected, rank, 1))


def test_a_save_of_the_earlier_rule_loads_as_it_was_computed(tmp_path, monkeypatch):
    model = tiny_lm("bridge", n_layers=1, attn_only=True)
    x = tokens(16, 6)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=2, epochs=1, batch_size=8)
    earlier(monkeypatch)
    dec = l3d_lens.decompose(model, x, cfg, progress=False)
    monkeypatch.undo()
    old = resolve_ranks(dec._task.selected, 0.1, rule=1)["blocks.0.attn.W_Q"]
    assert dec.factors["out/blocks.0.attn.W_Q/core"].shape[1:] == old != resolve_ranks(dec._task.selected, 0.1)[
        "blocks.0.attn.W_Q"]
    dec.save(tmp_path / "d")
    loaded = l3d_lens.Decomposition.load(tmp_path / "d", model)
    assert same(loaded, dec)
    assert torch.equal(loaded.coefficients(x[:2]), dec.coefficients(x[:2]))


def test_a_checkpoint_of_the_earlier_rule_resumes_with_its_ranks(tmp_path, monkeypatch):
    model = tiny_lm("bridge", n_layers=1, attn_only=True)
    x = tokens(16, 6)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=2, epochs=2, batch_size=8,
                             resample_epochs=(1,))
    earlier(monkeypatch)
    whole = l3d_lens.decompose(model, x, cfg, progress=False)
    interrupted(monkeypatch, model, x, cfg, tmp_path, at=3)  # then undoes every patch, the earlier rule too
    resumed = l3d_lens.decompose(model, x, cfg, progress=False, checkpoint=tmp_path)
    assert same(resumed, whole)
    fresh = l3d_lens.decompose(model, x, cfg, progress=False)
    assert fresh.factors["out/blocks.0.attn.W_Q/core"].shape != whole.factors["out/blocks.0.attn.W_Q/core"].shape
