"""Review fixes for half-precision and mixed-dtype use: the divergences and intervention_curve's
output change ran their log-softmax in bfloat16 (a small KL came out negative about half the
time, and selectivity NaN or 100x off); compare_with_patching's noise floor was below one
rounding step of a bfloat16 metric; the memory estimate left out the factor-dtype copies of
captured activations; a decomposition loaded into a model of another dtype was refused as if its
weights differed; and autocast on a float64 model did nothing, silently (a model already in the
autocast dtype does not warn: on CUDA autocast still runs softmax and norms in float32)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import l3d_lens
from l3d_lens.analysis.impact import output_change
from l3d_lens.decomposition import Decomposition, build_task
from l3d_lens.divergence import kl, target_space
from l3d_lens.memory import estimate
from l3d_lens.patching import resolution

from .helpers import as_earlier_save, tiny_lm, tokens

torch.set_num_threads(1)


def small_change(dtype):
    g = torch.Generator().manual_seed(0)
    before = (4 * torch.randn(64, 50, generator=g)).to(dtype)
    after = (before.double() + 0.02 * torch.randn(64, 50, generator=g, dtype=torch.float64)).to(dtype)
    return before, after


def test_output_change_of_bf16_logits_is_their_kl():
    before, after = small_change(torch.bfloat16)
    got = output_change(before, after, True)
    lp0, lp1 = before.double().log_softmax(-1), after.double().log_softmax(-1)
    want = (lp0.exp() * (lp0 - lp1)).sum(-1)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want.clamp_min(0), rtol=1e-12, atol=0)  # the KL of the bf16 outputs, in float64
    assert (got >= 0).all()


def test_kl_divergence_of_bf16_logits_is_computed_in_float32():
    before, after = small_change(torch.bfloat16)
    ref = target_space(before, "kl")
    got = kl(after, ref)
    lp0, lp1 = before.double().log_softmax(-1), after.double().log_softmax(-1)
    assert ref.dtype == got.dtype == torch.float32
    assert torch.allclose(got.double(), (lp0.exp() * (lp0 - lp1)).sum(-1), rtol=1e-4, atol=1e-6)


def test_float32_and_float64_divergences_are_unchanged():
    for dtype in (torch.float32, torch.float64):
        before, after = small_change(dtype)
        lp0 = before.log_softmax(-1)
        assert torch.equal(target_space(before, "kl"), lp0)
        assert torch.equal(kl(after, lp0), (lp0.exp() * (lp0 - after.log_softmax(-1))).sum(-1))


def test_the_noise_floor_covers_a_bf16_rounding_step():
    assert resolution(torch.bfloat16, -8.0, 1.0) == 8.0 * 2 ** -7
    assert resolution(torch.float32, -8.0, 1.0) == 8.0 * torch.finfo(torch.float32).eps


def task_of(model, dtype="float32", **kw):
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=2, rank=1, epochs=1, batch_size=4,
                             dtype=dtype, **kw)
    return build_task(model, cfg)


def test_the_memory_estimate_counts_the_factor_dtype_copies():
    model = tiny_lm("bridge", dtype=torch.float32)
    same = estimate(task_of(model, "float32"), 8, 6)["captured activations and gradients"]
    wider = estimate(task_of(model, "float64"), 8, 6)["captured activations and gradients"]
    assert wider == 3 * same  # float32 activations (4 bytes) plus their float64 copies (8)


def test_a_decomposition_loads_only_into_a_model_of_its_dtype(tmp_path):
    model = tiny_lm("bridge", dtype=torch.float32)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn"], n_subnetworks=2, rank=1, epochs=1, batch_size=4)
    dec = l3d_lens.decompose(model, tokens(8, 6), cfg, progress=False)
    dec.save(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "decomposition.json").read_text())["model_dtype"] == "float32"
    wide = tiny_lm("bridge", dtype=torch.float32).to(torch.float64)
    with pytest.raises(ValueError, match=r"computed on a float32 model and this one is float64: .*"
                                         r"\(model\.to\(torch\.float32\)\)"):
        Decomposition.load(tmp_path / "d", wide)
    assert Decomposition.load(tmp_path / "d", wide, check_weights=False).n_subnetworks == 2
    meta = json.loads((tmp_path / "d" / "decomposition.json").read_text())
    del meta["model_dtype"]  # as saved before it was recorded
    (tmp_path / "d" / "decomposition.json").write_text(json.dumps(meta))
    as_earlier_save(tmp_path / "d")
    assert Decomposition.load(tmp_path / "d", model).n_subnetworks == 2


@pytest.mark.parametrize("model_dtype, autocast, warns", [(torch.float64, "bf16", True),
                                                           (torch.bfloat16, "bf16", False),  # CUDA: float32 ops
                                                           (torch.float32, "bf16", False),
                                                           (torch.float16, "bf16", False)])
def test_autocast_that_changes_nothing_warns(model_dtype, autocast, warns):
    model = tiny_lm("bridge", dtype=torch.float32).to(model_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task_of(model, autocast=autocast)
    said = [str(w.message) for w in caught if "autocast=" in str(w.message)]
    assert bool(said) == warns
    if warns:
        assert said[0].endswith("the run is the same as with autocast=None")


def test_output_change_of_a_tiny_float32_change_is_its_float64_kl():
    """At delta ~1e-4 a float32 KL cancelled to rounding: negative, and selectivity NaN or < 0."""
    g = torch.Generator().manual_seed(1)
    before = 4 * torch.randn(64, 50, generator=g)
    after = before + 1e-5 * torch.randn(64, 50, generator=g)
    got = output_change(before, after, True)
    lp0, lp1 = before.double().log_softmax(-1), after.double().log_softmax(-1)
    assert torch.allclose(got, (lp0.exp() * (lp0 - lp1)).sum(-1).clamp_min(0), rtol=1e-9, atol=0)
    assert (got > 0).all()
    f32 = (before.log_softmax(-1).exp() * (before.log_softmax(-1) - after.log_softmax(-1))).sum(-1)
    assert (f32 < 0).any()  # what the float32 KL gave: the test exercises the cancellation


def test_the_memory_estimate_counts_the_gram_factor_products():
    """Every block weight with many subnetworks of a high rank: the Gram matrix's [K, K, r, r]
    factor products outweighed the factors and were not counted (measured 0.58x)."""
    from l3d_lens.subnetworks import resolve_ranks

    model = tiny_lm("bridge", dtype=torch.float32)
    cfg = l3d_lens.L3DConfig(components=["blocks.*"], n_subnetworks=6, rank=3, epochs=1, batch_size=4)
    task = build_task(model, cfg)
    ranks = resolve_ranks(task.selected, cfg.rank)
    want = 6 * 6 * 4 * sum(r * r for s in task.selected for r in ranks[s.name])
    assert estimate(task, 8, 6)["Gram matrix factor products"] == want > 0
