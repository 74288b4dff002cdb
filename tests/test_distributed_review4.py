"""Distributed review 4: ``distributed.local()`` runs l3d_lens in one process under an
initialised group (``decompose`` on rank 0 alone waited for the others until the timeout); a
checkpoint save that fails on rank 0 stops every rank with one error naming it (the others
waited in the next collective); ranks given different checkpoint settings are refused before
training. Ranks are 2 gloo processes with a 20 s timeout (``helpers.in_process_group``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import l3d_lens
from l3d_lens import checkpoint as ckpt

from . import helpers
from .scale_helpers import ddp_setup

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:the last epoch.s reconstruction loss")


def full_disk_at_second_save():
    """``checkpoint.save`` that fails (ENOSPC) from its second call on."""
    save, calls = ckpt.save, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        return save(*args, **kwargs)

    ckpt.save = failing


def worker(rank: int, world: int, init_file: str, out: str, case: str) -> None:
    def body():
        model, data, cfg = ddp_setup("token")
        if case == "local":
            if rank == 0:
                with l3d_lens.distributed.local():
                    dec = l3d_lens.decompose(model, data, cfg, progress=False)
                save_file({k: v.contiguous() for k, v in dec.factors.items()}, f"{out}.factors")
            return
        folder = str(Path(out).parent / "ck")
        if case == "save_fails":
            if rank == 0:
                full_disk_at_second_save()
            l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=folder, checkpoint_every=1)
        if case == "settings":
            l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=folder if rank == 0 else None)

    helpers.in_process_group(rank, world, init_file, out, body)


def test_local_runs_decompose_on_one_rank_as_one_process(tmp_path):
    assert helpers.run_ranks(worker, tmp_path, "local") == ["ok", "ok"]
    model, data, cfg = ddp_setup("token")
    alone = l3d_lens.decompose(model, data, cfg, progress=False)
    factors = load_file(tmp_path / "out.factors")
    for k, v in alone.factors.items():
        assert torch.equal(factors[k], v), k


def test_local_is_undone_after_its_block():
    assert l3d_lens.distributed.active() is False
    with l3d_lens.distributed.local():
        with l3d_lens.distributed.local():
            pass
        assert l3d_lens.distributed._LOCAL.get()
    assert not l3d_lens.distributed._LOCAL.get()


def test_a_checkpoint_save_that_fails_on_rank_0_stops_every_rank(tmp_path):
    rank0, rank1 = helpers.run_ranks(worker, tmp_path, "save_fails")
    assert rank0 == "OSError: [Errno 28] No space left on device", rank0
    assert rank1 == ("ValueError: rank 0 failed to save the checkpoint at step 2 (see its error); every rank "
                     "stops"), rank1


def test_ranks_with_different_checkpoint_settings_are_refused(tmp_path):
    rank0, rank1 = helpers.run_ranks(worker, tmp_path, "settings")
    message = ("ValueError: the ranks of this torch.distributed run were given different checkpoint settings (rank 0 "
               "checkpoint_every=0, rank 1 checkpoint=None); every rank must pass the same checkpoint folder")
    assert rank0.startswith(message) and rank1.startswith(message), (rank0, rank1)
