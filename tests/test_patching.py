"""compare_with_patching: rank statistics against hand-computed cases, attribution patching
against an exact linearisation, activation patching sanity, bad input rejected before any
work with the model untouched, and circuit recovery on the shipped models (the induction
model and the two-task model) against ground truth identified independently."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

import l3d_lens.decomposition
from l3d_lens import L3DConfig
from l3d_lens.zoo.induction import state_dict_tl
from l3d_lens.patching import (
    auroc,
    compare_with_patching,
    default_l3d_config,
    rankdata,
    spearman,
    top_k_overlap,
)

from .helpers import tiny_lm

# --- rank statistics ------------------------------------------------------------------------


def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_hand_cases_with_ties():
    assert auroc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert auroc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert auroc([1, 1, 0], [1, 0, 0]) == 0.75            # one tie (1/2) and one win
    assert auroc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5       # all tied
    # pos {0.9, 0.8, 0.3}, neg {0.8, 0.3}: 1 + 1 + 1/2 + 1 + 0 + 1/2 = 4 of 6 pairs
    assert auroc([0.9, 0.8, 0.8, 0.3, 0.3], [1, 0, 1, 1, 0]) == pytest.approx(4 / 6)
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 12)
        scores = [rng.randint(0, 4) for _ in range(n)]     # many ties
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels))
    with pytest.raises(ValueError, match="at least one positive"):
        auroc([1, 2], [0, 0])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auroc([1, 2, 3], [0, 1])


def test_rankdata_spearman_topk():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # with ties: ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4] -> Pearson of the ranks
    ra, rb = torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([1.0, 2, 3, 4])
    expected = torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(expected)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # NaN for a constant
    assert top_k_overlap([5, 4, 3, 2], [5, 4, 3, 2], 2) == 1.0
    assert top_k_overlap([5, 4, 3, 2], [2, 3, 4, 5], 2) == 0.0
    assert top_k_overlap([5, 4, 1, 0], [9, 0, 8, 0], 2) == 0.5


# --- tiny models ----------------------------------------------------------------------------


def pairs(n=6, seq=6, d_vocab=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, : seq // 2] = torch.randint(0, d_vocab, (n, seq // 2), generator=g)
    return clean, corrupted


def logit_metric(logits):
    return logits[:, -1, 3].mean() - logits[:, -1, 7].mean() + 0.1 * logits[:, -2].log_softmax(-1)[:, 5].mean()


def run_metric(model, tokens, fwd_hooks=()):
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        return logit_metric(model(tokens)).item()


def cache(model, tokens, names):
    out = {}

    def make(n):
        def hook(act, hook):
            out.setdefault(n, act.detach().clone())
        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        model(tokens)
    return out


def small_cfg(model, n, **kw):
    return default_l3d_config(model, n, epochs=3, **kw)


def snapshot(model):
    torch_hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, torch_hooks


def assert_untouched(model, before, training):
    weights, torch_hooks = before
    after = model.state_dict()
    assert weights.keys() == after.keys()
    assert all(torch.equal(weights[k], after[k]) for k in weights), "a weight changed"
    assert all(not hp.fwd_hooks and not hp.bwd_hooks and not hp._forward_hooks and not hp._backward_hooks
               for hp in model.hook_dict.values()), "a hook was left in model.hook_dict"
    assert torch_hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                           for m in model.modules()], "a torch hook was left behind"
    assert model.training == training and all(m.training == training for m in model.modules())


def test_attribution_is_the_exact_linearisation(lm_kind):
    """Attribution estimate of each unit = d/dalpha metric(base with act <- act + alpha (source -
    base)) at alpha = 0, checked by central finite differences in float64."""
    model = tiny_lm(lm_kind, dtype=torch.float64)
    clean, corrupted = pairs()
    res = compare_with_patching(model, clean, corrupted, logit_metric, cfg=small_cfg(model, 6, mlp=True),
                                heads=True, mlp=True, neurons=[(0, 1), (1, 30)], direction="noise")
    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out",
             "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    base, src = cache(model, clean, names), cache(model, corrupted, names)
    eps = 1e-5

    def derivative(name, index):
        def at(alpha):
            def hook(act, hook):
                act = act.clone()
                act[index] = act[index] + alpha * (src[name][index] - base[name][index])
                return act
            return run_metric(model, clean, [(name, hook)])
        return (at(eps) - at(-eps)) / (2 * eps)

    heads = res.heads.set_index(["layer", "head"])
    for layer, h in itertools.product(range(2), range(2)):
        fd = derivative(f"blocks.{layer}.attn.hook_z", (slice(None), slice(None), h))
        assert heads.loc[(layer, h), "attribution"] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    mlp = res.mlp.set_index("layer")
    for layer in range(2):
        fd = derivative(f"blocks.{layer}.hook_mlp_out", (Ellipsis,))
        assert mlp.loc[layer, "attribution"] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    neurons = res.neurons.set_index(["layer", "neuron"])
    for layer, n in [(0, 1), (1, 30)]:
        fd = derivative(f"blocks.{layer}.mlp.hook_post", (Ellipsis, n))
        assert neurons.loc[(layer, n), "attribution"] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert res.heads["attribution"].abs().max() > 1e-3  # not trivially zero


def test_attribution_equals_patching_when_the_metric_is_linear_in_the_activation(lm_kind):
    """One attention-only layer, no LayerNorm, a logit-difference metric: the metric is affine
    in every head's z, so attribution patching is exact; MLP-free denoising too."""
    model = tiny_lm(lm_kind, dtype=torch.float64, n_layers=1, attn_only=True, normalization=None)

    def metric(logits):
        return logits[:, -1, 3].mean() - logits[:, -1, 7].mean()

    clean, corrupted = pairs(seed=4)
    for direction in ("noise", "denoise"):
        res = compare_with_patching(model, clean, corrupted, metric, cfg=small_cfg(model, 6), direction=direction)
        h = res.heads
        # (TransformerLens collects patched metrics in a float32 tensor: agreement to float32 precision)
        assert torch.allclose(torch.tensor(h["attribution"].values), torch.tensor(h["patching"].values),
                              rtol=1e-6, atol=1e-8)
        assert h["patching"].abs().min() > 1e-4


def test_activation_patching_sane(lm_kind):
    model = tiny_lm(lm_kind, dtype=torch.float64)
    clean, corrupted = pairs(seed=2)   # they differ on the first half only
    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    src_clean = cache(model, clean, names)
    res = compare_with_patching(model, clean, corrupted, logit_metric, cfg=small_cfg(model, 6), direction="denoise")
    m_clean, m_corr = run_metric(model, clean), run_metric(model, corrupted)
    assert res.metric_clean == pytest.approx(m_clean) and res.metric_corrupted == pytest.approx(m_corr)
    # each head's effect: our own single-head patch of the clean z into the corrupted run
    for row in res.heads.itertuples():
        def hook(z, hook, h=row.head, layer=row.layer):
            z = z.clone()
            z[:, :, h] = src_clean[f"blocks.{layer}.attn.hook_z"][:, :, h]
            return z
        patched = run_metric(model, corrupted, [(f"blocks.{row.layer}.attn.hook_z", hook)])
        # the metric's own float64 values (TransformerLens's table of them is float32)
        assert row.patching == pytest.approx(patched - m_corr, rel=1e-12, abs=1e-14)

    # patching every head's clean output (all layers, all positions) recovers the clean metric,
    # whose positions (the last two) carry the same tokens in both runs
    def whole(name):
        return lambda z, hook: src_clean[name]
    assert run_metric(model, corrupted, [(n, whole(n)) for n in names]) == pytest.approx(m_clean, rel=1e-9)
    assert set(res.heads.columns) >= {"layer", "head", "patching", "attribution", "l3d", "rank_patching",
                                      "rank_attribution", "rank_l3d"}
    assert res.auroc is None and res.mlp is None and res.neurons is None


def test_scores_accounting_and_frames(lm_kind):
    """L3D share scores: sum over heads and MLP layers = sum_k mean|c_k| (shares sum to 1 per
    subnetwork over attention and MLP weights); neurons of a layer sum to the layer. L3D effect
    scores: mean_i |sum_k c_ik e_k(u)| from the decomposition's own effects."""
    model = tiny_lm(lm_kind, dtype=torch.float64)
    model.train()
    before = snapshot(model)
    clean, corrupted = pairs(n=8, seed=3)
    res = compare_with_patching(model, clean, corrupted, logit_metric, cfg=small_cfg(model, 8, mlp=True),
                                mlp=True, neurons=True, ground_truth={(np.int64(1), 0)}, top_k=2)  # numpy ints too
    assert_untouched(model, before, training=True)
    dec = res.decomposition
    w = dec.coefficients(corrupted if res.direction == "denoise" else clean,
                         clean if res.direction == "denoise" else corrupted).abs().mean(0).double()
    total = res.heads["l3d_share"].sum() + res.mlp["l3d_share"].sum()
    assert total == pytest.approx(w.sum().item(), rel=1e-6)
    per_layer = res.neurons.groupby("layer")["l3d_share"].sum()
    assert per_layer.values == pytest.approx(res.mlp.set_index("layer").loc[per_layer.index, "l3d_share"].values,
                                             rel=1e-6)
    c = dec.coefficients(corrupted if res.direction == "denoise" else clean,
                         clean if res.direction == "denoise" else corrupted).double()
    e = dec.effects()
    for row in res.heads.itertuples():
        assert row.l3d == pytest.approx((c @ e["heads"][:, row.layer, row.head]).abs().mean().item(), rel=1e-9)
    for row in res.neurons.itertuples():
        assert row.l3d == pytest.approx((c @ e["neurons"][:, row.layer, row.neuron]).abs().mean().item(), rel=1e-9)
    assert res.mlp["l3d"].values == pytest.approx((c @ e["mlp"]).abs().mean(0).numpy(), rel=1e-9)
    assert len(res.heads) == 4 and len(res.mlp) == 2 and len(res.neurons) == 64
    for df in (res.heads, res.mlp, res.neurons):
        for m in ("patching", "attribution", "l3d"):
            ranks = df[f"rank_{m}"]
            assert ranks.min() >= 1 and ranks.max() <= len(df)
            assert ranks.sum() == pytest.approx(len(df) * (len(df) + 1) / 2)
        assert (df["l3d"] >= 0).all()
    assert res.heads["ground_truth"].sum() == 1
    assert set(res.auroc) == {"patching", "attribution", "l3d", "l3d_share"}
    key = res.heads["patching"].abs()
    assert res.auroc["patching"] == pytest.approx(auroc(key.values, res.heads["ground_truth"].values))
    assert list(res.agreement["level"]).count("head") == 3 and list(res.agreement["level"]).count("neuron") == 3
    assert res.agreement["top_k_overlap"].between(0, 1).all()
    units = res.agreement["level"].map({"head": len(res.heads), "mlp": len(res.mlp), "neuron": len(res.neurons)})
    assert (res.agreement["top_k_chance"] == res.agreement["top_k"] / units).all()
    assert "AUROC" in res.summary()


# --- bad input ------------------------------------------------------------------------------


def bad_inputs():
    clean, corrupted = pairs()

    def not_scalar(logits):
        return logits[:, -1, 0]

    def a_float(logits):
        return float(logits[:, -1, 0].mean())

    def argmax_metric(logits):
        return (logits[:, -1].argmax(-1) == 3).float().mean()

    def nan_metric(logits):
        return logits[:, -1, 0].mean() * float("nan")

    layer0 = L3DConfig(components="blocks.0.attn", reference="paired", sample="sequence", top_k=1.0, epochs=1)
    paired_all = L3DConfig(components="blocks.*.attn", reference="paired", top_k=1.0, epochs=1)
    return [
        (dict(corrupted=corrupted[:, :5]), ValueError, "same shape"),
        (dict(corrupted=corrupted[:4]), ValueError, "same shape"),
        (dict(corrupted=clean.clone()), ValueError, "identical"),
        (dict(clean=clean.float()), TypeError, "token ids"),
        (dict(clean=clean + 100), ValueError, "outside"),
        (dict(metric=not_scalar), ValueError, "scalar"),
        (dict(metric=a_float), TypeError, "torch.Tensor"),
        (dict(metric=argmax_metric), ValueError, "differentiable"),
        (dict(metric=nan_metric), ValueError, "finite"),
        (dict(metric="logit_diff"), TypeError, "callable"),
        (dict(heads=[(2, 0)]), ValueError, r"\(layer 2, head 0\) does not exist"),
        (dict(heads=[(0, 5)]), ValueError, "does not exist"),
        (dict(heads=[0, 1]), TypeError, r"pair of ints, got 0 \(one pair goes in a list: \[\(layer, head\)\]\)"),
        (dict(heads=[(0, True)]), TypeError, "pair of ints"),
        (dict(heads=False, mlp=False, neurons=False), ValueError, "nothing to compare"),
        (dict(mlp=[3]), ValueError, "layer 3 does not exist"),
        (dict(neurons=[(0, 32)]), ValueError, "does not exist"),
        (dict(ground_truth={(0, 0), (9, 9)}), ValueError, "does not exist"),
        (dict(ground_truth={(0, 0), (0, 1), (1, 0), (1, 1)}), ValueError, "at least one negative"),
        (dict(heads=[(0, 0), (0, 1)], ground_truth={(1, 1)}), ValueError, "not among the compared"),
        (dict(top_k=2.5), ValueError, "top_k"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(direction="sideways"), ValueError, "direction"),
        (dict(cfg=L3DConfig(components="blocks.*.attn")), ValueError, "reference='paired'"),
        (dict(cfg=layer0), ValueError, "do not cover the output weights \\(W_V or W_O\\) of the heads"),
        (dict(cfg=layer0, heads=[(0, 0), (0, 1)], mlp=True), ValueError, "do not cover the output weights \\(W_out\\) of the MLP"),
        (dict(cfg="default"), TypeError, "L3DConfig"),
        # what decompose refuses before training, refused before the patching sweeps too
        (dict(cfg=paired_all.replace(sample="sequence", position=99)), ValueError, "position=99 is outside"),
        (dict(cfg=paired_all.replace(device="cuda:7")), ValueError, "device='cuda:7'"),
        (dict(cfg=paired_all.replace(n_subnetworks=10**9, rank=1)), MemoryError, "needs about"),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_input_fails_before_any_work(lm_kind, case, monkeypatch):
    import transformer_lens.patching as tl_patching

    kwargs, error, match = bad_inputs()[case]
    model = tiny_lm(lm_kind, dtype=torch.float32)
    model.train()
    before = snapshot(model)
    calls = []
    monkeypatch.setattr(l3d_lens.decomposition, "decompose", lambda *a, **k: calls.append("decompose"))
    monkeypatch.setattr(tl_patching, "generic_activation_patch", lambda *a, **k: calls.append("patch"))
    clean, corrupted = pairs()
    args = dict(clean=clean, corrupted=corrupted, metric=logit_metric)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(error, match=match):
        compare_with_patching(model, args["clean"], args["corrupted"], args["metric"], **kwargs)
    assert calls == [], "expensive work started before the input was rejected"
    assert_untouched(model, before, training=True)


def test_attention_only_model_rejects_mlp_and_plain_modules():
    model = tiny_lm("bridge", attn_only=True)
    clean, corrupted = pairs()
    with pytest.raises(ValueError, match="no MLPs"):
        compare_with_patching(model, clean, corrupted, logit_metric, mlp=True)
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        compare_with_patching(torch.nn.Linear(3, 3), clean, corrupted, logit_metric)


def test_error_midway_leaves_model_untouched(lm_kind):
    """A metric that fails on the 5th call (inside TransformerLens's patching loop, with its
    hooks attached): the error propagates, and mode and hooks are restored."""
    model = tiny_lm(lm_kind, dtype=torch.float32)
    model.train()
    before = snapshot(model)
    n = {"calls": 0}

    def flaky(logits):
        n["calls"] += 1
        if n["calls"] == 5:
            raise RuntimeError("boom")
        return logit_metric(logits)

    clean, corrupted = pairs()
    with pytest.raises(RuntimeError, match="boom"):
        compare_with_patching(model, clean, corrupted, flaky, cfg=small_cfg(model, 6))
    assert n["calls"] == 5
    assert_untouched(model, before, training=True)


def test_a_failing_metric_raises_its_own_exception_with_a_note(lm_kind):
    """The user's exception comes back as it was raised (same type and object; an exception
    class needing constructor arguments used to become a TypeError), with a note saying where."""
    model = tiny_lm(lm_kind, dtype=torch.float32)

    class MetricError(Exception):
        def __init__(self, code, message):
            super().__init__(message)
            self.code = code

    def failing(logits):
        raise MetricError(7, "no such token")

    clean, corrupted = pairs()
    with pytest.raises(MetricError, match="no such token") as info:
        compare_with_patching(model, clean, corrupted, failing, cfg=small_cfg(model, 6))
    assert info.value.code == 7
    assert any("metric failed on the model's logits" in note for note in getattr(info.value, "__notes__", []))


# --- circuit recovery on the shipped models ---------------------------------------------------


def induction_pairs(n=64):
    from l3d_lens.zoo import induction

    H = induction.HALF
    clean = induction.repeated_sequences(n, seed=1)
    corrupted = clean.clone()   # the first half replaced by fresh words: nothing to look back at
    corrupted[:, 1:H + 1] = induction.repeated_sequences(n, seed=2)[:, 1:H + 1]

    def metric(logits):     # mean log-prob of the correct repeated token over the second half
        return logits[:, H:-1].log_softmax(-1).gather(-1, clean[:, H + 1:, None].to(logits.device))[..., 0].mean()

    return clean, corrupted, metric


@pytest.fixture(scope="module")
def induction_result():
    from l3d_lens.zoo import induction

    model = induction.load()
    clean, corrupted, metric = induction_pairs()
    truth, _ = induction.identify_circuit(model)
    return truth, compare_with_patching(model, clean, corrupted, metric, ground_truth=truth, top_k=len(truth),
                                        direction="denoise")


def test_induction_ground_truth(induction_result):
    """The shipped model's circuit, from attention patterns and mean-ablation alone: one
    previous-token head (L0H2) and one induction head (L1H0); every other head writes nothing."""
    from l3d_lens.zoo import induction

    truth, _ = induction_result
    assert truth == {(0, 2), (1, 0)}
    _, table = induction.identify_circuit(induction.load())
    inside = table[table["in circuit"]]
    outside = table[~table["in circuit"]]
    assert (inside["mean-ablation drop (nats)"] > 1.0).all()
    assert (outside["mean-ablation drop (nats)"].abs() < 1e-3).all()
    assert inside.set_index("layer").loc[0, "prev-token attn"] > 0.4
    assert inside.set_index("layer").loc[1, "look-back attn"] > 0.7


def test_induction_patching_ranks_known_heads_first(induction_result):
    """Denoising (clean head outputs into the corrupted run) recovers the circuit."""
    truth, res = induction_result
    h = res.heads
    assert res.auroc["patching"] == 1.0
    assert set(map(tuple, h[h["rank_patching"] <= len(truth)][["layer", "head"]].values.tolist())) == truth
    assert res.auroc["attribution"] >= 0.9
    assert res.metric_clean > -0.2 and res.metric_corrupted < -5


def test_induction_l3d_ranks_known_heads_first(induction_result):
    """Contrastive L3D, read through the heads' outputs (analysis.effects), puts the
    previous-token head and the induction head first."""
    truth, res = induction_result
    h = res.heads
    assert set(map(tuple, h[h["rank_l3d"] <= len(truth)][["layer", "head"]].values.tolist())) == truth
    assert res.auroc["l3d"] == 1.0


def test_unsupervised_l3d_finds_the_induction_circuit():
    """Unsupervised L3D (token mode, random references; the demo's settings, shorter): the
    subnetwork whose |coefficients| concentrate most on the repeated half acts through the
    previous-token and induction heads, by output effect and by where its norm lies."""
    from l3d_lens.patching import auroc
    from l3d_lens.zoo import induction

    H = induction.HALF
    model = induction.load()
    truth, _ = induction.identify_circuit(model)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=8, rank=4, top_k=0.1,
                             sample="token", epochs=6, batch_size=32, lr=0.01, lr_step=3, include_biases=False, seed=0)
    dec = l3d_lens.decompose(model, induction.repeated_sequences(256, seed=0), cfg, progress=False)
    probe = induction.repeated_sequences(64, seed=7)
    coef = dec.coefficients(probe).abs().reshape(64, probe.shape[1], -1)
    ratio = coef[:, H + 1:].mean((0, 1)) / coef[:, 1:H + 1].mean((0, 1))
    k = int(ratio.argmax())
    labels = [(layer, h) in truth for layer in range(2) for h in range(4)]
    assert ratio[k] > 3
    assert auroc(dec.head_effects(as_tensor=True)[k].flatten().tolist(), labels) == 1.0
    assert auroc(dec.head_attribution(as_tensor=True)[k].flatten().tolist(), labels) == 1.0


@pytest.fixture(scope="module")
def two_task_result():
    from l3d_lens.zoo import two_tasks

    model = two_tasks.load()
    clean, corrupted = two_tasks.contrast_pairs(64, "first", seed=1)
    metric = two_tasks.logit_diff_metric(clean, corrupted)
    truth = set(two_tasks.TASK_HEADS["first"])
    return model, compare_with_patching(model, clean, corrupted, metric, ground_truth=truth, top_k=2)


def test_two_tasks_ground_truth_by_ablation(two_task_result):
    from l3d_lens.zoo import two_tasks

    model, _ = two_task_result
    assert two_tasks.evaluate(model, n=256) == pytest.approx({"acc_first": 1.0, "logprob_first": 0.0,
                                                              "acc_last": 1.0, "logprob_last": 0.0}, abs=5e-3)
    ab = two_tasks.head_ablation(model, n=256)
    own, other = ab[ab.in_task_heads], ab[~ab.in_task_heads]
    assert (own.logprob_drop > 0.5).all() and (own.z_rms > 0.2).all()       # each task head matters
    assert (other.logprob_drop.abs() < 0.01).all() and (other.z_rms < 0.01).all()  # the rest is silent


def test_two_tasks_variants_differ_only_in_the_pruned_heads():
    """The default variant is the unpruned one with W_O = 0 on the heads serving neither task:
    every other weight is equal and the answers do not change."""
    from l3d_lens.zoo import two_tasks

    pruned, unpruned = two_tasks.load(), two_tasks.load(variant="unpruned")
    a, b = state_dict_tl(pruned), state_dict_tl(unpruned)
    unused = [h for _, h in two_tasks.UNUSED_HEADS]
    assert unused == [0, 3, 5, 7]
    assert a["blocks.0.attn.W_O"][unused].abs().sum() == 0 and b["blocks.0.attn.W_O"][unused].abs().sum() > 1
    keep = [h for h in range(8) if h not in unused]
    assert torch.equal(a["blocks.0.attn.W_O"][keep], b["blocks.0.attn.W_O"][keep])
    assert all(torch.equal(a[k], b[k]) for k in a if k != "blocks.0.attn.W_O")
    x = two_tasks.sequences(128, "mixed", seed=9)

    def answer_probs(m):
        with torch.no_grad():
            out = m(x)
        return (out if isinstance(out, torch.Tensor) else out.logits)[:, -1].softmax(-1)

    assert (answer_probs(pruned) - answer_probs(unpruned)).abs().max() < 1e-3
    # at the word positions pruning does change the outputs (the unused heads had fitted the
    # unpredictable next word there): the module docstring says so, with this size
    with torch.no_grad():
        lp, lu = (out if isinstance(out := m(x), torch.Tensor) else out.logits for m in (pruned, unpruned))
    kl = (lu[:, :-1].log_softmax(-1).exp() * (lu[:, :-1].log_softmax(-1) - lp[:, :-1].log_softmax(-1))).sum(-1)
    assert 0.4 < kl.mean() < 1.6
    assert torch.equal(state_dict_tl(two_tasks.prune_unused_heads(unpruned))["blocks.0.attn.W_O"],
                       a["blocks.0.attn.W_O"])
    with pytest.raises(ValueError, match=r"variant='pruned'; choose one of \['default', 'unpruned'\]"):
        two_tasks.load(variant="pruned")


def test_unsupervised_l3d_separates_the_two_tasks_onto_their_heads():
    """Token-mode L3D on mixed tasks, the benchmark's settings and seed 0 (512 sequences, 8
    epochs): for each task, the subnetwork with the largest impact at its answer position has
    > 5x that impact on the other task and acts > 50% through the task's own heads (output
    effect, ``head_effects``). BENCHMARKS.md ("Does unsupervised L3D separate the two tasks?"):
    5 of 5 seeds, impact ratio 12-24x, own-head effect share 0.75-0.99."""
    from l3d_lens.zoo import two_tasks

    model = two_tasks.load()
    cfg = L3DConfig(components="blocks.0.attn", n_subnetworks=8, rank=8, top_k=0.05, sample="token",
                    include_biases=False, epochs=8, batch_size=32, lr=0.01, lr_step=2, seed=0)
    dec = l3d_lens.decompose(model, two_tasks.sequences(512, "mixed", seed=3), cfg, progress=False)
    xt = two_tasks.sequences(256, "mixed", seed=4)
    imp = dec.impact(xt, n_references=5)[:, -1]  # answer position: [n, k]
    task = two_tasks.task_ids(xt)
    effect = dec.head_effects(as_tensor=True, share=True)[:, 0]  # [k, heads]
    chosen = []
    for t, name in enumerate(two_tasks.TASKS):
        own = [h for _, h in two_tasks.TASK_HEADS[name]]
        on, off = imp[task == t].mean(0), imp[task != t].mean(0)
        k = int(on.argmax())
        chosen.append(k)
        assert on[k] > 5 * off[k], (name, k, float(on[k] / off[k]))
        assert effect[k, own].sum() > 0.5, (name, k, effect[k].tolist())
    assert chosen[0] != chosen[1]


def test_two_tasks_patching_recovers_the_task_heads(two_task_result):
    _, res = two_task_result
    assert res.auroc["patching"] == 1.0 and res.auroc["attribution"] == 1.0


def test_two_tasks_l3d_recovers_the_task_heads(two_task_result):
    _, res = two_task_result
    h = res.heads
    assert set(map(tuple, h[h["rank_l3d"] <= 2][["layer", "head"]].values.tolist())) == {(0, 1), (0, 4)}
    assert res.auroc["l3d"] == 1.0
