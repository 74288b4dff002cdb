"""Toy models and metrics that do not depend on the session's state: ``make_toy`` gives the
same float32 toy whatever ``torch.get_default_dtype()`` says, the metrics run a model left in
train mode (dropout, BatchNorm) in eval mode without touching its buffers, ``Toy.inputs`` never
gives back the toy's own data, and ``best_of`` refuses a seed given twice as ``sweep`` does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from l3d_lens.toy import make_toy, metrics, training_data
from l3d_lens.toy import sweep as sweep_module
from l3d_lens.toy.reproduce import recommended_config

torch.set_num_threads(1)

QUICK = dict(epochs=1, n_train=200, n_l3d=40, n_eval=30, check_learned=False)


def _toy_tensors(toy) -> dict[str, torch.Tensor]:
    """Everything a toy holds as tensors: weights, data, truth and a draw of ``inputs``."""
    out = {f"model.{k}": v for k, v in toy.model.state_dict().items()}
    out.update({f"truth.{k}": v for k, v in toy.truth.items() if isinstance(v, torch.Tensor)})
    out.update({"l3d_data": toy.l3d_data, "eval_data": toy.eval_data, "inputs": toy.inputs(20, 5),
                "train_losses": torch.tensor(toy.train_losses, dtype=torch.float64)})
    return out


@pytest.mark.parametrize("name", ["tms", "tmcs", "higher_rank", "square"])
def test_make_toy_is_the_same_float32_toy_under_a_float64_default_dtype(name):
    reference = _toy_tensors(make_toy(name, 1, **QUICK))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as a numerical notebook may have set it
    try:
        toy = make_toy(name, 1, **QUICK)
        x, y = training_data(name, 1, n_train=200)
    finally:
        torch.set_default_dtype(before)
    assert torch.get_default_dtype() == before
    got = _toy_tensors(toy)
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert x.dtype == y.dtype == torch.float32
    x32, y32 = training_data(name, 1, n_train=200)
    assert torch.equal(x, x32) and torch.equal(y, y32)


def _train_mode_model() -> nn.Module:
    """A user's model with dropout and BatchNorm, left in train mode (nn.Module's default)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, 5))
    with torch.no_grad():  # running statistics that differ from a batch's own, so eval mode shows
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    return model.train()


def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs in eval mode (no dropout, BatchNorm's running statistics); train mode after."""
    with torch.no_grad():
        out = model.eval()(x)
    model.train()
    return out


def _assert_untouched(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Every module back in train mode, and every buffer (BatchNorm's statistics) as it was."""
    assert all(m.training for m in model.modules())
    after = dict(model.named_buffers())
    assert after.keys() == buffers.keys()
    for name, value in buffers.items():
        assert torch.equal(after[name], value), name


@pytest.fixture
def train_mode():
    """(model in train mode, its buffers' copies, inputs, three subnetworks of its two weights)."""
    model = _train_mode_model()
    gen = torch.Generator().manual_seed(1)
    subs = {"0.weight": torch.randn(3, 4, 5, generator=gen), "3.weight": torch.randn(3, 5, 4, generator=gen)}
    return model, {n: b.clone() for n, b in model.named_buffers()}, torch.rand(64, 5, generator=gen), subs


def test_intervention_change_at_delta_zero_is_zero_for_a_train_mode_model(train_mode):
    model, buffers, x, subs = train_mode
    change = metrics.intervention_change(model, metrics.subnetwork(subs, 0), x, [0.0, 0.0])
    assert torch.equal(change, torch.zeros_like(change))  # no dropout mask differs between the forwards
    _assert_untouched(model, buffers)


def test_metrics_that_run_a_train_mode_model_run_it_in_eval_mode(train_mode):
    model, buffers, x, subs = train_mode
    effects = metrics.output_effects(model, subs, x[:8])  # functorch refused BatchNorm's in-place update
    assert torch.equal(effects, metrics.output_effects(model, subs, x[:8]))
    expected = _eval_outputs(model, x)
    assert metrics.feature_r2(model, x, expected) == pytest.approx([1.0] * 5)  # eval-mode outputs, not dropout's
    eye = _eval_outputs(model, torch.eye(5)) - _eval_outputs(model, torch.zeros(1, 5))
    assert torch.equal(metrics.model_circuit_matrix(model, w_in="0.weight"), eye.T)
    relevant = torch.zeros(64, 5, dtype=torch.bool)
    relevant[:, 0] = True
    out = metrics.selectivity(model, metrics.subnetwork(subs, 0), x, relevant, deltas=[0.5, 1.0])
    assert out["target_change"] == pytest.approx(0.5 * expected[:, 0].abs().mean().item())
    metrics.gradient_directions(model, x, ["0.weight"], reference="mean")
    _assert_untouched(model, buffers)


def test_inputs_never_give_back_the_toys_own_data():
    toy = make_toy("tmcs", 0, **QUICK)
    x_train, _ = training_data("tmcs", 0, n_train=200)
    own = {"training": x_train, "l3d": toy.l3d_data, "eval": toy.eval_data}
    # the toy's data streams are 1000 * seed + 1..3; torch's generator reads a seed's low 32 bits only
    for seed in [*range(20), 2**29 - 1]:
        for what, data in own.items():
            assert not torch.equal(toy.inputs(data.shape[0], seed), data), (what, seed)
    assert torch.equal(toy.inputs(7, 3), toy.inputs(7, 3)) and toy.inputs(7, 3).dtype == torch.float32
    with pytest.raises(ValueError, match="seed must be an integer"):
        toy.inputs(7, -1)


def test_best_of_refuses_a_seed_given_twice_before_any_run(monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("best_of ran decompose before refusing its seeds")

    monkeypatch.setattr(sweep_module, "decompose", no_run)
    cfg = recommended_config("tms", epochs=2)
    with pytest.raises(ValueError, match="seeds gives 1 twice"):
        sweep_module.best_of(None, None, cfg, seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds gives 0 twice"):
        sweep_module.best_of(None, None, cfg, seeds=[0, 2, 0])


def test_seeds_past_the_generators_period_are_refused():
    """torch's CPU generator reads 32 bits of a seed: 1000 * seed + stream repeats with period
    2**29 in seed, so a larger seed would silently be another seed's toy."""
    from l3d_lens.toy import make_toy
    from l3d_lens.toy.train import MAX_SEED, _seed

    a = torch.rand(4, generator=torch.Generator().manual_seed(_seed(1, 1)))
    b = torch.rand(4, generator=torch.Generator().manual_seed(_seed(1 + 2**29, 1)))
    assert torch.equal(a, b)  # the period the bound guards against
    assert MAX_SEED == 2**29 - 1
    with pytest.raises(ValueError, match="seed"):
        make_toy("tms", 2**29)


def test_a_toy_saved_with_a_seed_past_the_new_bound_still_loads(tmp_path):
    """make_toy took seeds up to about 9.2e15 before; a toy saved then (its weights are in the
    file) loads, and its inputs draw as before."""
    import dataclasses

    from l3d_lens.toy import load_toy
    from l3d_lens.toy.train import MAX_SEED

    toy = make_toy("tms", 0, **QUICK)
    old = dataclasses.replace(toy, seed=1_700_000_000)
    assert old.seed > MAX_SEED
    old.save(tmp_path / "toy")
    back = load_toy(tmp_path / "toy")
    assert back.seed == 1_700_000_000 and all(torch.equal(p, q) for p, q in zip(back.model.parameters(),
                                                                             toy.model.parameters()))
