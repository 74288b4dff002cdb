"""End to end: decompose() on every adapter kind, reproducibility, the user's model left
exactly as it was, saving and loading, and bad input rejected before any work."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import l3d_lens
from l3d_lens import Decomposition, L3DConfig, decompose

from .helpers import TinyMLP, tiny_lm, tokens


def cfg(**kw):
    base = dict(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=4, rank=2, epochs=3, batch_size=8,
                lr=0.02, lr_step=2)
    base.update(kw)
    return L3DConfig(**base)


def snapshot(model):
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, hooks


def assert_untouched(model, before, training):
    before, hooks = before
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a weight changed"
    if hasattr(model, "hook_dict"):
        assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())
    assert hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                     for m in model.modules()], "a hook was left behind"
    assert model.training == training


@pytest.mark.parametrize("sample", ["token", "sequence"])
def test_decompose_end_to_end(lm_kind, sample):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    model.train()
    before = snapshot(model)
    data = tokens(24, 6)
    dec = decompose(model, data, cfg(sample=sample), progress=False)
    assert_untouched(model, before, training=True)
    subs, encs = dec.subnetworks(), dec.encoders()
    assert list(subs) == dec.weight_names and list(encs) == dec.weight_names
    assert subs["blocks.0.attn.W_Q"].shape == (4, 2, 16, 8) and subs["blocks.1.mlp.W_out"].shape == (4, 32, 16)
    norms = sum(v.reshape(4, -1).pow(2).sum(1) for v in subs.values()).sqrt()
    assert torch.allclose(norms, torch.ones(4), atol=1e-5)
    assert len(dec.history) == 3 and dec.history[-1]["steps"] == 9
    assert [h["lr"] for h in dec.history] == pytest.approx([0.02, 0.02, 0.016])
    p_act = dec.fraction_active
    assert p_act.shape == (4,) and ((p_act >= 0) & (p_act <= 1)).all()
    assert dec.history[-1]["n_dead"] == int((p_act == 0).sum())
    n_samples = 24 * 6 if sample == "token" else 24
    coef = dec.coefficients(data)
    assert coef.shape == (n_samples, 4) and torch.isfinite(coef).all()
    err = dec.reconstruction_error(data)
    assert 0 <= err <= 1.5
    assert dec.reconstruction_error(data) == err  # references drawn from the same seed
    assert_untouched(model, before, training=True)


def test_training_reduces_the_loss(lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    data = tokens(32, 6)
    dec = decompose(model, data, cfg(epochs=8, components="blocks.1.attn", top_k=0.5), progress=False)
    assert dec.history[-1]["loss"] < dec.history[0]["loss"] - 0.05


def test_same_seed_bit_identical_other_seed_differs(lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    data = tokens(16, 6)
    a = decompose(model, data, cfg(), progress=False)
    b = decompose(model, data, cfg(), progress=False)
    c = decompose(model, data, cfg(seed=1), progress=False)
    assert all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)
    assert a.history == b.history
    assert not torch.equal(a.factors["out/blocks.0.attn.W_Q/core"], c.factors["out/blocks.0.attn.W_Q/core"])


def test_paired_reference_is_deterministic(lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    clean, corrupted = tokens(8, 6, seed=1), tokens(8, 6, seed=2)
    dec = decompose(model, clean, cfg(reference="paired", top_k=1.0, sample="sequence"), reference=corrupted,
                    progress=False)
    c1 = dec.coefficients(clean, corrupted, seed=1)
    c2 = dec.coefficients(clean, corrupted, seed=2)
    assert torch.equal(c1, c2)
    with pytest.raises(ValueError, match="needs reference data"):
        dec.coefficients(clean)


def test_random_reference_never_self():
    from l3d_lens.references import draw_partners

    g = torch.Generator().manual_seed(0)
    partners = torch.stack([draw_partners(5, g) for _ in range(2000)])
    assert not (partners == torch.arange(5)).any()
    counts = torch.bincount(partners[:, 0], minlength=5)[1:]
    assert counts.min() > 400  # roughly uniform over the 4 others (500 expected each)


def test_iterable_of_batches_and_module_model():
    model = TinyMLP(dtype=torch.float32)
    before = snapshot(model)
    x = torch.rand(40, 5)
    batches = [x[i : i + 10] for i in range(0, 40, 10)]
    dec = decompose(model, batches, L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=2),
                    progress=False)
    assert dec.cfg.sample == "sequence" and dec.cfg.divergence == "mse"
    assert dec.coefficients(x).shape == (40, 3)
    assert_untouched(model, before, training=True)


def test_save_load_round_trip(tmp_path, lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    data = tokens(16, 6)
    dec = decompose(model, data, cfg(components=["blocks.0.attn[1]", "blocks.1.mlp.W_in"]), progress=False)
    dec.save(tmp_path / "dec")
    files = sorted(p.name for p in (tmp_path / "dec").iterdir())
    assert files == ["decomposition.json", "factors.safetensors"]
    meta = json.loads((tmp_path / "dec" / "decomposition.json").read_text())
    assert {"l3d_lens", "transformer_lens", "torch"} <= set(meta["versions"])
    loaded = Decomposition.load(tmp_path / "dec", model)
    assert loaded.cfg == dec.cfg and loaded.history == dec.history
    assert torch.equal(loaded.coefficients(data), dec.coefficients(data))
    other = tiny_lm(lm_kind, dtype=torch.float32, seed=5)
    with pytest.raises(ValueError, match="weights differ"):
        Decomposition.load(tmp_path / "dec", other)
    assert Decomposition.load(tmp_path / "dec", other, check_weights=False).n_subnetworks == 4
    bigger = tiny_lm(lm_kind, dtype=torch.float32, d_mlp=40)
    with pytest.raises(ValueError, match="shapes differ"):
        Decomposition.load(tmp_path / "dec", bigger, check_weights=False)
    one_layer = tiny_lm(lm_kind, dtype=torch.float32, n_layers=1)
    with pytest.raises(ValueError, match="does not fit this model"):
        Decomposition.load(tmp_path / "dec", one_layer)
    with pytest.raises(FileNotFoundError, match="not a saved decomposition"):
        Decomposition.load(tmp_path, model)


@pytest.mark.parametrize("data, error, match", [
    (torch.rand(4, 6), TypeError, "must hold token ids"),
    (torch.zeros(4, 6, 2, dtype=torch.long), ValueError, r"shape \[n, seq\]"),
    (torch.zeros(4, 9, dtype=torch.long), ValueError, "longer than the model's n_ctx=8"),
    (torch.zeros(0, 6, dtype=torch.long), ValueError, "is empty"),
    (torch.full((4, 6), 20), ValueError, r"outside \[0, 20\)"),
    (iter([torch.zeros(4, 6, dtype=torch.long)]), TypeError, "one-shot iterator"),
    ([], ValueError, "yields no batch"),
    ("some text", TypeError, "must be a tensor or an iterable"),
])
def test_bad_data(lm_kind, data, error, match):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        decompose(model, data, cfg(), progress=False)
    assert_untouched(model, before, training=False)


def test_bad_settings_fail_before_training(lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    data = tokens(8, 6)
    with pytest.raises(ValueError, match="rank 500 is above every dimension"):
        decompose(model, data, cfg(rank=500), progress=False)
    with pytest.raises(ValueError, match=r"rank given for \['blocks.9.attn.W_Q'\]"):
        decompose(model, data, cfg(rank={"blocks.9.attn.W_Q": 2}), progress=False)
    with pytest.raises(ValueError, match="rank 9 for mode 0 \\(head\\) of blocks.0.attn.W_Q is above its size 2"):
        decompose(model, data, cfg(rank={"blocks.0.attn.W_Q": (9, 2, 2), "default": 2}), progress=False)
    with pytest.raises(ValueError, match="needs reference data"):
        decompose(model, data, cfg(reference="paired"), progress=False)
    with pytest.raises(ValueError, match="they must match"):
        decompose(model, data, cfg(reference="paired"), reference=tokens(8, 5), progress=False)
    with pytest.raises(ValueError, match="set reference='paired'"):
        decompose(model, data, cfg(), reference=data, progress=False)
    with pytest.raises(TypeError, match="cfg must be an l3d_lens.L3DConfig"):
        decompose(model, data, {"components": "blocks.0"}, progress=False)
    with pytest.raises(ValueError, match="needs a language model"):
        decompose(TinyMLP(), torch.rand(8, 5), L3DConfig(components="fc1", sample="token"), progress=False)


def test_non_finite_gradient_names_weight_and_step():
    model = TinyMLP(dtype=torch.float32)
    before = snapshot(model)
    x = torch.rand(20, 5)
    batches = [x[:10], torch.cat([x[10:19], torch.full((1, 5), float("inf"))])]
    with pytest.raises(FloatingPointError, match=r"for weight fc1.weight at step 1 \(epoch 0\)"):
        decompose(model, batches, L3DConfig(components=["fc1", "fc2"], n_subnetworks=2, rank=1, epochs=1),
                  progress=False)
    assert_untouched(model, before, training=True)


def test_model_restored_when_the_divergence_raises(lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float32)
    model.train()
    before = snapshot(model)
    calls = []

    def divergence(out, ref):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return ((out - ref) ** 2).sum(-1)

    with pytest.raises(RuntimeError, match="boom"):
        decompose(model, tokens(16, 6), cfg(divergence=divergence), progress=False)
    assert_untouched(model, before, training=True)


def test_custom_divergence_is_needed_to_load(tmp_path):
    model = TinyMLP(dtype=torch.float32)

    def l1ish(out, ref):
        return (out - ref).pow(2).sum(-1).sqrt()

    dec = decompose(model, torch.rand(16, 5), L3DConfig(components="fc2", n_subnetworks=2, rank=1, epochs=1,
                                                        divergence=l1ish), progress=False)
    dec.save(tmp_path / "d")
    with pytest.raises(ValueError, match="custom divergence .*l1ish.*pass it again"):
        Decomposition.load(tmp_path / "d", model)
    assert Decomposition.load(tmp_path / "d", model, divergence=l1ish).cfg.divergence is l1ish


def test_public_api_names():
    assert {"L3DConfig", "decompose", "Decomposition"} <= set(l3d_lens.__all__)


@pytest.mark.slow  # about 30 s; CI runs it (.ci/run: pytest -m slow)
def test_aux_loss_revives_dead_subnetworks():
    """16 subnetworks at k = 0.05 on the induction model's tokens: more than half die without the
    AuxK loss, which brings most of them back."""
    from l3d_lens.zoo import induction

    model = induction.load()
    data = induction.repeated_sequences(256, seed=1)
    base = L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=16, rank=2, top_k=0.05, epochs=6,
                     batch_size=32, lr=0.02, lr_step=4, include_biases=False, dead_steps=8, sample="token")
    plain = decompose(model, data, base, progress=False)
    revived = decompose(model, data, base.replace(aux_coef=0.25), progress=False)
    assert plain.history[-1]["n_dead"] >= 8
    assert revived.history[-1]["n_dead"] <= plain.history[-1]["n_dead"] - 3
    # the aux loss only starts once subnetworks have been dead for dead_steps steps
    assert revived.history[0] == plain.history[0]
    # aux_epochs=2: identical to the full AuxK run for two epochs, then different (a cheaper
    # run: 96 sequences, 3 steps per epoch, dead after 2 steps)
    few, short = data[:96], base.replace(aux_coef=0.25, epochs=4, dead_steps=2)
    warm = decompose(model, few, short.replace(aux_epochs=2), progress=False)
    full = decompose(model, few, short, progress=False)
    assert warm.history[:2] == full.history[:2] and warm.history[2:] != full.history[2:]
    with pytest.raises(ValueError, match="aux_epochs must be None"):
        base.replace(aux_epochs=0)


def test_position_is_checked_against_the_sequences_before_training(lm_kind):
    """position=25 on sequences of 25 tokens used to raise a bare IndexError at the first step,
    and a position given with sample='token' was silently ignored."""
    model, x = tiny_lm(lm_kind), tokens(4, 5)
    base = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, sample="sequence",
                              reference="uniform")
    for bad in (5, -6):
        with pytest.raises(ValueError, match=rf"position={bad} is outside the sequences of length 5; choose one of "
                                             r"-5..4 \(-1: the last token\) or 'all'"):
            l3d_lens.decompose(model, x, base.replace(position=bad), progress=False)
    dec = l3d_lens.decompose(model, x, base.replace(position=-5), progress=False)  # the first token: in range
    with pytest.raises(ValueError, match="position=-5 is outside the sequences of length 3"):
        dec.coefficients(x[:, :3])  # and later data is checked too
    with pytest.raises(ValueError, match=r"position=2 applies to sample='sequence' only"):
        l3d_lens.decompose(model, x, base.replace(sample="token", position=2), progress=False)


def test_a_last_row_alone_against_the_batch_mean_joins_the_batch_before():
    """33 rows in batches of 8 left a last batch of 1, whose mean reference is the row itself:
    every gradient zero, the loss 0/0, and every factor NaN from the next step on."""
    model, x = TinyMLP(), torch.rand(33, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=3, batch_size=8, reference="mean")
    dec = decompose(model, x, cfg, progress=False)
    assert all(torch.isfinite(v).all() for v in dec.factors.values())
    assert all(math.isfinite(h["loss"]) for h in dec.history)


def test_a_small_batch_of_an_iterable_joins_the_one_before():
    """Iterables got no merging: a stream ending in one row with reference='random' failed after
    the other batches had trained."""
    from l3d_lens.adapters import make_adapter
    from l3d_lens.data import batches

    model = TinyMLP()
    x = torch.rand(13, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stream = [x[:4], x[4:8], x[8:12], x[12:]]
    sizes = [b.shape[0] for b, _ in batches(make_adapter(model), stream, None, 4, min_batch=2)]
    assert sizes == [4, 4, 5]
    assert [b.shape[0] for b, _ in batches(make_adapter(model), stream, None, 4, min_batch=2, skip=2)] == [5]
    cfg = L3DConfig(components=["fc1"], n_subnetworks=2, rank=1, epochs=1, reference="random")
    stream_run = decompose(model, stream, cfg.replace(batch_size=4), progress=False)  # raised on the last batch
    assert all(torch.isfinite(v).all() for v in stream_run.factors.values())


def test_a_remedy_that_can_never_act_is_named():
    """Resampling at epoch 1 after 4 steps with dead_steps=20 resampled nothing, silently; an
    aux loss whose window ends before dead_steps steps never applied, silently."""
    model, x = TinyMLP(), torch.rand(32, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = L3DConfig(components=["fc1", "fc2"], n_subnetworks=3, rank=1, epochs=3, batch_size=8)
    with pytest.warns(UserWarning, match=r"resampling at epoch 1 comes after 4 steps, fewer than dead_steps=20"):
        decompose(model, x, base.replace(resample_epochs=(1,)), progress=False)
    with pytest.warns(UserWarning, match=r"aux_coef=0.1 never applied: its 8 steps .* raise aux_epochs"):
        decompose(model, x, base.replace(aux_coef=0.1, aux_epochs=2), progress=False)
    with pytest.warns(UserWarning, match=r"its 12 steps .* raise epochs"):
        decompose(model, x, base.replace(aux_coef=0.1), progress=False)
    with warnings.catch_warnings():  # one step more than dead_steps, and a resampling just late enough
        warnings.simplefilter("error")
        decompose(model, x, base.replace(aux_coef=0.1, dead_steps=11), progress=False)
        decompose(model, x, base.replace(resample_epochs=(2,), dead_steps=8), progress=False)


def test_a_later_stream_batch_unlike_the_first_is_named(lm_kind):
    """Only a stream's first batch was checked: a float64 or wider batch later failed inside
    F.linear mid-run, and a small last batch of other sequences failed inside torch.cat."""
    model = TinyMLP(dtype=torch.float32)
    x = torch.rand(24, 5, generator=torch.Generator().manual_seed(0))
    cfg = L3DConfig(components=["fc1"], n_subnetworks=2, rank=1, epochs=1, batch_size=8)
    with pytest.raises(ValueError, match=r"batch 1 of the data is torch.float64 of shape \(8, 5\), unlike the first "
                                         r"batch \(torch.float32, shape \(8, 5\)\)"):
        decompose(model, [x[:8], x[8:16].double(), x[16:]], cfg, progress=False)
    with pytest.raises(ValueError, match=r"batch 2 of the data is torch.float32 of shape \(8, 6\)"):
        decompose(model, [x[:8], x[8:16], torch.rand(8, 6)], cfg, progress=False)
    lm, t = tiny_lm(lm_kind), tokens(9, 6)
    lm_cfg = L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, sample="sequence")
    with pytest.raises(ValueError, match=r"batch 1 of the data \(1 rows\) and the batch before \(8\) must join, as "
                                         r"one has fewer than the 2 rows a batch needs, but their shapes differ: "
                                         r"\(1, 4\) and \(8, 6\)"):
        decompose(lm, [t[:8], t[8:, :4]], lm_cfg, progress=False)
    run = decompose(lm, [t[:4], t[4:, :4]], lm_cfg, progress=False)  # other lengths in batches of their own
    assert run.history[-1]["steps"] == 2
