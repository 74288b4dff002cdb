"""A run that diverges warns, naming the epoch and the learning rate, and its factors are not
saved (the CLI saved them with exit 0, and they could not be loaded again); a run whose loss
ends above 1 (worse than no reconstruction) warns."""

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


def test_a_diverged_run_warns_once_and_cannot_be_saved(model, tmp_path):
    data = induction.repeated_sequences(8, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = l3d_lens.decompose(model, data, small(lr=1e30, epochs=3), progress=False)
    diverged = [str(w.message) for w in caught if "L3D diverged" in str(w.message)]
    assert len(diverged) == 1 and diverged[0].startswith("L3D diverged in epoch 0: ")
    assert "lower the learning rate (lr was 1e+30 this epoch)" in diverged[0]
    assert len(dec.history) == 3 and dec.history[-1]["loss"] != dec.history[-1]["loss"]  # NaN: best_of ranks it last
    with pytest.raises(FloatingPointError, match=r"holds NaN or inf: this decomposition's training diverged"):
        dec.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_the_cli_saves_nothing_from_a_diverged_run(tmp_path, capsys):
    from l3d_lens.cli import main

    code = main(["decompose", "induction", "--components", "blocks.0.attn", "--n-subnetworks", "3", "--rank", "1",
                 "--epochs", "1", "--lr", "1e30", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and "lower learning rate (lr=1e+30)" in err and "Traceback" not in err
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


def test_the_warnings_point_at_the_callers_line(model):
    data = induction.repeated_sequences(8, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l3d_lens.decompose(model, data, small(lr=1e30), progress=False)
    ours = [w for w in caught if "L3D diverged" in str(w.message) or "worse than none" in str(w.message)]
    assert ours and all(w.filename == __file__ for w in ours), [(w.filename, str(w.message)[:40]) for w in ours]


def test_a_diverged_run_keeps_its_last_finite_checkpoint(model, tmp_path):
    """Checkpoints stop once the factors are non-finite: the folder keeps the last finite state,
    which a rerun reads and resumes (and diverges again, warning), instead of calling the folder
    damaged (its NaN factors could not be read)."""
    from l3d_lens import checkpoint as ckpt

    data = induction.repeated_sequences(8, seed=0)
    cfg = small(lr=1e30, epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    assert dec.history[-1]["loss"] != dec.history[-1]["loss"]
    saved = ckpt.read(tmp_path)
    assert saved is not None, "no finite checkpoint was kept (the first step's factors are finite)"
    folder, state, tensors = saved
    assert state["step"] < 6 and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    with pytest.warns(UserWarning, match="L3D diverged"):
        again = l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path, checkpoint_every=1)
    assert len(again.history) == 3
