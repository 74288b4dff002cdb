"""Toy models, their data, the ground-truth recovery metrics and a short L3D run on each toy.

The L3D runs are short (tens of epochs on a few hundred samples), so they assert recovery
*well above* what the untrained decomposition (the same run with a vanishing learning rate)
gets on the same metric: a broken gradient, top-k or normalisation would fail them.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import l3d_lens
from l3d_lens import checkpoint
from l3d_lens.toy import data, metrics, models
from l3d_lens.toy.reproduce import evaluate, paper_config, recommended_config
from l3d_lens.toy.sweep import best, best_of, kept_run, sweep
from l3d_lens.toy.train import Toy, fit, fit_best_of, fit_tms, make_toy

from .helpers import process_group

torch.set_num_threads(1)


# --- data ----------------------------------------------------------------------------------

def test_sparse_features_are_seeded_sparse_and_never_all_zero():
    x = data.sparse_features(4000, 5, p_active=0.05, seed=3)
    assert x.shape == (4000, 5)
    assert torch.equal(x, data.sparse_features(4000, 5, p_active=0.05, seed=3))
    assert not torch.equal(x, data.sparse_features(4000, 5, p_active=0.05, seed=4))
    assert (x != 0).any(1).all()
    assert x.min() >= 0 and x.max() <= 1
    # P(active | row not all zero) = 0.05 / (1 - 0.95^5)
    expected = 0.05 / (1 - 0.95 ** 5)
    assert abs((x != 0).double().mean().item() - expected) < 0.02
    s = data.sparse_features(4000, 5, seed=3, signed=True)
    assert s.min() < -0.5 and s.max() > 0.5 and s.abs().max() <= 1


def test_grouped_features_tie_activity_within_groups():
    x = data.grouped_features(3000, 25, 5, seed=1)
    nz = (x != 0).view(3000, 5, 5)
    assert (nz.all(-1) == nz.any(-1)).all()  # a group is either fully active or fully silent
    assert nz.any(-1).any(-1).all()
    with pytest.raises(ValueError):
        data.grouped_features(10, 24, 5)
    single = data.single_feature_rows(x, 5, feature=2)
    assert single.any() and (data.active_features(x, 5)[single].sum(-1) == 1).all()


def test_circuit_matrix_range_and_seed():
    A = data.circuit_matrix(10, 7, seed=2)
    assert A.shape == (7, 10) and A.min() >= 0 and A.max() <= 3
    assert torch.equal(A, data.circuit_matrix(10, 7, seed=2))


# --- models --------------------------------------------------------------------------------

def test_models_are_linear_layers_with_readable_names():
    names = dict(models.tms().named_parameters())
    assert set(names) == {"encoder.weight", "decoder.weight", "decoder.bias"}
    assert names["encoder.weight"].shape == (2, 5)
    assert dict(models.higher_rank().named_parameters())["encoder.weight"].shape == (5, 25)
    sq = models.square_mlp()
    assert [n for n, _ in sq.named_parameters()][:2] == ["layers.0.weight", "layers.0.bias"]
    assert sum(isinstance(m, nn.Linear) for m in sq.modules()) == 5
    assert torch.equal(models.tmcs(4).encoder.weight, models.tmcs(4).encoder.weight)
    x = torch.rand(3, 5)
    assert (models.tms()(x) >= 0).all()


def test_fit_reduces_loss_and_tms_is_returned_untied():
    x = data.sparse_features(1000, 5, seed=0)
    m = models.tmcs(0)
    y = x.repeat(1, 2) @ data.circuit_matrix(10, 10).T
    losses = fit(m, x.repeat(1, 2), y, epochs=15, seed=0)
    assert losses[-1] < 0.7 * losses[0]
    model, tl = fit_tms(x, epochs=6, seed=0, restarts=2, probe_epochs=3)
    assert len(tl) == 6
    assert torch.equal(model.decoder.weight, model.encoder.weight.T)


def test_fit_stops_at_a_failed_check_and_is_unchanged_by_a_passed_one():
    x = data.sparse_features(300, 5, seed=0, signed=True)
    runs = {}
    for name, check in (("plain", None), ("pass", (2, lambda m: True)), ("fail", (2, lambda m: False))):
        model = models.square_mlp(0)
        runs[name] = (model, fit(model, x, x ** 2, epochs=4, seed=1, lr=1e-2, check=check))
    assert runs["pass"][1] == runs["plain"][1] and len(runs["plain"][1]) == 4
    assert all(torch.equal(a, b) for a, b in zip(runs["pass"][0].parameters(), runs["plain"][0].parameters()))
    assert runs["fail"][1] == runs["plain"][1][:2]
    assert not runs["fail"][0].training


def test_fit_checks_after_each_epoch_of_a_collection_and_stops_at_the_first_failure():
    """``check = (epochs, ok)``: ``ok`` sees the model after each listed epoch but the last,
    and training stops at its first failure; one that always passes changes nothing."""
    x = data.sparse_features(300, 5, seed=0, signed=True)
    plain = fit(models.square_mlp(0), x, x ** 2, epochs=4, seed=1, lr=1e-2)
    seen = []

    def ok_until_second(m):
        seen.append(m.training)
        return len(seen) < 2

    model = models.square_mlp(0)
    passed = []
    assert fit(model, x, x ** 2, epochs=4, seed=1, lr=1e-2, check=(range(1, 5), lambda m: passed.append(1) or True)) \
        == plain
    assert len(passed) == 3  # after epochs 1, 2, 3; never after the last
    assert fit(models.square_mlp(0), x, x ** 2, epochs=4, seed=1, lr=1e-2, check=([1, 3], ok_until_second)) \
        == plain[:3]
    assert seen == [False, False]  # checked in eval mode, after epochs 1 and 3


def test_fit_best_of_replaces_a_model_that_fails_the_learned_check():
    x = data.sparse_features(300, 5, seed=0, signed=True)
    build = models.square_mlp
    kw = dict(epochs=2, seed=0, restarts=2, probe_epochs=1, lr=1e-2)
    plain, plain_losses, plain_blocks = fit_best_of(build, x, x ** 2, **kw)
    assert plain_blocks == 1
    # a check the first block's model passes leaves the result bit-identical
    same, same_losses, _ = fit_best_of(build, x, x ** 2, learned=lambda m: True, **kw)
    assert same_losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), same.parameters()))
    # rejecting the first block's model trains a fresh block of starts: other weights
    seen = []
    def learned(m):
        seen.append(m)
        return len(seen) == 2
    other, other_losses, blocks = fit_best_of(build, x, x ** 2, learned=learned, **kw)
    assert other is seen[1] and len(other_losses) == 2 and blocks == 2
    assert not torch.equal(other.layers[0].weight, plain.layers[0].weight)
    # give_up drops the first block's model before ``learned`` sees it, and the second block's
    # model is the one the learned check gave above, bit for bit
    kw3 = dict(kw, epochs=3)
    calls = []
    def give_up(m):
        calls.append(m)
        return len(calls) > 1
    judged = []
    early, early_losses, early_blocks = fit_best_of(build, x, x ** 2, learned=lambda m: judged.append(m) or True,
                                                    give_up=(1, give_up), **kw3)
    late, late_losses, _ = fit_best_of(build, x, x ** 2, learned=learned_second(), **kw3)
    assert early_blocks == 2 and len(calls) == 2 and judged == [early] and early is calls[1]
    assert early_losses == late_losses and len(early_losses) == 3
    assert all(torch.equal(a, b) for a, b in zip(early.parameters(), late.parameters()))
    with pytest.raises(RuntimeError, match="learned check in 3 blocks of 2 starts"):
        fit_best_of(build, x, x ** 2, learned=lambda m: False, **kw)
    for bad in (0, 1.5, "2"):  # a float or a string used to get past (or break on) a bare comparison
        with pytest.raises(ValueError, match="max_blocks must be an integer >= 1"):
            fit_best_of(build, x, x ** 2, learned=lambda m: True, max_blocks=bad, **kw)
    with pytest.raises(ValueError, match="give_up drops a model early that would fail the learned check"):
        fit_best_of(build, x, x ** 2, give_up=(1, lambda m: True), **kw)


def learned_second():
    """A learned check that fails the first model it sees and passes the rest."""
    seen = []
    return lambda m: seen.append(m) or len(seen) > 1


def test_make_toy_checks_that_the_square_model_learned_every_feature(monkeypatch):
    from l3d_lens.toy import train
    checked = []
    monkeypatch.setattr(metrics, "feature_r2", lambda m, x, y: checked.append((x, y)) or [0.4] * 5)
    monkeypatch.setattr(train, "LEARNED_R2", 0.5)
    with pytest.raises(RuntimeError, match="learned check in 3 blocks of 3 starts"):
        make_toy("square", 0, epochs=1, n_train=200, n_l3d=10, n_eval=10)
    assert len(checked) == 3 and all(x.shape == (200, 5) and torch.equal(y, x ** 2) for x, y in checked)
    monkeypatch.setattr(train, "LEARNED_R2", 0.3)
    toy = make_toy("square", 0, epochs=1, n_train=200, n_l3d=10, n_eval=10)
    assert toy.final_loss > 0 and toy.blocks == 1
    # the first block's model fails the check, the second's passes: Toy.blocks records it
    r2 = iter([[0.1] * 5, [0.9] * 5])
    monkeypatch.setattr(metrics, "feature_r2", lambda m, x, y: next(r2))
    assert make_toy("square", 0, epochs=1, n_train=200, n_l3d=10, n_eval=10).blocks == 2
    assert make_toy("tmcs", 0, epochs=1, n_train=200, n_l3d=10, n_eval=10).blocks == 1


def test_make_toy_gives_up_early_on_a_square_model_far_from_learning(monkeypatch):
    """``GIVE_UP``, with the default recipe shortened to 22 epochs (20 of them probes, so the
    kept start is judged after 1 more); another recipe trains every kept start to the end."""
    from l3d_lens.toy import train
    checked = []
    monkeypatch.setattr(metrics, "feature_r2", lambda m, x, y: checked.append((x, y)) or [0.9] * 5)
    monkeypatch.setitem(train.DEFAULT_EPOCHS, "square", 22)
    monkeypatch.setattr(train, "GIVE_UP", (1, 0.95))
    with pytest.raises(RuntimeError, match="learned check in 3 blocks of 3 starts"):
        make_toy("square", 0, n_train=200, n_l3d=10, n_eval=10)
    # three early checks, no learned check (it would have passed 0.9 >= LEARNED_R2)
    assert len(checked) == 3 and all(x.shape == (200, 5) and torch.equal(y, x ** 2) for x, y in checked)
    checked.clear()
    assert len(make_toy("square", 0, lr=1e-3, n_train=200, n_l3d=10, n_eval=10).train_losses) == 22
    assert len(checked) == 1  # the learned check alone
    checked.clear()
    monkeypatch.setattr(train, "GIVE_UP", (1, 0.5))
    toy = make_toy("square", 0, n_train=200, n_l3d=10, n_eval=10)
    assert len(checked) == 2 and toy.blocks == 1 and len(toy.train_losses) == 22


def test_training_data_is_what_make_toy_trains_on():
    """Training a fresh model on ``training_data`` the way ``make_toy`` does (one start, no
    probes, for TMCS and the higher-rank model) gives make_toy's model bit for bit; and the data
    comes from the generators seeded as ``make_toy`` always seeded them (1000 * seed + 1 for the
    training inputs, + 4 for the circuit matrix), so its models stay the runs of record."""
    from l3d_lens.toy.train import LR, RESTARTS, training_data
    for name, build in (("tmcs", models.tmcs), ("higher_rank", models.higher_rank)):
        assert RESTARTS[name] == (1, 0)
        toy = make_toy(name, 2, epochs=1, n_train=200, n_l3d=10, n_eval=10)
        x, y = training_data(name, 2, n_train=200)
        assert torch.equal(y, x @ toy.truth["A"].T) and not torch.equal(x, training_data(name, 3, n_train=200)[0])
        model = build(2)
        fit(model, x, y, epochs=1, lr=LR[name], seed=2)
        mine, theirs = model.state_dict(), toy.model.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x, y = training_data("tmcs", 2, n_train=50)
    assert torch.equal(x, data.sparse_features(50, 10, seed=2001))
    assert torch.equal(y, x @ data.circuit_matrix(10, 10, seed=2004).T)
    x, y = training_data("higher_rank", 2, n_train=50)
    assert torch.equal(x, data.grouped_features(50, 25, 5, seed=2001))
    assert torch.equal(y, x @ data.circuit_matrix(25, 10, seed=2004).T)
    x, y = training_data("square", 2, n_train=50)
    assert torch.equal(x, data.sparse_features(50, 5, seed=2001, signed=True)) and torch.equal(y, x ** 2)
    x, y = training_data("tms", 2, n_train=50)
    assert torch.equal(x, data.sparse_features(50, 5, seed=2001)) and torch.equal(y, x)
    with pytest.raises(ValueError, match="unknown toy model 'sq'; choose one of"):
        training_data("sq")


def test_toy_repr_is_one_line_that_names_the_toy_its_training_and_its_data():
    toy = make_toy("higher_rank", 1, epochs=2, n_train=100, n_l3d=10, n_eval=20)
    text = repr(toy)
    assert toy.seed == 1 and "\n" not in text and len(text) < 300
    assert text == (f"Toy('higher_rank', seed=1: SuperpositionModel trained 2 epochs to MSE {toy.final_loss:.4g} "
                    "(1 block of starts); l3d_data [10, 25], eval_data [20, 25]; truth: A [10, 25], group_size=5)")
    by_hand = Toy("square", models.square_mlp(0), [], torch.zeros(3, 5), torch.zeros(4, 5), lambda n, s: None, {},
                  blocks=2)
    assert repr(by_hand) == ("Toy('square': SquareMLP trained 0 epochs to MSE nan (2 blocks of starts); "
                             "l3d_data [3, 5], eval_data [4, 5]; truth: none)")


def test_make_toy_lr_is_the_training_learning_rate_and_is_validated(monkeypatch):
    from l3d_lens.toy import train
    from l3d_lens.toy.train import LR
    monkeypatch.setattr(train, "LEARNED_R2", -float("inf"))  # one epoch learns nothing; keep the first model
    small = dict(epochs=1, n_train=200, n_l3d=10, n_eval=10)
    # TMS trains through fit_tms, the others through fit_best_of; x^2's default lr is not 1e-3
    for name in ("tms", "tmcs", "square"):
        plain = make_toy(name, 0, **small).model.state_dict()
        same = make_toy(name, 0, lr=LR[name], **small).model.state_dict()
        other = make_toy(name, 0, lr=10 * LR[name], **small).model.state_dict()
        assert all(torch.equal(plain[k], same[k]) for k in plain)
        assert not all(torch.equal(plain[k], other[k]) for k in plain)
    for bad in (0, -1e-3, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            make_toy("tmcs", 0, lr=bad, **small)


class _ScaledSquares(nn.Module):
    """y = scale * x^2, with one scale per output (separate circuits) or one shared scale."""

    def __init__(self, n: int, shared: bool):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1 if shared else n))

    def forward(self, z):
        return self.scale * z ** 2


class _SignedSquares(nn.Module):
    """y_i = a_i relu(x_i)^2 + b_i relu(-x_i)^2: a separate parameter per (feature, sign) circuit."""

    def __init__(self, n: int):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(n)), nn.Parameter(torch.ones(n))

    def forward(self, z):
        return self.a * torch.relu(z) ** 2 + self.b * torch.relu(-z) ** 2


def test_square_reference_matches_the_closed_form_of_a_shared_and_a_separate_scale():
    from l3d_lens.toy.reproduce import square_reference
    x = data.sparse_features(600, 4, seed=3, signed=True)
    sep = square_reference(_ScaledSquares(4, shared=False), x)
    assert min(sep["reference_circuit_selectivity_by_output"]) > 1e6  # moving scale_i changes output i only
    assert sep["sign_alignment"] == pytest.approx([1.0] * 4)
    # one parameter per sign: circuit (i, +) must be scored on x_i > 0 with a_i (swapped, it would
    # change nothing on its own rows); each feature's direction mixes a_i and b_i, still output i only
    signed = square_reference(_SignedSquares(4), x)
    assert signed["reference_circuit_selectivity_by_output_min"] > 1e6
    assert signed["reference_selectivity_by_output_min"] > 1e6
    assert signed["sign_alignment"] == pytest.approx([0.0] * 4, abs=1e-6)
    # one shared scale: moving it by delta changes entry (n, j) by |delta| x_nj^2, so the ratio is
    # mean x_i^2 over the circuit's rows / mean x_j^2 over every row and every other output j
    shared = square_reference(_ScaledSquares(4, shared=True), x)
    sq = (x ** 2).double()
    for name, rows_of in (("reference_selectivity_by_output", lambda i: [x[:, i] != 0]),
                          ("reference_circuit_selectivity_by_output", lambda i: [x[:, i] > 0, x[:, i] < 0])):
        expected = [float(sq[rows, i].mean() / torch.cat([sq[:, :i], sq[:, i + 1:]], 1).mean())
                    for i in range(4) for rows in rows_of(i)]
        assert shared[name] == pytest.approx(expected, rel=1e-4)
        assert shared[name.replace("by_output", "by_output_min")] == pytest.approx(min(expected), rel=1e-4)


def test_feature_r2_scores_each_feature_on_its_own_rows():
    x = data.sparse_features(400, 3, seed=1, signed=True)

    class Partial(nn.Module):  # squares features 0 and 1, outputs a constant for feature 2 (0.25: exact in float32)
        def forward(self, z):
            return torch.cat([z[:, :2] ** 2, torch.full_like(z[:, 2:], 0.25)], 1)

    r2 = metrics.feature_r2(Partial(), x, x ** 2)
    assert r2[:2] == [1.0, 1.0]
    rows = x[:, 2] != 0
    t = (x[rows, 2] ** 2).double()
    assert r2[2] == pytest.approx(float(1 - ((0.25 - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()), rel=1e-12)
    assert r2[2] <= 0


# --- metrics -------------------------------------------------------------------------------

def test_cosine_matrix_ignores_sign_and_scale():
    truth = {"w": torch.eye(3).view(3, 3, 1)}
    subs = {"w": torch.tensor([[0, -2.0, 0], [0.6, 0, 0.8], [0, 0, 1]]).view(3, 3, 1)}
    cos = metrics.cosine_matrix(truth, subs)
    assert torch.allclose(cos, torch.tensor([[0, 0.6, 0], [1.0, 0, 0], [0, 0.8, 1]], dtype=cos.dtype))
    mean, best_ = metrics.mean_max_cosine(truth, subs)
    assert best_.tolist() == pytest.approx([0.6, 1.0, 1.0])
    with pytest.raises(KeyError):
        metrics.cosine_matrix({"v": truth["w"]}, subs)


def test_gradient_directions_match_a_per_sample_autograd_loop_and_the_identity_model():
    """The principal gradient direction per feature equals the one from a plain per-sample
    torch.autograd loop (|cos| 1 to 1e-9 in float64), and for W_in = W_out = I with b = 0,
    where feature i's gradient is exactly along its own W_in column and W_out row, it equals
    ``superposition_directions`` (|cos| 1 to 1e-9); a feature never active alone gets NaN."""
    m = models.tms(1).double()
    x = data.sparse_features(600, 5, seed=2).double()
    names = ["encoder.weight", "decoder.weight"]
    dirs = metrics.gradient_directions(m, x, names)
    assert dirs["encoder.weight"].shape == (5, 2, 5) and dirs["decoder.weight"].shape == (5, 5, 2)
    single = (x != 0).sum(1) == 1
    for i in range(5):
        rows = []
        for xi in x[single & (x[:, i] != 0)]:
            out = m(xi[None])
            gs = torch.autograd.grad(0.5 * out.pow(2).sum(), [m.get_parameter(n) for n in names])
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
        u = torch.linalg.svd(torch.stack(rows), full_matrices=False).Vh[0]
        ours = torch.cat([dirs[n][i].reshape(-1) for n in names])
        assert abs(float(u @ ours)) == pytest.approx(1.0, abs=1e-9)
    eye = models.SuperpositionModel(2, 2, 2).double()
    with torch.no_grad():
        eye.encoder.weight.copy_(torch.eye(2))
        eye.decoder.weight.copy_(torch.eye(2))
        eye.decoder.bias.zero_()
    x2 = data.sparse_features(200, 2, seed=0).double()
    truth = metrics.superposition_directions(eye, decoder_rows=True)
    cos = metrics.cosine_matrix(truth, metrics.gradient_directions(eye, x2, names))
    assert cos.diagonal().tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    with pytest.raises(KeyError, match="not in the model"):
        metrics.gradient_directions(m, x, ["encoder.bias"])
    silent = x.clone()
    silent[:, 4] = 0  # feature 4 never active: no direction for it, the others unchanged
    d4 = metrics.gradient_directions(m, silent, names)
    assert d4["encoder.weight"][4].isnan().all() and not d4["encoder.weight"][:4].isnan().any()


def test_gradient_directions_with_a_sign_and_the_mean_reference_match_an_autograd_loop():
    """sign=-1 keeps the rows where the feature alone is active and negative; reference="mean"
    differentiates 0.5 ||f(x) - mean_x f||^2 (the mean over all of x); |cos| 1 to 1e-9."""
    m = models.square_mlp(0).double()
    x = data.sparse_features(800, 5, seed=3, signed=True).double()
    names = ["layers.0.weight", "layers.4.weight", "layers.4.bias"]
    dirs = metrics.gradient_directions(m, x, names, sign=-1, reference="mean")
    mean = m(x).mean(0).detach()
    rows_neg = data.single_feature_rows(x, sign=-1)
    for i in range(5):
        rows = []
        for xi in x[rows_neg & (x[:, i] != 0)]:
            gs = torch.autograd.grad(0.5 * (m(xi[None]) - mean).pow(2).sum(), [m.get_parameter(n) for n in names])
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
        u = torch.linalg.svd(torch.stack(rows), full_matrices=False).Vh[0]
        assert abs(float(u @ torch.cat([dirs[n][i].reshape(-1) for n in names]))) == pytest.approx(1.0, abs=1e-9)
    signed = metrics.signed_gradient_directions(m, x, names, reference="mean")
    assert torch.equal(signed["layers.0.weight"][1::2], dirs["layers.0.weight"])  # row 2i + 1: x_i < 0
    with pytest.raises(ValueError, match="reference"):
        metrics.gradient_directions(m, x, names, reference="random")
    none = metrics.signed_gradient_directions(m, x.abs(), names)  # no negative values at all
    assert none["layers.0.weight"][1::2].isnan().all() and not none["layers.0.weight"][0::2].isnan().any()


def test_assign_is_the_optimal_one_to_one_matching():
    gen = torch.Generator().manual_seed(0)
    for f, k in [(3, 3), (4, 6), (5, 5)]:
        score = torch.rand(f, k, generator=gen)
        match = metrics.assign(score)
        assert len(set(match)) == f
        total = sum(score[i, j] for i, j in enumerate(match))
        brute = max(sum(score[i, p[i]] for i in range(f)) for p in itertools.permutations(range(k), f))
        assert total == pytest.approx(float(brute))


def test_coefficient_r2_is_scale_and_sign_free():
    A = torch.rand(4, 6)
    rec = A * torch.tensor([[2.0], [-0.5], [1.0], [-3.0]])
    assert metrics.coefficient_r2(A, rec) == pytest.approx(1.0)
    assert metrics.coefficient_r2(A, torch.rand(4, 6)) < 0.9


def test_coefficient_r2_by_hand():
    # rows scaled to their least-squares fit: [1, 0] -> [1, 0] exactly; [1, 1] has
    # recovered [1, 0], fit scale 1, residual 1; SS_tot about the mean 3/4 of all four entries
    true = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    recovered = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert metrics.coefficient_r2(true, recovered) == pytest.approx(1 - 1 / 0.75, abs=1e-12)
    # true + 5 against [[1, 0], [1, 1]]: row 0 fits [6, 0] (residual 25), row 1 exactly; SS_tot
    # about the true entries' mean 5.75 is 0.75 (about zero it would be 133, giving 0.81)
    assert metrics.coefficient_r2(true + 5, true) == pytest.approx(1 - 25 / 0.75, abs=1e-9)
    assert torch.isnan(torch.tensor(metrics.coefficient_r2(torch.ones(2, 2), torch.rand(2, 2))))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.coefficient_r2(true, recovered.T[:1])


class _HandDecomposition:
    """The two things ``live_per_group`` and ``dead_fraction`` read from a Decomposition."""

    def __init__(self, subnetworks, p_act):
        self._subs, self.fraction_active = subnetworks, torch.tensor(p_act)

    def subnetworks(self):
        return self._subs


def test_dead_fraction_counts_subnetworks_never_in_the_top_k():
    assert metrics.dead_fraction(_HandDecomposition({}, [0.0, 0.2, 0.0, 1e-6])) == 0.5
    assert metrics.dead_fraction(_HandDecomposition({}, [0.1, 0.2])) == 0.0


def test_live_per_group_by_hand():
    # 3 groups of 2 inputs, 4 hidden units: subnetworks 0-2 pure in groups 0, 1, 2; 3 dead
    enc = torch.zeros(5, 4, 6)
    for k in range(3):
        enc[k, :, 2 * k:2 * k + 2] = 1.0
    enc[3, :, 0] = 1.0
    bias = torch.zeros(5, 3)
    subs = {"encoder.weight": enc, "decoder.bias": bias}
    r = metrics.live_per_group(_HandDecomposition(subs, [0.3, 0.2, 0.1, 0.0, 0.0]), 2)
    assert r["live_per_group"] == [1, 1, 1] and r["one_per_group"] and r["n_live_impure"] == 0
    assert r["group"][:4] == [0, 1, 2, 0] and r["purity"][:3] == [1.0, 1.0, 1.0]
    # subnetwork 4 lives in the bias alone: in no group, so it counts for none and fails the target
    bias[4, 0] = 1.0
    r = metrics.live_per_group(_HandDecomposition(subs, [0.3, 0.2, 0.1, 0.0, 0.05]), 2)
    assert r["group"][4] == -1 and r["purity"][4] == 0.0
    assert r["live_per_group"] == [1, 1, 1] and r["n_live_impure"] == 1 and not r["one_per_group"]
    # subnetwork 2 mixed 60/40 over groups 2 and 0: counted for group 2, but not one per group
    enc[2, :, 0:2] = (2 / 3) ** 0.5
    r = metrics.live_per_group(_HandDecomposition(subs, [0.3, 0.2, 0.1, 0.0, 0.0]), 2)
    assert r["group"][2] == 2 and r["purity"][2] == pytest.approx(0.6)
    assert r["live_per_group"] == [1, 1, 1] and r["n_live_impure"] == 1 and not r["one_per_group"]


def test_rank_bound_r2_is_the_eckart_young_bound():
    gen = torch.Generator().manual_seed(3)
    A = torch.rand(10, 10, generator=gen, dtype=torch.double) * 3
    s = torch.linalg.svdvals(A)
    closed_form = 1 - float(s[5:].pow(2).sum() / (A - A.mean()).pow(2).sum())
    assert metrics.rank_bound_r2(A, 5) == pytest.approx(closed_form, abs=1e-12)
    assert metrics.rank_bound_r2(A, 10) == pytest.approx(1.0)
    u, _, vh = torch.linalg.svd(A)
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    for _ in range(20):  # rank-5 matrices near the truncated SVD, even scaled per column, stay below it
        nudge = torch.randn(10, 5, generator=gen, dtype=torch.double) @ torch.randn(5, 10, generator=gen, dtype=torch.double)
        near = best + 0.05 * (u[:, :5] @ u[:, :5].T) @ nudge
        assert torch.linalg.matrix_rank(near) <= 5
        assert metrics.coefficient_r2(A.T, near.T) <= closed_form + 1e-12


def test_circuit_recovery_pearson_r_is_the_correlation_of_the_subnetworks_own_products():
    m = models.tmcs(0)
    A = data.circuit_matrix(10, 10, seed=1)
    w_in, w_out = m.encoder.weight.detach(), m.decoder.weight.detach()
    # subnetwork i: feature i's column of W_in and the W_out that would map it exactly to A[:, i]
    enc = torch.zeros(10, *w_in.shape)
    dec = torch.zeros(10, *w_out.shape)
    for i in range(10):
        enc[i, :, i] = w_in[:, i]
        dec[i] = torch.outer(A[:, i], w_in[:, i]) / w_in[:, i].pow(2).sum() * (1 + i)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    subs = {"encoder.weight": -enc[perm], "decoder.weight": -dec[perm]}  # -v: same product
    rec = metrics.circuit_recovery(m, subs, A)
    assert rec["match"] == torch.argsort(perm).tolist()
    scaled = torch.cat([A[:, i] * (1 + i) for i in range(10)])
    expected = torch.corrcoef(torch.stack([A.T.flatten(), scaled]).double())[0, 1]
    assert rec["pearson_r"] == pytest.approx(float(expected), abs=1e-6)  # float32 products
    assert rec["r2_decoder"] == pytest.approx(1.0)  # per-feature scale and sign do not count
    subs["decoder.weight"] = torch.randn_like(dec)
    assert metrics.circuit_recovery(m, subs, A)["pearson_r"] < 0.5


def test_pearson_r_pools_all_entries_without_a_per_row_scale():
    gen = torch.Generator().manual_seed(3)
    A = torch.rand(6, 4, generator=gen)
    assert metrics.pearson_r(A, 2.0 * A + 1.0) == pytest.approx(1.0)
    rows_scaled = A * torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    a, b = A.flatten().double(), rows_scaled.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    expected = float((a * b).sum() / (a.norm() * b.norm()))
    assert metrics.pearson_r(A, rows_scaled) == pytest.approx(expected, abs=1e-12)
    assert expected < 0.99  # a per-row scale does lower it
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.pearson_r(A, A.T)


def test_sign_alignment_tells_even_from_sign_split_circuits():
    x = data.sparse_features(4000, 2, p_active=0.3, seed=0, signed=True)
    even = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))  # linear: g(-x) = g(x)
    split = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        even[0].weight.copy_(torch.eye(2))
        even[1].weight.copy_(torch.eye(2))
        split[0].weight.copy_(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))  # one ReLU unit per sign
        split[2].weight.copy_(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
    even_dirs = metrics.signed_gradient_directions(even, x, ["0.weight", "1.weight"])
    assert even_dirs["0.weight"].shape == (4, 2, 2)
    assert torch.allclose(metrics.sign_alignment(even_dirs), torch.ones(2, dtype=torch.double))
    split_dirs = metrics.signed_gradient_directions(split, x, ["0.weight", "2.weight"])
    assert metrics.sign_alignment(split_dirs).max() < 1e-12  # disjoint units: orthogonal


def test_superposition_directions_mask_the_model_weights():
    m = models.tms(1)
    d = metrics.superposition_directions(m, decoder_rows=True)
    assert torch.equal(d["encoder.weight"][2][:, 2], m.encoder.weight[:, 2].detach())
    assert d["encoder.weight"][2][:, [0, 1, 3, 4]].abs().sum() == 0
    assert torch.equal(d["decoder.weight"][4][4], m.decoder.weight[4].detach())
    g = metrics.superposition_directions(models.higher_rank(), group_size=5)
    assert g["encoder.weight"].shape == (5, 5, 25)


def test_perturbed_restores_weights_bit_identically_even_on_error():
    m = models.square_mlp(2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    direction = {n: torch.randn_like(p) / 3 for n, p in m.named_parameters()}
    x = torch.rand(4, 5)
    with metrics.perturbed(m, direction, 0.7):
        changed = m(x)
        assert not torch.equal(m.layers[0].weight, before["layers.0.weight"])
    assert not torch.allclose(changed, m(x))
    with pytest.raises(RuntimeError, match="boom"):
        with metrics.perturbed(m, direction, 1e-3):
            raise RuntimeError("boom")
    with pytest.raises(ValueError):  # bad shape: rejected before anything is touched
        with metrics.perturbed(m, {"layers.0.weight": torch.ones(5, 5), "layers.1.weight": torch.ones(2)}, 1.0):
            pass
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # bit-identical


def test_selectivity_separates_targeted_from_global_directions():
    m = models.SuperpositionModel(3, 3, 3, seed=0)
    with torch.no_grad():
        m.encoder.weight.copy_(torch.eye(3))
        m.decoder.weight.copy_(torch.eye(3))
        m.decoder.bias.zero_()
    x = torch.rand(50, 3) + 0.1
    relevant = torch.zeros(50, 3, dtype=torch.bool)
    relevant[:, 0] = True
    only_out0 = {"decoder.weight": torch.zeros(3, 3), "decoder.bias": torch.tensor([1.0, 0, 0])}
    s = metrics.selectivity(m, only_out0, x, relevant)
    assert s["reached"] and s["selectivity"] > 1e6
    everywhere = {"decoder.bias": torch.ones(3)}
    s2 = metrics.selectivity(m, everywhere, x, relevant)
    assert s2["reached"] and s2["selectivity"] == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(m.decoder.weight, torch.eye(3))
    # ``other`` picks which entries count against: here only output 1
    other = torch.zeros_like(relevant)
    other[:, 1] = True
    both = {"decoder.bias": torch.tensor([1.0, 0.1, 1.0])}
    assert metrics.selectivity(m, both, x, relevant)["selectivity"] == pytest.approx(1 / 0.55, rel=1e-3)
    assert metrics.selectivity(m, both, x, relevant, other=other)["selectivity"] == pytest.approx(10.0, rel=1e-3)
    with pytest.raises(ValueError, match="both relevant and other"):
        metrics.selectivity(m, both, x, relevant, other=torch.ones_like(relevant))
    with pytest.raises(ValueError, match="bool mask"):  # an index tensor would gather, not mask
        metrics.selectivity(m, both, x, relevant, other=other.long())
    with pytest.raises(ValueError, match="other selects no"):
        metrics.selectivity(m, both, x, relevant, other=torch.zeros_like(relevant))
    # a grid that never reaches half change: read at the largest relevant change, flagged
    s3 = metrics.selectivity(m, both, x, relevant, deltas=[1e-3, 1e-2])
    assert not s3["reached"] and abs(s3["delta"]) == 1e-2
    assert s3["relevant_change"] < s3["target_change"]


def _full_sweep_selectivity(model, direction, x, relevant, fraction=0.5, deltas=None):
    """``selectivity`` as its definition reads, with no early stop: every delta of both signs,
    the smallest |delta| that hits, else the largest relevant change; between the signs a tie
    goes to the larger relevant change, then the smaller selectivity, then +."""
    grid = sorted(abs(d) for d in (torch.logspace(-3, 2, 251).tolist() if deltas is None else deltas))
    with torch.no_grad():
        target = fraction * model(x)[relevant].abs().mean().item()
    hits, peaks = [], []
    for sign in (1.0, -1.0):
        change = metrics.intervention_change(model, direction, x, [sign * d for d in grid])
        rel, oth = change[:, relevant].mean(1), change[:, ~relevant].mean(1)
        hit = (rel >= target).nonzero()
        if len(hit):
            j = int(hit[0])
            r, o = float(rel[j]), float(oth[j])
            hits.append(((grid[j], -r, r / max(o, 1e-300), -sign), sign * grid[j], r, o))
        i = int(rel.argmax())
        r, o = float(rel[i]), float(oth[i])
        peaks.append(((-r, r / max(o, 1e-300), -sign), sign * grid[i], r, o))
    _, delta, rel_change, other_change = min(hits or peaks)
    return {"delta": delta, "relevant_change": rel_change, "other_change": other_change, "reached": bool(hits)}


def test_selectivity_stops_early_with_the_full_sweeps_answer():
    """The sweep stops after the chunk of its first hit (``SWEEP_CHUNK``); it must return what
    sweeping every delta of both signs returns, bit for bit: hits in the first, a middle and the
    last chunk, a tie between the signs, and no hit at all (read at the largest change)."""
    m = models.square_mlp(2)
    x = data.sparse_features(300, 5, seed=4, signed=True)
    gen = torch.Generator().manual_seed(1)
    relevant = torch.zeros(300, 5, dtype=torch.bool)
    relevant[:, 2] = x[:, 2] > 0
    chunks_walked = set()
    for k in range(4):
        v = {n: torch.randn(*p.shape, generator=gen) for n, p in m.named_parameters()}
        for fraction, deltas in ((0.5, None), (1e-4, None), (3.0, None), (1e6, None), (0.5, [-2.0, 2.0, 0.1])):
            got = metrics.selectivity(m, v, x, relevant, fraction=fraction, deltas=deltas)
            want = _full_sweep_selectivity(m, v, x, relevant, fraction=fraction, deltas=deltas)
            assert {key: got[key] for key in want} == want, (k, fraction, deltas)
            if deltas is None and got["reached"]:
                grid = torch.logspace(-3, 2, 251).tolist()
                chunks_walked.add(grid.index(abs(got["delta"])) // metrics.SWEEP_CHUNK)
    assert len(chunks_walked) >= 3  # the hits fall in several different chunks, not only the first
    tie = metrics.selectivity(m, {"layers.4.bias": torch.ones(5)}, x, relevant, deltas=[-1.0, 1.0])
    assert tie["delta"] == 1.0  # a tie in every value: + is read (the numbers are the same either way)
    # a direction that moves nothing never hits, and every delta ties at no change: the first
    # (+, smallest) is read, as the full sweep's argmax does
    still = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    got, want = metrics.selectivity(m, still, x, relevant), _full_sweep_selectivity(m, still, x, relevant)
    assert {key: got[key] for key in want} == want and not got["reached"]
    assert got["delta"] == torch.logspace(-3, 2, 251)[0].item()


def test_selectivity_is_the_same_for_v_and_minus_v():
    """A subnetwork has no sign: v and -v must score the same, up to the sign of delta. On a
    log grid both signs often first reach the half change at the same |delta| (a tie); reading
    + there made the score depend on v's arbitrary sign. Random directions of the x² model
    with feature 2's positive rows relevant, from hits in several chunks to no hit at all."""
    m = models.square_mlp(2)
    x = data.sparse_features(300, 5, seed=4, signed=True)
    relevant = torch.zeros(300, 5, dtype=torch.bool)
    relevant[:, 2] = x[:, 2] > 0
    gen = torch.Generator().manual_seed(0)
    ties = 0
    for k in range(24):
        v = {n: torch.randn(*p.shape, generator=gen) for n, p in m.named_parameters()}
        minus = {n: -t for n, t in v.items()}
        for fraction in (0.5, 3.0):
            a = metrics.selectivity(m, v, x, relevant, fraction=fraction)
            b = metrics.selectivity(m, minus, x, relevant, fraction=fraction)
            same = ("selectivity", "relevant_change", "other_change", "reached")
            assert {key: a[key] for key in same} == {key: b[key] for key in same}, (k, fraction)
            assert a["delta"] == -b["delta"], (k, fraction)
            want = _full_sweep_selectivity(m, v, x, relevant, fraction=fraction)
            assert {key: a[key] for key in want} == want, (k, fraction)
            # a tie: the other sign also hits at this |delta|
            if a["reached"]:
                change = metrics.intervention_change(m, v, x, [-a["delta"]])
                ties += bool(change[0][relevant].mean() >= a["target_change"])
    assert ties >= 1  # the case this test is about occurs among these directions


def test_selectivity_without_a_hit_reads_the_nearer_nan_for_v_and_minus_v():
    """Outputs that turn NaN on both sides, sooner for +delta: v and -v must read the same NaN
    (the one at the smaller |delta|), not each its own +delta side."""
    class TwoSided(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.s = nn.Parameter(torch.zeros(()))

        def forward(self, x):  # NaN for s > 1.01 and for s < -2.01, a tiny change in between
            return self.lin(x) + 1e-3 * (torch.sqrt(1.01 - self.s) + torch.sqrt(2.01 + self.s))

    torch.manual_seed(0)
    m = TwoSided()
    x = torch.randn(20, 3)
    relevant = torch.zeros(20, 2, dtype=torch.bool)
    relevant[:, 0] = True
    a = metrics.selectivity(m, {"s": torch.tensor(1.0)}, x, relevant)
    b = metrics.selectivity(m, {"s": torch.tensor(-1.0)}, x, relevant)
    assert not a["reached"] and math.isnan(a["relevant_change"])
    assert a["delta"] == -b["delta"] and 1.01 < a["delta"] < 1.1


def test_selectivity_keeps_the_full_sweeps_first_nan_when_nothing_hits():
    """A model whose output turns NaN from delta = 1 on (grid index 150, in the tenth chunk)
    and never changes by half: the full sweep's argmax reads the first NaN; the chunked sweep
    must end there too, not at a finite change of an earlier chunk."""

    class BreaksAtOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, z):
            return z + 1e-3 * self.p * z + 0.0 * torch.log(1 - self.p ** 2)

    m = BreaksAtOne()
    x = torch.rand(20, 2) + 0.5
    relevant = torch.zeros(20, 2, dtype=torch.bool)
    relevant[:, 0] = True
    v = {"p": torch.ones(())}
    got, want = metrics.selectivity(m, v, x, relevant), _full_sweep_selectivity(m, v, x, relevant)
    assert not got["reached"] and math.isnan(got["relevant_change"]) and math.isnan(want["relevant_change"])
    assert got["delta"] == want["delta"] == torch.logspace(-3, 2, 251)[150].item()


def test_output_effects_match_finite_differences():
    m = models.square_mlp(1)
    direction = {n: torch.randn(2, *p.shape, generator=torch.Generator().manual_seed(0))
                 for n, p in m.named_parameters()}
    x = data.sparse_features(8, 5, seed=0, signed=True)
    jvp = metrics.output_effects(m, direction, x)
    eps = 1e-3
    for k in range(2):
        with torch.no_grad(), metrics.perturbed(m, metrics.subnetwork(direction, k), eps):
            up = m(x)
        with torch.no_grad(), metrics.perturbed(m, metrics.subnetwork(direction, k), -eps):
            down = m(x)
        assert torch.allclose(jvp[k], (up - down) / (2 * eps), atol=2e-3)


# --- short L3D runs against the untrained decomposition ------------------------------------

def _pair(toy, name, epochs, **kw):
    """(trained, untrained) decompositions: same init and data, lr 1e-12 for the untrained."""
    cfg = paper_config(name, epochs=epochs, lr_step=max(1, epochs // 5), **kw)
    trained = l3d_lens.decompose(toy.model, toy.l3d_data, cfg, progress=False)
    untrained = l3d_lens.decompose(toy.model, toy.l3d_data, cfg.replace(epochs=1, lr=1e-12), progress=False)
    return trained, untrained


@pytest.fixture(scope="module")
def tms_toy():
    return make_toy("tms", 0, epochs=15, n_train=2000, n_l3d=320, n_eval=500)


def test_tms_recovers_feature_directions(tms_toy):
    trained, untrained = _pair(tms_toy, "tms", 40)
    rt, ru = evaluate(tms_toy, trained), evaluate(tms_toy, untrained)
    assert rt["error"] < 0.6 and rt["error"] < ru["error"] - 0.3
    # at least 3 of 5 features found almost exactly; random directions reach none
    assert sum(c > 0.95 for c in rt["cos"]) >= 3
    assert sum(c > 0.95 for c in ru["cos"]) == 0
    assert rt["mmcs"] > ru["mmcs"] + 0.25
    # the subnetworks follow the features' own gradients closer than random directions do
    assert sum(c > 0.95 for c in rt["cos_to_gradient"]) >= 3
    assert sum(c > 0.95 for c in ru["cos_to_gradient"]) == 0


def test_tmcs_subnetworks_align_with_input_features():
    toy = make_toy("tmcs", 0, epochs=20, n_train=2000, n_l3d=640, n_eval=500)
    trained, untrained = _pair(toy, "tmcs", 40)
    rt, ru = evaluate(toy, trained), evaluate(toy, untrained)
    assert rt["error"] < ru["error"] - 0.4
    mt, mu = sum(rt["match_cos"]) / 10, sum(ru["match_cos"]) / 10
    assert mt > mu + 0.15
    assert rt["r2_decoder"] > ru["r2_decoder"] + 1.0
    # the paper's statistic: far above random directions. This briefly trained model computes A
    # only in part (its own f(e_i) - f(0) scores ~0.47); the principal direction of each feature's
    # own gradients recovers as much of A as the model's own matrix does
    assert rt["pearson_r"] > ru["pearson_r"] + 0.3
    assert rt["pearson_r_reference"] > ru["pearson_r"] + 0.3
    assert abs(rt["pearson_r_reference"] - rt["pearson_r_model"]) < 0.05


def test_higher_rank_subnetworks_own_groups():
    toy = make_toy("higher_rank", 0, epochs=20, n_train=2000, n_l3d=640, n_eval=500)
    trained, untrained = _pair(toy, "higher_rank", 40)
    lt, lu = metrics.live_per_group(trained, 5), metrics.live_per_group(untrained, 5)
    assert sum(c >= 1 for c in lt["live_per_group"]) >= 3
    assert max(p for p, a in zip(lt["purity"], lt["p_act"]) if a > 0) > 0.95
    assert max(lu["purity"]) < 0.6  # random subnetworks spread over all groups
    share_t = metrics.feature_activity(trained, toy.eval_data, 5).max(1).values.mean()
    share_u = metrics.feature_activity(untrained, toy.eval_data, 5).max(1).values.mean()
    assert share_t > share_u + 0.3


def test_square_subnetworks_specialise_on_features():
    # one short training run of the default x^2 model (make_toy would add its restarts); this
    # test is about L3D, not about the model
    x = data.sparse_features(2000, 5, seed=5, signed=True)
    model = models.square_mlp(0)
    fit(model, x, x ** 2, epochs=8, seed=0, lr=1e-2)
    toy = Toy("square", model, [], data.sparse_features(320, 5, seed=6, signed=True),
              data.sparse_features(500, 5, seed=7, signed=True), None, {})
    trained, untrained = _pair(toy, "square", 25)
    st = metrics.feature_activity(trained, toy.eval_data)
    su = metrics.feature_activity(untrained, toy.eval_data)
    assert st.max(1).values.mean() > su.max(1).values.mean() + 0.15
    assert trained.history[-1]["loss"] < untrained.history[-1]["loss"] - 0.2
    rt, ru = evaluate(toy, trained), evaluate(toy, untrained)
    assert len(rt["circuit_owner"]) == 10 and len(rt["circuit_selectivity_by_output"]) == 10
    assert rt["subnetworks_per_feature"] == [len({k for k in rt["circuit_owner"][2 * i:2 * i + 2] if k is not None})
                                             for i in range(5)]
    owners_of = [{i for i in range(5) if k in rt["circuit_owner"][2 * i:2 * i + 2]} for k in range(5)]
    assert rt["feature_pure"] == all(len(f) <= 1 for f in owners_of)
    assert rt["one_per_feature_none_shared"] == (rt["one_per_feature"] and rt["feature_pure"])
    assert len(rt["sign_alignment"]) == 5 and all(0 <= c <= 1 + 1e-9 for c in rt["sign_alignment"])
    assert torch.tensor(rt["circuit_share"]).nansum() > torch.tensor(ru["circuit_share"]).nansum() + 1.0
    # the model's own directions are taken against the decomposition's reference: against the
    # batch mean for a mean-reference run (they were always against zero)
    from l3d_lens.toy.reproduce import square_reference
    mean_run = l3d_lens.decompose(toy.model, toy.l3d_data, recommended_config("square", epochs=1, reference="mean"),
                                  progress=False)
    rm = evaluate(toy, mean_run)
    want = square_reference(toy.model, toy.eval_data, "mean")
    assert rm["gradient_reference"] == "mean" and {k: rm[k] for k in want} == want
    zero = {k: v for k, v in rt.items() if k.startswith("reference_")}
    assert zero == {k: v for k, v in square_reference(toy.model, toy.eval_data).items() if k.startswith("reference_")}
    assert zero["reference_selectivity_by_output"] != want["reference_selectivity_by_output"]


def test_signed_feature_activity_splits_each_feature_by_sign():
    x = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.7], [0.0, -0.7], [0.3, 0.3]])

    class Coefficients:  # subnetwork 0 answers x0 > 0, 1 answers x0 < 0, 2 answers feature 1
        def coefficients(self, x, seed=None):
            return torch.stack([x[:, 0].clamp(min=0), (-x[:, 0]).clamp(min=0), x[:, 1].abs()], 1)

    share = metrics.feature_activity(Coefficients(), x, signed=True)
    assert share.argmax(1).tolist() == [0, 1, 2, 2]
    assert torch.allclose(share.max(1).values, torch.ones(4, dtype=torch.double))
    unsigned = metrics.feature_activity(Coefficients(), x)  # feature 0 split evenly over 0 and 1
    assert torch.allclose(unsigned, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.double))
    with pytest.raises(ValueError, match="group_size"):
        metrics.feature_activity(Coefficients(), x, group_size=2, signed=True)


def test_sweep_reports_each_setting_and_dense_topk_reconstructs_better(tms_toy):
    cfg = paper_config("tms", epochs=8, lr_step=2)
    rows = sweep(tms_toy.model, tms_toy.l3d_data, cfg, top_k=[0.1, 1.0], eval_data=tms_toy.eval_data,
                 score=lambda dec: {"n_sub": dec.n_subnetworks})
    assert [r["top_k"] for r in rows] == [0.1, 1.0]
    assert all(r["n_sub"] == 5 and 0 <= r["error"] < 2 for r in rows)
    assert rows[1]["error"] < rows[0]["error"]  # keeping every coefficient can only help
    assert best(rows)["top_k"] == 1.0


def test_best_of_keeps_the_seed_with_the_lowest_training_loss(tms_toy):
    cfg = paper_config("tms", epochs=6, lr_step=2)
    runs = {s: l3d_lens.decompose(tms_toy.model, tms_toy.l3d_data, cfg.replace(seed=s), progress=False)
            for s in (0, 1, 2)}
    losses = {s: d.history[-1]["loss"] for s, d in runs.items()}
    assert len(set(losses.values())) == 3  # the seeds really differ
    kept = best_of(tms_toy.model, tms_toy.l3d_data, cfg, seeds=[0, 1, 2])
    assert kept.cfg.seed == min(losses, key=losses.get)
    assert kept.history[-1]["loss"] == min(losses.values())
    with pytest.raises(ValueError, match="at least one seed"):
        best_of(tms_toy.model, tms_toy.l3d_data, cfg, seeds=[])


def test_scorecard_checks_each_target_and_names_what_is_missing():
    from l3d_lens.toy.reproduce import scorecard
    rows = scorecard("tmcs", {"error": 0.05, "pearson_r": 0.91, "pearson_r_reference": 0.93, "r2_decoder": 0.93,
                              "r2_model": 0.95})
    assert [(r["met"], r["reference"]) for r in rows] == [(True, None), (False, 0.93), (True, 0.95)]
    assert [r["met"] for r in scorecard("tms", {"error": 0.2, "min_cos_encoder": 0.995})] == [False, True]
    hr = {"live_per_group": [1, 1, 1, 1, 1], "n_live_impure": 0}
    assert [r["met"] for r in scorecard("higher_rank", hr)] == [True, True]
    assert [r["met"] for r in scorecard("higher_rank", {**hr, "live_per_group": [1, 2, 1, 1, 0]})] == [False, True]
    assert [r["met"] for r in scorecard("higher_rank", {**hr, "n_live_impure": 1})] == [True, False]
    square = {"error": 0.07, "one_per_feature_none_shared": False, "circuit_selectivity_reached": True,
              "circuit_selectivity_by_output_min": 12.0, "reference_circuit_selectivity_by_output_min": 13.0}
    assert [r["met"] for r in scorecard("square", square)] == [True, False, True, True]
    # a selectivity read where the output never changed by half is not the target's number
    assert [r["met"] for r in scorecard("square", {**square, "circuit_selectivity_reached": False})] == [
        True, False, True, False]
    with pytest.raises(ValueError, match="unknown toy model 'mnist'; choose one of"):
        scorecard("mnist", {})
    with pytest.raises(KeyError, match="'min_cos_encoder' is not in the result"):
        scorecard("tms", {"error": 0.1})


def test_scorecard_prints_renders_and_serialises_as_its_rows():
    import json

    from l3d_lens.toy import Scorecard
    from l3d_lens.toy.reproduce import scorecard
    rows = scorecard("tmcs", {"error": 0.05, "pearson_r": 0.91, "pearson_r_reference": 0.93, "r2_decoder": 0.93,
                              "r2_model": 0.95})
    assert isinstance(rows, list) and not rows.met and json.loads(json.dumps(rows)) == list(rows)
    text = str(rows)
    assert text.splitlines()[0] == "tmcs: 2 of 3 targets met" and repr(rows) == text
    assert "5.0%" in text and "6.4%" in text and "NOT met" in text and "0.93" in text  # error rows as percentages
    frame = rows.to_frame()
    assert list(frame.columns) == list(Scorecard.COLUMNS) and frame["met"].tolist() == [True, False, True]
    assert scorecard("tms", {"error": 0.1, "min_cos_encoder": 0.995}).met
    # the HTML table escapes every string it shows
    odd = Scorecard("<script>", [{"metric": "<b>x</b> & y", "value": "<i>", "op": "==", "target": "<i>",
                                  "met": True, "reference": None}])
    html = odd._repr_html_()
    assert "<b>" not in html and "<script>" not in html and "&lt;b&gt;x&lt;/b&gt; &amp; y" in html
    assert html.count("<tr>") == 2
    # numbers right-aligned (no text class) although they come formatted: value, target, reference,
    # in the report's style, which the bare table would not have in a notebook
    assert rows._repr_html_().startswith('<div class="l3d-report"><style>') and ".l3d-report td.t" in html
    cells = re.findall(r"<td( class=\"t\")?>([^<]*)</td>", rows._repr_html_())
    assert [(text, bool(cls)) for cls, text in cells[:6]] == [
        ("reconstruction error", True), ("5.0%", False), ("&lt;=", True), ("6.4%", False), ("met", True), ("", False)]


def test_toy_demo_trains_decomposes_and_prints_the_scorecard(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "demos" / "toy_models.py"
    spec = importlib.util.spec_from_file_location("toy_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows = demo.run("tmcs", seed=0, restarts=2, epochs=2, train_epochs=2)
    out = capsys.readouterr().out
    assert [r["metric"] for r in rows] == ["reconstruction error", "the paper's statistic (Pearson r of A)",
                                           "r² of A from the subnetworks (per-feature scale)"]
    assert "tmcs (seed 0)" in out and "best of 2" in out and "reference" in out
    assert all(r["metric"] in out for r in rows)
    with pytest.raises(SystemExit):
        demo.main(["--toy", "mnist"])
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_kept_run_is_the_lowest_loss_with_ties_to_the_earlier_run():
    assert kept_run([0.3, 0.1, 0.2]) == 1
    assert kept_run([0.2, 0.1, 0.1]) == 1
    assert kept_run([float("nan"), 0.1]) == 1  # a diverged first run never wins
    assert kept_run([float("nan"), float("nan")]) == 0
    with pytest.raises(ValueError, match="at least one loss"):
        kept_run([])


def test_recommended_config_and_zero_reference_beat_the_random_reference():
    """The zero reference (g = J^T f(x)) carries only the sample's own features, so TMCS's
    one-feature subnetworks (kept alive by AuxK) reconstruct it far better than gradients
    against a random partner (BENCHMARKS.md: 3.7% against 29.6% after 300 epochs)."""
    assert recommended_config("tmcs").reference == "zero" and recommended_config("tmcs").aux_coef > 0
    assert recommended_config("tms").reference == "mean"  # the paper's TMS script's; BENCHMARKS.md says why
    sq = recommended_config("square")  # room for a circuit per sign of each feature; overridable
    assert (sq.n_subnetworks, sq.rank) == (10, 1) and recommended_config("square", rank=2).rank == 2
    assert recommended_config("higher_rank").aux_coef == 0  # its expected answer has dead subnetworks
    toy = make_toy("tmcs", 0, epochs=40, n_train=4000, n_l3d=640, n_eval=500)
    errors = {}
    for label, config in (("paper", paper_config), ("recommended", recommended_config)):
        cfg = config("tmcs", epochs=40, lr_step=8)
        errors[label] = evaluate(toy, l3d_lens.decompose(toy.model, toy.l3d_data, cfg, progress=False))["error"]
    assert errors["recommended"] < 0.6 * errors["paper"], errors


# --- resampling dead subnetworks -------------------------------------------------------------

@pytest.fixture(scope="module")
def higher_rank_toy():
    return make_toy("higher_rank", 0, epochs=20, n_train=2000, n_l3d=640, n_eval=500)


def _resample_cfg(**kw):
    """Short higher-rank run (20 steps per epoch): subnetworks die in epoch 1 (BENCHMARKS.md),
    so some are dead (dead_steps = 20) when epoch 3 starts; every dead one is resampled."""
    return recommended_config("higher_rank", **{**dict(epochs=5, lr_step=2, resample_epochs=(3,),
                                                       resample_max=None), **kw})


def test_resampling_revives_dead_subnetworks(higher_rank_toy):
    toy = higher_rank_toy
    plain = l3d_lens.decompose(toy.model, toy.l3d_data, _resample_cfg(resample_epochs=()), progress=False)
    resampled = l3d_lens.decompose(toy.model, toy.l3d_data, _resample_cfg(), progress=False)
    assert resampled.history[:3] == plain.history[:3]  # nothing changes before the resampling epoch
    dead = [k for k, p in enumerate(plain.history[2]["p_act"]) if p == 0]
    assert dead and resampled.history[3]["n_resampled"] == len(dead)
    assert [h["n_resampled"] for h in resampled.history] == [0, 0, 0, len(dead), 0]
    assert plain.history[3]["n_dead"] == len(dead)  # without resampling they stay dead
    revived = [k for k in dead if resampled.history[3]["p_act"][k] > 0]
    assert revived, "no resampled subnetwork reached a batch top-k in the epoch after resampling"
    assert resampled.history[3]["loss"] != plain.history[3]["loss"]
    one = l3d_lens.decompose(toy.model, toy.l3d_data, _resample_cfg(epochs=4, resample_max=1), progress=False)
    assert one.history[3]["n_resampled"] == 1
    # recommended for the higher-rank model only: one resampling of at most one, at 1/12 of training
    hr = recommended_config("higher_rank", epochs=300)
    assert (hr.resample_epochs, hr.resample_max) == ((25,), 1)
    assert recommended_config("higher_rank", epochs=2).resample_epochs == (1,)
    assert recommended_config("tmcs", epochs=300).resample_epochs == ()


def test_resampling_is_reproducible_from_the_seed(higher_rank_toy):
    toy = higher_rank_toy
    runs = [l3d_lens.decompose(toy.model, toy.l3d_data, _resample_cfg(epochs=4, seed=s), progress=False)
            for s in (1, 1, 2)]
    assert runs[0].history == runs[1].history and runs[0].history[3]["n_resampled"] > 0
    assert all(torch.equal(runs[0].factors[k], runs[1].factors[k]) for k in runs[0].factors)
    assert not all(torch.equal(runs[0].factors[k], runs[2].factors[k]) for k in runs[0].factors)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("stop", [(3, 0), (3, 2)], ids=["before-resampling", "after-resampling"])
def test_resampling_run_resumes_bit_identically(higher_rank_toy, tmp_path, monkeypatch, stop):
    """A run stopped at the checkpoint (epoch, batch) = ``stop`` and resumed equals a straight
    run: the resampling of epoch 3 happens once, from the same generator state."""
    toy, cfg = higher_rank_toy, _resample_cfg(epochs=4)
    straight = l3d_lens.decompose(toy.model, toy.l3d_data, cfg, progress=False)
    real_save = checkpoint.save

    def save_then_stop(path, state, tensors):
        real_save(path, state, tensors)
        if (state["epoch"], state["batch"]) == stop:
            raise _Killed

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(_Killed):
        l3d_lens.decompose(toy.model, toy.l3d_data, cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    monkeypatch.setattr(checkpoint, "save", real_save)
    resumed = l3d_lens.decompose(toy.model, toy.l3d_data, cfg, progress=False, checkpoint=tmp_path)
    assert straight.history[3]["n_resampled"] > 0 and resumed.history == straight.history
    assert all(torch.equal(resumed.factors[k], straight.factors[k]) for k in straight.factors)


def _ddp_resample_setup():
    """An untrained higher-rank model on 99 samples (batches of 32, 32, 32, 3: the last one
    uneven across 2 ranks), top_k 0.05 and subnetworks dead after 3 steps: at epoch 2, two are
    dead and both resampled."""
    model = models.higher_rank(0).double()
    x = data.grouped_features(99, seed=4).double()
    cfg = recommended_config("higher_rank", epochs=4, lr_step=2, dtype="float64", dead_steps=3, top_k=0.05,
                             resample_epochs=(2,), resample_max=None)
    return model, x, cfg


def _ddp_resample_worker(rank: int, world: int, init_file: str, out: str) -> None:
    with process_group(rank, world, init_file):
        model, x, cfg = _ddp_resample_setup()
        dec = l3d_lens.decompose(model, x, cfg, progress=False)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in dec.factors.items()}, out)
            with open(out + ".history", "w") as fh:
                json.dump(dec.history, fh)


def test_resampling_in_two_gloo_ranks_equals_one_process(tmp_path):
    """Every rank draws the same rows (gathered errors, same generator) and gets every residual
    (summed over ranks), so data-parallel resampling equals one process."""
    out = str(tmp_path / "factors.safetensors")
    mp.spawn(_ddp_resample_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    model, x, cfg = _ddp_resample_setup()
    single = l3d_lens.decompose(model, x, cfg, progress=False)
    history = json.loads(open(out + ".history").read())
    assert single.history[2]["n_resampled"] > 1
    assert [h["n_resampled"] for h in history] == [h["n_resampled"] for h in single.history]
    assert [h["p_act"] for h in history] == [h["p_act"] for h in single.history]
    for k, v in load_file(out).items():
        assert torch.allclose(v, single.factors[k], rtol=1e-9, atol=1e-12), k


# --- bad input: clear errors before any work ---------------------------------------------------

def test_evaluate_rejects_a_decomposition_of_another_model_or_of_too_few_weights(tms_toy):
    cfg = paper_config("tms", epochs=1)
    dec = l3d_lens.decompose(tms_toy.model, tms_toy.l3d_data, cfg, progress=False)
    twin = copy.deepcopy(tms_toy.model)  # the same weights bit for bit: accepted
    same = l3d_lens.decompose(twin, tms_toy.l3d_data, cfg, progress=False)
    assert evaluate(tms_toy, same)["error"] == evaluate(tms_toy, dec)["error"]
    with torch.no_grad():
        twin.encoder.weight[0, 0] += 1e-6
    with pytest.raises(ValueError, match="fitted on another model than toy.model"):
        evaluate(tms_toy, same)
    wide = l3d_lens.decompose(copy.deepcopy(tms_toy.model).double(), tms_toy.l3d_data.double(), cfg, progress=False)
    with pytest.raises(ValueError, match="fitted on another model than toy.model"):
        evaluate(tms_toy, wide)  # equal values in another dtype: not the same model
    other = make_toy("tmcs", 0, epochs=1, n_train=64, n_l3d=64, n_eval=64)
    with pytest.raises(ValueError, match="fitted on another model than toy.model"):
        evaluate(other, dec)  # shapes differ too: a clear error, not a matmul failure
    only_encoder = l3d_lens.decompose(tms_toy.model, tms_toy.l3d_data, cfg.replace(components=["encoder"]),
                                      progress=False)
    with pytest.raises(ValueError, match=r"\(missing \['decoder.weight'\]\); decompose with components='\*'"):
        evaluate(tms_toy, only_encoder)


def test_toy_configs_name_bad_toys_and_scale_the_decay_to_the_epochs_given():
    from l3d_lens.toy.reproduce import scaled_lr_step
    for config in (paper_config, recommended_config):
        with pytest.raises(ValueError, match=r"unknown toy model 'tsm'; choose one of \('tms', 'tmcs'"):
            config("tsm")
        assert config("tmcs").lr_step == 100 and config("tmcs", epochs=30).lr_step == scaled_lr_step(30) == 3
        assert config("tmcs", epochs=30, lr_step=7).lr_step == 7
        assert config("tmcs").replace(epochs=30).lr_step == 100  # replace keeps what was set
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got '30'"):
        recommended_config("higher_rank", epochs="30")
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        paper_config("tms", lr=float("inf"))


@pytest.mark.parametrize("kw, message", [
    (dict(seed=None), r"seed must be an integer in 0\.\.\d+ \(the seed every model"),
    (dict(seed="0"), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(seed=2**62), "seed must be an integer"),
    (dict(epochs=0), r"epochs must be an integer >= 1 \(training epochs\), got 0"),
    (dict(epochs=-5), "epochs must be an integer >= 1"),
    (dict(n_eval=0), r"n_eval must be an integer >= 1 \(samples\)"),
])
def test_make_toy_rejects_bad_seeds_and_sizes_before_training(kw, message):
    with pytest.raises(ValueError, match=message):
        make_toy("tmcs", **{"seed": 0, **kw})


def test_make_toy_takes_numpy_integers():
    np = pytest.importorskip("numpy")
    a = make_toy("tmcs", np.int64(1), epochs=np.int64(1), n_train=64, n_l3d=8, n_eval=8)
    b = make_toy("tmcs", 1, epochs=1, n_train=64, n_l3d=8, n_eval=8)
    assert a.seed == 1 and type(a.seed) is int and a.final_loss == b.final_loss


def test_best_of_and_sweep_reject_what_they_cannot_use(tms_toy):
    cfg = paper_config("tms", epochs=1)
    with pytest.raises(TypeError, match=r"seeds must be an iterable of L3D seeds, e.g. range\(3\), got 3"):
        best_of(tms_toy.model, tms_toy.l3d_data, cfg, seeds=3)
    with pytest.raises(ValueError, match="at least one seed"):
        best_of(tms_toy.model, tms_toy.l3d_data, cfg, seeds=iter([]))
    kept = best_of(tms_toy.model, tms_toy.l3d_data, cfg, seeds=(s for s in [1]))  # any iterable, once
    assert kept.cfg.seed == 1
    np = pytest.importorskip("numpy")
    assert best_of(tms_toy.model, tms_toy.l3d_data, cfg, seeds=np.arange(1, 2)).cfg.seed == 1
    with pytest.raises(TypeError, match="seeds must be integers"):
        best_of(tms_toy.model, tms_toy.l3d_data, cfg, seeds=[0.5])
    with pytest.raises(ValueError, match=r"score returned \['error'\], which the sweep's rows already hold"):
        sweep(tms_toy.model, tms_toy.l3d_data, cfg, score=lambda dec: {"error": 0.0})


# --- saving toys -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tmcs", "higher_rank", "square"])
def test_a_saved_toy_loads_back_equal_and_decomposes_the_same(tmp_path, name):
    from l3d_lens.toy import load_toy
    if name == "square":  # one epoch never learns x^2 (make_toy would refuse it): a toy made by hand, no seed
        model = models.square_mlp(2)
        fit(model, data.sparse_features(64, 5, seed=1, signed=True), data.sparse_features(64, 5, seed=1, signed=True) ** 2,
            epochs=1)
        toy = Toy("square", model, [0.5], data.sparse_features(40, 5, seed=2, signed=True),
                  data.sparse_features(30, 5, seed=3, signed=True), lambda n, s: None, {})
    else:
        toy = make_toy(name, 2, epochs=1, n_train=64, n_l3d=40, n_eval=30)
    folder = toy.save(tmp_path / "toy")
    back = load_toy(folder)
    assert (back.name, back.seed, back.blocks, back.train_losses) == (toy.name, toy.seed, toy.blocks, toy.train_losses)
    assert type(back.model) is type(toy.model) and not back.model.training
    for (n, a), (m, b) in zip(toy.model.state_dict().items(), back.model.state_dict().items()):
        assert n == m and torch.equal(a, b)
    assert torch.equal(back.l3d_data, toy.l3d_data) and torch.equal(back.eval_data, toy.eval_data)
    assert back.truth.keys() == toy.truth.keys()
    assert all(torch.equal(v, back.truth[k]) if isinstance(v, torch.Tensor) else v == back.truth[k]
               for k, v in toy.truth.items())
    if toy.seed is None:
        assert back.inputs is None  # a hand-made toy's input distribution is not saved
    else:
        assert torch.equal(back.inputs(7, 3), toy.inputs(7, 3))  # rebuilt from the seed
    cfg = recommended_config(name, epochs=1)
    a = evaluate(toy, l3d_lens.decompose(toy.model, toy.l3d_data, cfg, progress=False))
    b = evaluate(back, l3d_lens.decompose(back.model, back.l3d_data, cfg, progress=False))
    assert json.dumps(a) == json.dumps(b)  # every metric, NaNs included
    assert not list(tmp_path.glob("toy/*.pkl")) and sorted(p.name for p in folder.iterdir()) == [
        "toy.json", "toy.safetensors"]


def test_loading_a_toy_checks_format_name_and_shapes(tmp_path):
    from l3d_lens.toy import load_toy
    toy = make_toy("tmcs", 0, epochs=1, n_train=64, n_l3d=8, n_eval=8)
    folder = toy.save(tmp_path / "toy")
    meta = json.loads((folder / "toy.json").read_text())
    with pytest.raises(FileNotFoundError, match="is not a saved toy"):
        load_toy(tmp_path / "nothing")
    (folder / "toy.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="toy format version 99; this l3d_lens reads 1"):
        load_toy(folder)
    (folder / "toy.json").write_text(json.dumps({**meta, "name": "mnist"}))
    with pytest.raises(ValueError, match="unknown toy model 'mnist'"):
        load_toy(folder)
    (folder / "toy.json").write_text(json.dumps({**meta, "name": "tms"}))  # tmcs weights are 10 wide, tms 5
    with pytest.raises(ValueError, match="weight shapes differ from 'tms'"):
        load_toy(folder)
    tensors = load_file(str(folder / "toy.safetensors"))
    save_file({**tensors, "eval_data": tensors["eval_data"][:, :3].contiguous()}, str(folder / "toy.safetensors"))
    (folder / "toy.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="toy.safetensors is not the file toy.json was saved with"):
        load_toy(folder)  # the two files of different saves are never mixed
    from l3d_lens.toy.saving import _sha256
    (folder / "toy.json").write_text(json.dumps({**meta, "sha256": _sha256(folder / "toy.safetensors")}))
    with pytest.raises(ValueError, match=r"eval_data has shape \(8, 3\); the model takes \[n, 10\]"):
        load_toy(folder)


def test_saving_a_toy_checks_everything_before_touching_the_folder(tmp_path):
    from l3d_lens.toy import load_toy
    toy = make_toy("tmcs", 0, epochs=1, n_train=64, n_l3d=8, n_eval=8)
    folder = toy.save(tmp_path / "toy")
    other = make_toy("tmcs", 1, epochs=1, n_train=64, n_l3d=8, n_eval=8)
    bad_truth = dataclasses.replace(other, truth={**other.truth, "groups": (1, 2)})
    with pytest.raises(ValueError, match=r"non-tensor truth \{'groups': \(1, 2\)\} does not survive JSON"):
        bad_truth.save(folder)
    wrong_model = dataclasses.replace(other, model=models.SuperpositionModel(10, 3, 10))
    with pytest.raises(ValueError, match=r"cannot save this toy: weight shapes differ from 'tmcs'"):
        wrong_model.save(folder)
    with pytest.raises(ValueError, match="the model is a SquareMLP, but 'tmcs' builds a SuperpositionModel"):
        dataclasses.replace(other, model=models.square_mlp(0)).save(folder)
    kept = load_toy(folder)  # every refusal left the saved toy as it was
    assert kept.seed == 0 and torch.equal(kept.model.encoder.weight, toy.model.encoder.weight)
    other.save(folder)  # a good save replaces it
    assert load_toy(folder).seed == 1


def test_a_toy_keeps_its_dtype_and_may_share_its_data(tmp_path):
    from l3d_lens.toy import load_toy
    toy = make_toy("tmcs", 0, epochs=1, n_train=64, n_l3d=8, n_eval=8)
    wide = dataclasses.replace(toy, model=copy.deepcopy(toy.model).double(), l3d_data=toy.eval_data.double(),
                               eval_data=toy.eval_data.double())
    wide.l3d_data = wide.eval_data  # one tensor used twice
    back = load_toy(wide.save(tmp_path / "toy"))
    assert back.model.encoder.weight.dtype == torch.float64
    assert torch.equal(back.model(back.eval_data), wide.model(wide.eval_data))
