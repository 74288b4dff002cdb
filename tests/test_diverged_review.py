"""A run that diverges stops with an error naming the epoch and the learning rate, instead of
returning (and the CLI saving) factors that cannot be loaded again; a run whose loss ends above
1 (worse than no reconstruction) warns."""

import warnings

import pytest
import torch

import l3d_lens
from l3d_lens.zoo import induction


@pytest.fixture(scope="module")
def model():
    return induction.load()


def small(**kw):
    base = dict(components=["blocks.0.attn"], n_subnetworks=3, rank=1, epochs=2, batch_size=4, seed=0)
    return l3d_lens.L3DConfig(**{**base, **kw})


def test_a_diverged_run_stops_with_the_epoch_and_the_learning_rate(model):
    data = induction.repeated_sequences(8, seed=0)
    with pytest.raises(FloatingPointError, match=r"L3D diverged in epoch 0: .*lower the learning rate \(lr was 1e\+30"):
        l3d_lens.decompose(model, data, small(lr=1e30), progress=False)


def test_the_cli_saves_nothing_from_a_diverged_run(tmp_path, capsys):
    from l3d_lens.cli import main

    code = main(["decompose", "induction", "--components", "blocks.0.attn", "--n-subnetworks", "3", "--rank", "1",
                 "--epochs", "1", "--lr", "1e30", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "L3D diverged in epoch 0" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "decomposition.json").exists()


def test_a_run_that_ends_worse_than_no_reconstruction_warns(model):
    data = induction.repeated_sequences(8, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = l3d_lens.decompose(model, data, small(lr=3.0), progress=False)
    loss = dec.history[-1]["loss"]
    above = [w for w in caught if "worse than none would" in str(w.message)]
    assert (loss > 1) == bool(above), (loss, [str(w.message) for w in caught])
    assert loss > 1, f"lr=3 was expected to end above 1 on this model; it ended at {loss}"


def test_a_good_run_neither_warns_nor_stops(model):
    data = induction.repeated_sequences(8, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = l3d_lens.decompose(model, data, small(lr=0.01), progress=False)
    assert dec.history[-1]["loss"] < 1 and torch.isfinite(dec.history[-1]["loss"] * torch.ones(1)).all()
    assert not [w for w in caught if "worse than none" in str(w.message)]
