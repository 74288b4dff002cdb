"""Data review 2: an epoch that reads no batch (data that does not restart on a new pass) is an
error, not a run of loss 0 with every subnetwork dead, and an epoch of fewer batches than the
first warns; the (data, reference) pairs of an iterable must have one shape, as tensors must;
batches come detached from the user's autograd graph, so no engine backpropagates into data."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import l3d_lens
from l3d_lens import training

from .helpers import TinyMLP, killed_at_step, tiny_lm, tokens

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:the last epoch's reconstruction loss")


def mlp_cfg(**kw):
    base = dict(components=["fc1", "fc2"], n_subnetworks=2, rank=1, epochs=3, batch_size=3, reference="mean",
                dtype="float64")
    return l3d_lens.L3DConfig(**{**base, **kw})


def rows(n=12, seed=0):
    return torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class OneShot(IterableDataset):
    """An IterableDataset over one generator: each iter() goes on where the last stopped."""

    def __init__(self, x):
        self.gen = (row for row in x)

    def __iter__(self):
        return self.gen


class Stream:
    """A re-iterable of batches; with ``shrink``, a pass read to its end drops the last batch."""

    def __init__(self, items, shrink=False):
        self.items, self.shrink = list(items), shrink

    def __iter__(self):
        yield from self.items
        if self.shrink:
            self.items.pop()


def epoch_warnings(record):
    return [str(w.message) for w in record if "fewer than the" in str(w.message)]


def resumed_without_epoch_warnings(x, cfg, folder):
    """The run of ``x`` in batches of 3 resumed from ``folder``'s checkpoint, asserting that no
    epoch warned of fewer batches."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dec = l3d_lens.decompose(TinyMLP(), Stream(x.split(3)), cfg, progress=False, checkpoint=folder)
    assert not epoch_warnings(record)
    return dec


def test_a_dataloader_over_a_one_shot_dataset_is_refused_when_an_epoch_reads_no_batch():
    loader = DataLoader(OneShot(rows(24)), batch_size=3)
    with pytest.raises(ValueError, match=r"epoch 1 read no batch: the data gives no batches on a new pass \(it is "
                                         r"not re-iterable.*DataLoader over a one-shot IterableDataset.*pass a "
                                         r"tensor, a list of batches, or an iterable that restarts on each iter\(\)"):
        l3d_lens.decompose(TinyMLP(), loader, mlp_cfg(), progress=False)


def test_a_language_model_on_a_one_shot_loader_is_refused_too():
    model = tiny_lm("bridge", attn_only=True, n_layers=1)
    loader = DataLoader(OneShot(tokens(40, 6)), batch_size=4)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=3, batch_size=4)
    with pytest.raises(ValueError, match=r"epoch \d read no batch"):
        l3d_lens.decompose(model, loader, cfg, progress=False)


def test_an_epoch_of_fewer_batches_than_the_first_warns():
    x = rows(12)
    with pytest.warns(UserWarning, match=r"epoch 1 read 3 batches, fewer than the 4 of epoch 0: the data changed "
                                         r"between passes"):
        dec = l3d_lens.decompose(TinyMLP(), Stream(x.split(3), shrink=True), mlp_cfg(epochs=2), progress=False)
    assert [h["steps"] for h in dec.history] == [4, 7]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        l3d_lens.decompose(TinyMLP(), Stream(x.split(3)), mlp_cfg(epochs=2), progress=False)
    assert not epoch_warnings(record)


def test_resuming_at_the_end_of_an_epoch_reads_no_new_batch_and_is_no_error(tmp_path, monkeypatch):
    """A checkpoint saved on an epoch's last batch (the run stopped before the epoch's end) resumes
    into an epoch with every batch skipped: its skipped batches count, so it neither errs nor warns."""
    x, cfg = rows(12), mlp_cfg(epochs=2)
    real = training.warn_diverged

    def stop_once(*args):
        monkeypatch.setattr(training, "warn_diverged", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "warn_diverged", stop_once)  # after epoch 0's last step and its save
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(TinyMLP(), Stream(x.split(3)), cfg, progress=False, checkpoint=tmp_path,
                           checkpoint_every=1)
    monkeypatch.undo()
    dec = resumed_without_epoch_warnings(x, cfg, tmp_path)
    assert [h["steps"] for h in dec.history] == [4, 8]


def test_resuming_mid_epoch_counts_the_skipped_batches(tmp_path, monkeypatch):
    x, cfg = rows(12), mlp_cfg(epochs=3)
    killed_at_step(monkeypatch, 6)  # batch 2 of epoch 1
    with pytest.raises(KeyboardInterrupt):
        l3d_lens.decompose(TinyMLP(), Stream(x.split(3)), cfg, progress=False, checkpoint=tmp_path,
                           checkpoint_every=1)
    monkeypatch.undo()
    dec = resumed_without_epoch_warnings(x, cfg, tmp_path)
    assert [h["steps"] for h in dec.history] == [4, 8, 12]


@pytest.mark.parametrize("sample, ref_rows, ref_seq", [("token", 6, 4), ("sequence", 5, 6), ("sequence", 4, 3),
                                                       ("token", 4, 5)])
def test_a_paired_iterable_refuses_a_reference_of_another_shape_before_training(monkeypatch, sample, ref_rows,
                                                                                ref_seq):
    model = tiny_lm("bridge", attn_only=True, n_layers=1)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=1, epochs=1, batch_size=4,
                             sample=sample, reference="paired")
    x, ref = tokens(4, 6), tokens(ref_rows, ref_seq, seed=2)
    monkeypatch.setattr(training, "step", lambda *a: pytest.fail("training started"))
    with pytest.raises(ValueError, match=rf"batch 0 of the data: reference has shape \({ref_rows}, {ref_seq}\), data "
                                         r"has \(4, 6\); they must match"):
        l3d_lens.decompose(model, [(x, ref)], cfg, progress=False)


def test_a_later_pair_of_another_shape_is_refused_by_its_batch_index():
    x = rows(12)
    pairs = [(x[:3], x[3:6]), (x[3:6], x[6:9]), (x[6:9], x[9:11])]
    cfg = mlp_cfg(epochs=1, reference="paired")
    with pytest.raises(ValueError, match=r"batch 2 of the data: reference has shape \(2, 5\), data has \(3, 5\); "
                                         r"they must match"):
        l3d_lens.decompose(TinyMLP(), pairs, cfg, progress=False)
    dec = l3d_lens.decompose(TinyMLP(), pairs[:2], cfg, progress=False)
    with pytest.raises(ValueError, match=r"batch 2 of the data: reference has shape"):
        dec.coefficients(pairs)


@pytest.mark.parametrize("engine", ["exact", "fast"])
def test_training_does_not_backpropagate_into_data_that_requires_grad(engine):
    mean, paired = mlp_cfg(epochs=1, engine=engine), mlp_cfg(epochs=1, engine=engine, reference="paired")
    leaf, ref = rows(12).requires_grad_(), rows(12, seed=1).requires_grad_()
    before = leaf.detach().clone()
    l3d_lens.decompose(TinyMLP(), leaf, mean, progress=False)
    l3d_lens.decompose(TinyMLP(), leaf, paired, progress=False, reference=ref)
    assert leaf.grad is None and ref.grad is None
    assert leaf.requires_grad and torch.equal(leaf.detach(), before)
    upstream = torch.nn.Linear(3, 5).double()
    made = upstream(torch.randn(12, 3, dtype=torch.float64))  # no leaf: a graph to upstream's parameters
    l3d_lens.decompose(TinyMLP(), made, mean, progress=False)
    l3d_lens.decompose(TinyMLP(), [made[:6], made[6:]], mean, progress=False)
    l3d_lens.decompose(TinyMLP(), [(made[:6], made[6:])], paired, progress=False)
    assert upstream.weight.grad is None and upstream.bias.grad is None
