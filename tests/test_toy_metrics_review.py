"""The ground-truth metrics on a circuit-superposition model whose weights have other names, the
model's own matrix as a reference (not a bound), the higher-rank target on a toy with another
number of groups, and subnetworks or decompositions the metrics cannot score."""

import pytest
import torch
from torch import nn

import l3d_lens
from l3d_lens.toy import Toy, data, make_toy, metrics, models, recommended_config, scorecard
from l3d_lens.toy.reproduce import evaluate


class _Renamed(nn.Module):
    """A ``SuperpositionModel`` (ReLU(W_out W_in x + b)) whose weights are fc1 / fc2."""

    def __init__(self, like: models.SuperpositionModel):
        super().__init__()
        self.fc1 = nn.Linear(like.encoder.in_features, like.encoder.out_features, bias=False)
        self.fc2 = nn.Linear(like.decoder.in_features, like.decoder.out_features)
        self.load_state_dict({"fc1.weight": like.encoder.weight, "fc2.weight": like.decoder.weight,
                              "fc2.bias": like.decoder.bias})

    def forward(self, x):
        return torch.relu(self.fc2(self.fc1(x)))


_NAMES = {"encoder.weight": "fc1.weight", "decoder.weight": "fc2.weight", "decoder.bias": "fc2.bias"}


def _exact_subnetworks(m: models.SuperpositionModel, A: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per feature i: W_in's column i and the W_out that maps it to A[:, i] exactly."""
    w_in = m.encoder.weight.detach()
    enc = torch.zeros(A.shape[1], *w_in.shape)
    dec = torch.zeros(A.shape[1], A.shape[0], w_in.shape[0])
    for i in range(A.shape[1]):
        enc[i, :, i] = w_in[:, i]
        dec[i] = torch.outer(A[:, i], w_in[:, i]) / w_in[:, i].pow(2).sum()
    return {"encoder.weight": enc, "decoder.weight": dec, "decoder.bias": torch.zeros(A.shape[1], A.shape[0])}


def test_circuit_metrics_take_the_weight_names_of_any_model():
    """A TMCS-shaped model with weights fc1 / fc2 scores as the same SuperpositionModel does
    once w_in= / w_out= name them (it used to fail: no attribute 'encoder')."""
    torch.set_num_threads(1)
    sm = models.tmcs(0)
    mine = _Renamed(sm)
    A = data.circuit_matrix(10, 10, seed=1)
    subs = _exact_subnetworks(sm, A)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    subs = {n: v[perm] for n, v in subs.items()}
    names = dict(w_in="fc1.weight", w_out="fc2.weight")

    theirs = metrics.superposition_directions(sm, decoder_rows=True)
    ours = metrics.superposition_directions(mine, decoder_rows=True, **names)
    assert sorted(ours) == ["fc1.weight", "fc2.weight"]
    for n in theirs:
        assert torch.equal(ours[_NAMES[n]], theirs[n])
    assert torch.equal(metrics.model_circuit_matrix(mine, w_in="fc1.weight"), metrics.model_circuit_matrix(sm))
    expected = metrics.circuit_recovery(sm, subs, A)
    got = metrics.circuit_recovery(mine, {_NAMES[n]: v for n, v in subs.items()}, A, **names)
    assert got["match"] == expected["match"] == torch.argsort(perm).tolist()
    for key in ("r2", "r2_decoder", "pearson_r"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key


def test_circuit_metrics_name_the_missing_weight_and_the_argument():
    sm = models.tmcs(0)
    mine = _Renamed(sm)
    A = data.circuit_matrix(10, 10, seed=1)
    subs = _exact_subnetworks(sm, A)
    for call in (lambda: metrics.superposition_directions(mine),
                 lambda: metrics.model_circuit_matrix(mine),
                 lambda: metrics.circuit_recovery(mine, subs, A)):
        with pytest.raises(KeyError, match=r"no weight 'encoder.weight' \(w_in=\); its parameters are "
                                           r"\['fc1.weight', 'fc2.weight', 'fc2.bias'\]: pass w_in="):
            call()
    with pytest.raises(KeyError, match=r"no weight 'decoder.weight' \(w_out=\).*pass w_out="):
        metrics.superposition_directions(mine, decoder_rows=True, w_in="fc1.weight")
    with pytest.raises(ValueError, match=r"w_in='fc2.bias' must name the \[hidden, d_in\] weight"):
        metrics.superposition_directions(mine, w_in="fc2.bias")
    # subnetworks without a W_out part: named, not a bare KeyError 'decoder.weight'
    with pytest.raises(KeyError, match=r"the subnetworks hold no \['decoder.weight'\].*they have \['encoder.weight'\]"):
        metrics.circuit_recovery(sm, {"encoder.weight": subs["encoder.weight"]}, A)


def test_model_circuit_matrix_is_a_reference_that_subnetworks_can_pass():
    """Hand-made subnetworks give back all of A (r2_decoder 1) while the model's own matrix
    f(e_i) - f(0) gives less: the docstrings call it a reference, not the most a decomposition
    can give back."""
    sm = models.tmcs(0)
    A = data.circuit_matrix(10, 10, seed=1)
    own = metrics.model_circuit_matrix(sm)
    r2_model = metrics.coefficient_r2(A.T, own.T)
    assert metrics.circuit_recovery(sm, _exact_subnetworks(sm, A), A)["r2_decoder"] == pytest.approx(1.0)
    assert r2_model < 0.99
    assert "not an upper bound" in " ".join(metrics.model_circuit_matrix.__doc__.lower().split())
    assert "not a ceiling" in " ".join(scorecard.__doc__.split())


def test_higher_rank_target_is_one_live_subnetwork_per_group_of_the_toy():
    """A hand-made higher-rank toy with 4 groups of 2 inputs: ``evaluate`` gives its
    ``n_groups`` and ``scorecard`` asks for 4 ones, not the paper's 5 (which 4 groups never meet)."""
    torch.set_num_threads(1)
    A = data.circuit_matrix(6, 8, seed=5)
    m = models.SuperpositionModel(8, 4, 6, seed=1)
    toy = Toy("higher_rank", m, [0.0], data.grouped_features(64, 8, 2, seed=2),
              data.grouped_features(200, 8, 2, seed=3), None, {"A": A, "group_size": 2})
    dec = l3d_lens.decompose(m, toy.l3d_data, recommended_config("higher_rank", epochs=1), progress=False)
    r = evaluate(toy, dec)
    assert r["n_groups"] == 4 and len(r["live_per_group"]) == 4
    assert scorecard("higher_rank", r)[0]["target"] == [1, 1, 1, 1]
    four = {"live_per_group": [1, 1, 1, 1], "n_groups": 4, "n_live_impure": 0}
    assert scorecard("higher_rank", four).met
    assert not scorecard("higher_rank", {**four, "n_groups": 5}).met
    assert not scorecard("higher_rank", {**four, "live_per_group": [1, 1, 2, 0]}).met


def test_output_effects_refuse_names_the_model_lacks_and_wrong_shapes():
    m = models.tmcs(0)
    x = data.sparse_features(4, 10, seed=0)
    subs = {"encoder.weight": torch.rand(3, 5, 10), "decoder.weight": torch.rand(3, 10, 5)}
    assert metrics.output_effects(m, subs, x).shape == (3, 4, 10)
    # one name the model lacks: refused, not a JVP over the other weights only
    with pytest.raises(ValueError, match=r"weights \['foo.weight'\] that the model does not have \(it has "
                                         r"\['decoder.bias', 'decoder.weight', 'encoder.weight'\]\)"):
        metrics.output_effects(m, {**subs, "foo.weight": torch.zeros(3, 2, 2)}, x)
    # TMS-shaped subnetworks on the TMCS model: the shape, not a jvp RuntimeError
    with pytest.raises(ValueError, match=r"subnetworks\['encoder.weight'\] must be \[n_subnetworks, \*\(5, 10\)\]"
                                         r" \(the weight's shape\), got \(3, 2, 5\)"):
        metrics.output_effects(m, {"encoder.weight": torch.rand(3, 2, 5)}, x)
    with pytest.raises(ValueError, match="different leading sizes across weights"):
        metrics.output_effects(m, {"encoder.weight": torch.rand(3, 5, 10), "decoder.weight": torch.rand(2, 10, 5)}, x)


def test_evaluate_refuses_a_paired_decomposition_with_a_message_true_for_it():
    torch.set_num_threads(1)
    toy = make_toy("tmcs", 0, epochs=1, n_train=50, n_l3d=32, n_eval=50)
    cfg = recommended_config("tmcs", epochs=1, reference="paired")
    dec = l3d_lens.decompose(toy.model, toy.l3d_data, cfg, reference=toy.l3d_data.roll(1, 0), progress=False)
    with pytest.raises(ValueError, match=r"evaluate does not support paired decompositions \(reference='paired'\).*"
                                         r"recommended_config\('tmcs'\)"):
        evaluate(toy, dec)
