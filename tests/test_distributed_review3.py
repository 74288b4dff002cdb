"""A rank that fails alone in its share of a resampling of dead subnetworks stops every rank at
once with one error naming it and why, instead of leaving the others waiting in the gather of
reconstruction errors, or in the sum of residuals, until the process-group timeout; a healthy
data-parallel resampling still matches one process. Ranks are 2 gloo processes with a 20 s
process-group timeout and a join deadline, so that a regression fails rather than hangs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import l3d_lens
from l3d_lens import resampling

from . import helpers

BROKEN = "this rank's share of the resampling is broken"


def setup():
    """A small MLP, its data and a config under which 2 of 3 subnetworks are dead at epoch 1's
    resampling (one batch per epoch, one coefficient kept per batch, dead after one step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = torch.randn(16, 4, dtype=torch.float64)
    cfg = l3d_lens.L3DConfig(components=["0.weight"], n_subnetworks=3, rank=1, epochs=2, batch_size=16,
                             dtype="float64", reference="zero", top_k=0.02, dead_steps=1, resample_epochs=(1,))
    return model, data, cfg


def broken(*args, **kwargs):
    raise ValueError(BROKEN)


def last_rows(errors, n, gen):
    """The draw of rows to resample toward, fixed to the batch's last rows: rank 1's share."""
    return list(range(errors.shape[0] - n, errors.shape[0]))


def break_rank(case: str, rank: int) -> None:
    """Make rank 1 fail in ``case``'s part of ``resample_dead``: "gradients", its batch gradients
    before the gather of errors; "residuals", a picked row's gradient before the sum of residuals."""
    if case == "residuals":
        resampling.pick_rows = last_rows  # every rank, so that rank 1 holds the picked rows
    if rank != 1:
        return
    if case == "gradients":
        resampling.gradient_batch = broken
    if case == "residuals":
        resampling.captured_gradient = broken


def worker(rank: int, world: int, init_file: str, out: str, case: str) -> None:
    """One rank: decompose with rank 1 broken in ``case`` (``helpers.in_process_group`` writes
    what it raised, "ok" if nothing), the factors to ``out.<rank>.safetensors`` and the history to
    ``out.<rank>.json``."""
    def body():
        break_rank(case, rank)
        dec = l3d_lens.decompose(*setup(), progress=False)
        save_file({k: v.contiguous() for k, v in dec.factors.items()}, f"{out}.{rank}.safetensors")
        Path(f"{out}.{rank}.json").write_text(json.dumps(dec.history))

    helpers.in_process_group(rank, world, init_file, out, body)


def run_ranks(tmp_path: Path, case: str) -> list[str]:
    return helpers.run_ranks(worker, tmp_path, case)


@pytest.mark.parametrize("case", ["gradients", "residuals"])
def test_a_rank_that_fails_its_share_of_a_resampling_stops_every_rank(tmp_path, case):
    """gradients: rank 0 waited in the gather of reconstruction errors; residuals: in the sum of
    the residuals of the picked rows, both until the timeout."""
    rank0, rank1 = run_ranks(tmp_path, case)
    assert rank1 == f"ValueError: {BROKEN}", rank1
    assert rank0 == (f"RankFailed: rank 1 failed while resampling dead subnetworks before step 1: ValueError: "
                     f"{BROKEN}; every rank stops"), rank0


def test_a_healthy_data_parallel_resampling_matches_one_process(tmp_path):
    """The failure checks add a collective, not a change: 2 ranks resample as one process does."""
    assert run_ranks(tmp_path, "healthy") == ["ok", "ok"]
    dec = l3d_lens.decompose(*setup(), progress=False)
    assert dec.history[1]["n_resampled"] == 2
    for rank in (0, 1):
        history = json.loads((tmp_path / f"out.{rank}.json").read_text())
        factors = load_file(tmp_path / f"out.{rank}.safetensors")
        assert [h["n_resampled"] for h in history] == [0, 2]
        for k, v in dec.factors.items():
            torch.testing.assert_close(factors[k], v, rtol=1e-9, atol=1e-12)
