"""The toy metrics on inputs a user gets wrong (clear errors before any work, naming the
problem), on fewer subnetworks than features, and on grouped inputs; the global RNG after
building a toy."""

import math

import numpy as np
import pytest
import torch

import l3d_lens
from l3d_lens.toy import data, make_toy, metrics, models, recommended_config, scorecard, training_data
from l3d_lens.toy.reproduce import evaluate


@pytest.fixture(scope="module")
def small_tms():
    return make_toy("tms", 0, epochs=3, n_train=200, n_l3d=64, n_eval=200)


def _grouped_model(n_in=6, n_hidden=3, n_out=4, seed=0):
    return models.SuperpositionModel(n_in, n_hidden, n_out, seed=seed)


def test_circuit_recovery_scores_every_input_of_a_group_on_its_groups_subnetwork():
    m, g = _grouped_model(), 2
    A = torch.rand(4, 6, generator=torch.Generator().manual_seed(3))
    w_in, w_out = m.encoder.weight.detach(), m.decoder.weight.detach()
    # one subnetwork per group: the group's W_in columns and a group-specific W_out
    gen = torch.Generator().manual_seed(5)
    enc = torch.stack([w_in * (torch.arange(6) // g == j) for j in range(3)])
    dec = torch.rand(3, *w_out.shape, generator=gen)
    bias = torch.zeros(3, 4)
    grouped = metrics.circuit_recovery(m, {"encoder.weight": enc, "decoder.weight": dec, "decoder.bias": bias}, A,
                                       group_size=g)
    assert grouped["match"] == [0, 1, 2]
    # the same scores as one subnetwork per input, each a copy of its group's
    per_input = metrics.circuit_recovery(m, {"encoder.weight": enc.repeat_interleave(g, 0),
                                             "decoder.weight": dec.repeat_interleave(g, 0),
                                             "decoder.bias": bias.repeat_interleave(g, 0)}, A)
    for key in ("r2", "r2_decoder", "pearson_r"):
        assert grouped[key] == pytest.approx(per_input[key], rel=1e-12, abs=1e-12), key
    with pytest.raises(ValueError, match=r"A must be \[d_out, d_in\] = \(4, 6\)"):
        metrics.circuit_recovery(m, {"encoder.weight": enc, "decoder.weight": dec}, A.T, group_size=g)


def test_evaluate_with_fewer_subnetworks_than_features_scores_what_needs_no_matching(small_tms):
    cfg = recommended_config("tms", epochs=2).replace(n_subnetworks=3)
    dec = l3d_lens.decompose(small_tms.model, small_tms.l3d_data, cfg, progress=False)
    r = evaluate(small_tms, dec)
    assert math.isnan(r["min_cos_to_gradient"]) and all(math.isnan(c) for c in r["cos_to_gradient"])
    assert math.isfinite(r["error"]) and math.isfinite(r["min_cos_encoder"]) and math.isfinite(r["mmcs"])
    assert len(scorecard("tms", r)) == 2


def test_evaluate_tmcs_with_fewer_subnetworks_than_features_is_nan_not_an_error():
    toy = make_toy("tmcs", 0, epochs=2, n_train=200, n_l3d=64, n_eval=200)
    dec = l3d_lens.decompose(toy.model, toy.l3d_data, recommended_config("tmcs", epochs=2).replace(n_subnetworks=4),
                             progress=False)
    r = evaluate(toy, dec)
    assert all(math.isnan(r[k]) for k in ("r2", "r2_decoder", "pearson_r", "r2_decoder_vs_model"))
    assert math.isfinite(r["pearson_r_reference"]) and math.isfinite(r["r2_model"])
    assert [row["met"] for row in scorecard("tmcs", r)][1:] == [False, False]


def test_selectivity_rejects_a_fraction_or_deltas_it_cannot_use():
    m = models.square_mlp(0)
    x = data.sparse_features(50, 5, seed=0, signed=True)
    relevant = torch.zeros(50, 5, dtype=torch.bool)
    relevant[:, 0] = x[:, 0] != 0
    v = {"layers.4.bias": torch.ones(5)}
    for fraction in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fraction must be a positive finite number"):
            metrics.selectivity(m, v, x, relevant, fraction=fraction)
    for deltas in ([], [1.0, float("inf")], [float("nan")]):
        with pytest.raises(ValueError, match="deltas must be a non-empty list of finite step sizes"):
            metrics.selectivity(m, v, x, relevant, deltas=deltas)
    r = metrics.selectivity(m, v, x, relevant, deltas=torch.tensor([0.5, 1.0]))
    assert type(r["delta"]) is float  # JSON-serialisable, not a 0-d tensor
    with pytest.raises(ValueError, match="deltas is empty"):
        metrics.intervention_change(m, v, x, [])
    with pytest.raises(ValueError, match="x is torch.float64 but the model's parameters are torch.float32"):
        metrics.selectivity(m, v, x.double(), relevant)


def test_numpy_and_torch_numbers_are_as_good_as_python_ones(small_tms):
    m, x = small_tms.model, small_tms.eval_data
    dirs = metrics.gradient_directions(m, x, ["encoder.weight"], group_size=np.int64(1))
    assert dirs["encoder.weight"].shape == (5, 2, 5)
    subs = {"w": torch.arange(6.0).view(3, 2)}
    for k in (np.int64(2), torch.tensor(2), -1):
        assert torch.equal(metrics.subnetwork(subs, k)["w"], torch.tensor([4.0, 5.0]))
    A = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    assert metrics.rank_bound_r2(A, np.int64(2)) == metrics.rank_bound_r2(A, torch.tensor(2)) == \
        metrics.rank_bound_r2(A, 2)
    sq = models.square_mlp(0)
    xs = data.sparse_features(40, 5, seed=0, signed=True)
    relevant = torch.zeros(40, 5, dtype=torch.bool)
    relevant[:, 0] = xs[:, 0] != 0
    v = {"layers.4.bias": torch.ones(5)}
    plain = metrics.selectivity(sq, v, xs, relevant, fraction=0.5)
    assert metrics.selectivity(sq, v, xs, relevant, fraction=np.float32(0.5)) == plain
    assert metrics.selectivity(sq, v, xs, relevant, fraction=torch.tensor(0.5)) == plain
    assert metrics.intervention_change(sq, v, xs, (d for d in (0.1, 0.2))).shape == (2, 40, 5)  # any iterable


def test_cosine_matrix_needs_the_subnetworks_layout_not_only_their_size():
    subs = {"w": torch.rand(4, 3, 5)}
    assert metrics.cosine_matrix({"w": torch.rand(2, 3, 5)}, subs).shape == (2, 4)
    with pytest.raises(ValueError, match=r"truth\['w'\] must be \[n_features, \*\(3, 5\)\]"):
        metrics.cosine_matrix({"w": torch.rand(2, 5, 3)}, subs)  # transposed: same numel, wrong layout
    with pytest.raises(ValueError, match=r"must be \[n_features"):
        metrics.cosine_matrix({"w": torch.rand(3, 5)}, subs)  # no feature axis
    with pytest.raises(ValueError, match="truth names no weight"):
        metrics.cosine_matrix({}, subs)
    with pytest.raises(ValueError, match="different leading sizes"):
        metrics.cosine_matrix({"w": torch.rand(2, 3, 5), "b": torch.rand(3, 5)}, {**subs, "b": torch.rand(4, 5)})


def test_rank_bound_needs_a_positive_integer_rank():
    A = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    assert metrics.rank_bound_r2(A, 6) == pytest.approx(1.0)
    for rank in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            metrics.rank_bound_r2(A, rank)


def test_direction_and_activity_metrics_name_the_bad_argument(small_tms):
    m, x = small_tms.model, small_tms.eval_data
    with pytest.raises(ValueError, match="names must be a non-empty list of weight names"):
        metrics.gradient_directions(m, x, "encoder.weight")
    with pytest.raises(ValueError, match="names must be a non-empty list"):
        metrics.gradient_directions(m, x, [])
    with pytest.raises(ValueError, match="group_size must be a positive integer dividing the 5 features, got 2"):
        metrics.gradient_directions(m, x, ["encoder.weight"], group_size=2)
    with pytest.raises(ValueError, match=r"x must be a \[n, d_in\] tensor"):
        metrics.gradient_directions(m, x[0], ["encoder.weight"])
    with pytest.raises(ValueError, match="y must have the model's output shape"):
        metrics.feature_r2(m, x, x[:, :3])
    with pytest.raises(ValueError, match="name no weight of the model"):
        metrics.output_effects(m, {"layers.0.weight": torch.rand(2, 5, 5)}, x)
    with pytest.raises(ValueError, match=r"score must be a \[features, subnetworks\] matrix"):
        metrics.assign(torch.rand(5))
    with pytest.raises(ValueError, match="odd number"):
        metrics.sign_alignment({"w": torch.rand(5, 3)})
    with pytest.raises(ValueError, match="'decoder.bias' must be a matrix whose input columns are grouped"):
        metrics.group_of_subnetworks({"decoder.bias": torch.rand(4, 5)}, 1, weight="decoder.bias")
    with pytest.raises(IndexError, match=r"subnetwork index must be an integer in 0..1 \(or -2..-1 from the end\), got 2"):
        metrics.subnetwork({"w": torch.rand(2, 3)}, 2)
    for bad in (-3, 1.0, "0"):
        with pytest.raises(IndexError, match="subnetwork index must be an integer"):
            metrics.subnetwork({"w": torch.rand(2, 3)}, bad)


def test_activity_and_group_metrics_check_before_computing_coefficients(small_tms, monkeypatch):
    dec = l3d_lens.decompose(small_tms.model, small_tms.l3d_data, recommended_config("tms", epochs=1), progress=False)
    calls = []
    monkeypatch.setattr(type(dec), "coefficients", lambda self, *a, **k: calls.append(1))
    for bad in (0, -1, 2, 1.0):
        with pytest.raises(ValueError, match="group_size must be a positive integer dividing the 5 features"):
            metrics.feature_activity(dec, small_tms.eval_data, group_size=bad)
    assert not calls
    with pytest.raises(KeyError, match="pass weight= the weight whose input columns are grouped"):
        metrics.live_per_group(dec, 5, weight="layers.0.weight")
    with pytest.raises(ValueError, match="group_size must be a positive integer dividing the 5 features, got 2"):
        metrics.live_per_group(dec, 2)


def test_building_or_training_a_toy_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    want = torch.rand(3)
    for build in (lambda: models.square_mlp(4), lambda: models.tmcs(4),
                  lambda: make_toy("tmcs", 1, epochs=1, n_train=50, n_l3d=10, n_eval=10)):
        torch.manual_seed(0)
        build()
        assert torch.equal(torch.rand(3), want)
    # and the model is still the seeded one
    assert torch.equal(models.square_mlp(4).layers[0].weight, models.square_mlp(4).layers[0].weight)


def test_scorecard_compares_counts_of_any_sequence_and_a_missing_value_meets_nothing():
    hr = {"live_per_group": (1, 1, 1, 1, 1), "n_live_impure": 0}
    assert scorecard("higher_rank", hr).met
    assert scorecard("higher_rank", {**hr, "live_per_group": np.ones(5, dtype=int)}).met
    assert not scorecard("higher_rank", {**hr, "live_per_group": (1, 1, 1, 1)}).met
    rows = scorecard("tms", {"error": None, "min_cos_encoder": float("nan")})
    assert [r["met"] for r in rows] == [False, False]


def test_training_data_and_sampling_reject_what_make_toy_rejects():
    with pytest.raises(ValueError, match="seed must be an integer in 0.."):
        training_data("tms", -1)
    with pytest.raises(ValueError, match="seed must be an integer"):
        training_data("tms", 1.5)
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        training_data("tms", 0, n_train=0)
    with pytest.raises(ValueError, match="unknown toy model"):
        training_data("mnist", 0)
    with pytest.raises(ValueError, match="p_active=1e-07 leaves only"):
        data.sparse_features(10, 5, p_active=1e-7)
    with pytest.raises(ValueError, match="leaves only"):
        data.grouped_features(10, 25, 5, p_active=1e-6)
    assert data.sparse_features(10, 5, p_active=1e-3).shape == (10, 5)  # rare but affordable


def test_metrics_name_inputs_of_the_wrong_width_before_working():
    """The higher-rank model's 25-wide inputs given to a 10-input TMCS model: a ValueError that
    names the shape (it used to fail inside F.linear, or, in gradient_directions, to return 25
    NaN directions for a 10-input model)."""
    model = models.tmcs(0)
    x25 = data.grouped_features(100, 25, 5, seed=0)
    names = ["encoder.weight"]
    calls = [lambda: metrics.feature_r2(model, x25, torch.zeros(100, 10)),
             lambda: metrics.gradient_directions(model, x25, names),
             lambda: metrics.output_effects(model, {"encoder.weight": torch.zeros(1, 5, 10)}, x25),
             lambda: metrics.intervention_change(model, {"encoder.weight": torch.zeros(5, 10)}, x25, [0.1]),
             lambda: metrics.selectivity(model, {"encoder.weight": torch.zeros(5, 10)}, x25,
                                         torch.zeros(100, 10, dtype=torch.bool))]
    for call in calls:
        with pytest.raises(ValueError, match=r"does not take x of shape \(100, 25\)"):
            call()
    with pytest.raises(ValueError, match="group_size must be a positive integer dividing the 25 features, got 3"):
        data.active_features(x25, 3)


def test_metrics_name_x_on_another_device_than_the_model():
    model = models.tmcs(0).to("meta")
    with pytest.raises(ValueError, match=r"x is on cpu but the model's parameters are on meta; pass x.to\('meta'\)"):
        metrics.feature_r2(model, data.sparse_features(10, 10, seed=0), torch.zeros(10, 10))


def test_a_float64_toy_decomposes_and_evaluates_and_a_half_moved_one_is_named():
    """``Toy.to(torch.float64)`` moves the model, data and truth, and the whole flow runs in
    float64; a model moved alone gets a TypeError naming both dtypes from ``decompose`` (it
    failed inside F.linear), and ``evaluate`` reads the float32 held-out data in the model's dtype."""
    toy = make_toy("tmcs", 0, epochs=2, n_train=200, n_l3d=64, n_eval=100)
    model64 = make_toy("tmcs", 0, epochs=2, n_train=200, n_l3d=64, n_eval=100).model.double()
    with pytest.raises(TypeError, match=r"data is torch.float32 but the model's parameters are torch.float64"):
        l3d_lens.decompose(model64, toy.l3d_data, recommended_config("tmcs", epochs=1), progress=False)
    assert toy.to(torch.float64) is toy
    assert {t.dtype for t in (*toy.model.parameters(), toy.l3d_data, toy.eval_data, toy.truth["A"])} == {torch.float64}
    dec = l3d_lens.decompose(toy.model, toy.l3d_data, recommended_config("tmcs", epochs=2), progress=False)
    toy.eval_data = toy.eval_data.float()  # evaluate casts it to the model's dtype
    result = evaluate(toy, dec)
    assert math.isfinite(result["error"]) and math.isfinite(result["pearson_r"])


def test_make_toy_leaves_no_training_gradients_on_the_model():
    """A user's own backward on a toy model starts from zero, as on a loaded one (``fit`` left
    the last step's .grad on every parameter)."""
    for name in ("tms", "tmcs", "higher_rank"):
        toy = make_toy(name, 0, epochs=2, n_train=200, n_l3d=8, n_eval=8)
        assert all(p.grad is None for p in toy.model.parameters()), name
    toy = make_toy("square", 0, epochs=2, n_train=200, n_l3d=8, n_eval=8, check_learned=False)
    assert all(p.grad is None for p in toy.model.parameters())


def test_make_toy_check_learned_false_keeps_an_x2_model_that_learned_nothing():
    """Two epochs teach the x² model no feature: with the check it raises after its last block,
    without it the first block's best start comes back."""
    small = dict(epochs=2, n_train=200, n_l3d=8, n_eval=8)
    with pytest.raises(RuntimeError, match="passed the learned check in 3 blocks"):
        make_toy("square", 0, **small)
    toy = make_toy("square", 0, check_learned=False, **small)
    assert toy.blocks == 1 and len(toy.train_losses) == 2
    assert min(metrics.feature_r2(toy.model, *training_data("square", 0, n_train=200))) < 0.5
    with pytest.raises(ValueError, match="check_learned must be True or False, got 'no'"):
        make_toy("square", 0, check_learned="no", **small)


def test_the_input_check_runs_its_row_in_eval_mode_and_restores_every_module():
    """``_check_inputs``' one-row forward: a BatchNorm model in train mode (one row would fail
    there) passes, and no mode, running statistic or random draw changes."""
    from torch import nn
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 4)).train()
    model[2].eval()  # a mixed state, restored module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(50, 4)
    rng = torch.get_rng_state()
    metrics._check_inputs(model, x)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_decompose_names_float_data_of_another_dtype_that_the_model_does_not_take():
    """Only where the model cannot run it: a model that casts its input, or a run under
    autocast, is not refused."""
    from torch import nn

    from l3d_lens.adapters import make_adapter
    from l3d_lens.data import check_dtype

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype))

    x64, x32 = torch.rand(8, 3, dtype=torch.float64), torch.rand(8, 3)
    check_dtype(make_adapter(Casting()), x64)
    plain = make_adapter(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"data is torch.float64 but the model's parameters are torch.float32"):
        check_dtype(plain, x64)
    check_dtype(plain, [x32])
    # paired reference data, as a tensor or in (data, reference) batches
    for batches, reference in ((x32, x64), ([(x32, x64)], None)):
        with pytest.raises(TypeError, match=r"reference is torch.float64 but the model's parameters are torch.float32"):
            check_dtype(plain, batches, reference)
    # under autocast as training runs it: a bf16 model takes float32 and float16 data, not float64
    bf16 = make_adapter(nn.Linear(3, 2).to(torch.bfloat16))
    check_dtype(bf16, x32, autocast="bf16")
    check_dtype(bf16, x32.half(), autocast="bf16")
    with pytest.raises(TypeError, match=r"data is torch.float64 .* torch.bfloat16 \(under bf16 autocast\)"):
        check_dtype(bf16, x64, autocast="bf16")
    with pytest.raises(TypeError, match="data is torch.float32"):
        check_dtype(bf16, x32)


def test_fraction_active_is_on_the_cpu_whatever_the_default_device(small_tms):
    dec = l3d_lens.decompose(small_tms.model, small_tms.l3d_data, recommended_config("tms", epochs=1), progress=False)
    with torch.device("meta"):
        assert dec.fraction_active.device.type == "cpu"
        dec.history = []
        assert dec.fraction_active.device.type == "cpu" and dec.fraction_active.tolist() == [0.0] * 5


def test_fit_names_a_model_without_parameters():
    from torch import nn

    from l3d_lens.toy import fit
    with pytest.raises(ValueError, match="empty parameter list"):
        fit(nn.Sequential(), torch.rand(4, 2), torch.rand(4, 2), epochs=1)
