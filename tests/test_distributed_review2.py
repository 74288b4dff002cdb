"""A rank that fails alone, in decompose's checks or in its share of a training step, stops
every rank at once with one error naming it and why, instead of leaving the others waiting in a
collective until the process-group timeout (30 minutes with gloo, then an error naming no cause).
Ranks are 2 gloo processes with a 20 s process-group timeout and a join deadline, so that a
regression fails rather than hangs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import l3d_lens
from l3d_lens import decomposition, distributed

from . import helpers


class Breakable(nn.Module):
    """A small MLP whose forward raises on the rank where ``broken`` is set: a failure of one
    rank's share of a batch before the reference draw's collective."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.broken = False

    def forward(self, x):
        if self.broken:
            raise ValueError("this rank's forward is broken")
        return self.net(x)


def setup(case: str, rank: int):
    """The model, data and config rank ``rank`` passes in ``case``."""
    torch.manual_seed(0)
    model = Breakable().double()
    data = torch.randn(16, 4, dtype=torch.float64)
    cfg = l3d_lens.L3DConfig(components=["net.0.weight"], n_subnetworks=3, rank=1, epochs=1, batch_size=16,
                             dtype="float64", reference="zero")
    if case == "dtype" and rank == 1:  # only rank 1's check_run fails
        data = data.float()
    if case == "component" and rank == 1:  # rank 1's config differs, and its selection fails
        cfg = cfg.replace(components=["net.7.weight"])
    if case == "nan_row":  # the same data on every rank: the rank that holds the NaN row fails its step
        data[5] = float("nan")
    if case in ("forward", "forward_checked"):  # rank 0 waits in the reference draw's gather
        model.broken = rank == 1
        cfg = cfg.replace(reference="mean")
    if case == "forward":
        # the fast engine's check before training runs the broken forward first ("forward_checked"):
        # this case is about a step, so that check is left out (in the spawned rank's process only)
        decomposition.check_shortcut = lambda *args, **kwargs: None
    return model, data, cfg


def worker(rank: int, world: int, init_file: str, out: str, case: str) -> None:
    """One rank: decompose ``case`` (``helpers.in_process_group`` writes what it raised)."""
    helpers.in_process_group(rank, world, init_file, out,
                             lambda: l3d_lens.decompose(*setup(case, rank), progress=False))


def run_ranks(tmp_path: Path, case: str) -> list[str]:
    return helpers.run_ranks(worker, tmp_path, case)


def test_a_rank_that_fails_its_checks_stops_every_rank(tmp_path):
    """Rank 1's data does not suit the model: it raised its own error and rank 0 waited in
    training's first collective until the timeout."""
    rank0, rank1 = run_ranks(tmp_path, "dtype")
    assert rank1.startswith("TypeError: data is torch.float32 but the model's parameters are torch.float64"), rank1
    assert rank0.startswith("ValueError: rank 1 failed its checks before training (TypeError: data is torch.float32 "
                            "but the model's parameters are torch.float64"), rank0
    assert rank0.endswith("); every rank stops"), rank0


def test_a_forward_that_fails_in_the_checks_before_training_stops_every_rank(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, "forward_checked")
    assert rank1.startswith("ValueError: this rank's forward is broken"), rank1
    assert rank0.startswith("ValueError: rank 1 failed its checks before training (ValueError: this rank's forward "
                            "is broken)"), rank0
    assert rank0.endswith("; every rank stops"), rank0


def test_a_config_that_differs_is_named_rather_than_its_consequence(tmp_path):
    """Rank 1 selects a weight the model lacks: every rank names the differing config field."""
    errors = run_ranks(tmp_path, "component")
    message = ("ValueError: the ranks of this torch.distributed run were given different config components (rank 1 "
               "unlike rank 0); every rank must pass the same config, model and whole data")
    assert all(e.startswith(message) for e in errors), errors


@pytest.mark.parametrize("case", ["nan_row", "forward"])
def test_a_rank_that_fails_its_share_of_a_step_stops_every_rank(tmp_path, case):
    """nan_row: the rank holding the NaN row raises FloatingPointError; forward: rank 1's forward
    raises before the reference draw. The other rank waited in a gather until the timeout."""
    errors = run_ranks(tmp_path, case)
    if case == "nan_row":
        failed = next(r for r, e in enumerate(errors) if e.startswith("FloatingPointError"))
        reason = "FloatingPointError: non-finite (NaN/inf) per-sample gradient for weight net.0.weight at step 0"
    else:
        failed, reason = 1, "ValueError: this rank's forward is broken"
    assert errors[failed].startswith(reason), errors
    other = errors[1 - failed]
    assert other.startswith(f"RankFailed: rank {failed} failed at step 0 (epoch 0): {reason}"), other
    assert other.endswith("; every rank stops"), other


def test_a_long_reason_is_cut_to_fit_its_fixed_size():
    """Every rank sends as many words, whatever its reason; a cut multi-byte character is dropped."""
    words = distributed.reason_words("é" * 1000)
    assert len(words) == len(distributed.reason_words(None)) == 1 + distributed.REASON_BYTES
    reason = distributed.failures([distributed.reason_words(None), words])[1]
    assert reason.endswith("...") and set(reason[:-3]) == {"é"} and len(reason.encode()) <= distributed.REASON_BYTES
    assert distributed.failures([distributed.reason_words("short")]) == {0: "short"}
