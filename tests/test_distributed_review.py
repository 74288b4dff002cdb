"""Data-parallel runs that cannot equal one process stop on every rank with one clear error
(different data or checkpoints on different ranks), an iterable's last batch smaller than the
world joins the one before, and a checkpoint folder is held by one run at a time. Ranks are 2
gloo processes with a process-group timeout, so that no test can hang."""

from __future__ import annotations

import os
import socket
import functools
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import l3d_lens
from l3d_lens.checkpoint import LOCK, FolderLock
from l3d_lens.divergence import mse

from .helpers import process_group, tokens
from .scale_helpers import ddp_setup


class Batches:
    """A re-iterable of batches that is neither a list nor a tensor (as a DataLoader is)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def case_data(case: str, rank: int):
    """The data rank ``rank`` passes in ``case``."""
    data = tokens(27, 6)
    if case == "tensor":  # rank 1 has other rows
        return tokens(27, 6, seed=1 + rank)
    if case == "longer":  # rank 1 has one batch more
        return Batches([data[:8], data[8:16]] + ([data[16:24]] if rank == 1 else []))
    if case == "other_batch":  # same first batch, another second one on rank 1
        return Batches([data[:8], data[8:16] if rank == 0 else data[16:24]])
    if case == "small_last":  # 8, 8, 1 rows: the last cannot be split over 2 ranks
        return Batches([data[:8], data[8:16], data[16:17]])
    if case == "bad_batch":  # rank 1's second batch is not token ids: only rank 1 fails to read it
        return Batches([data[:8], data[8:16].float() if rank == 1 else data[8:16]])
    return data


def case_config(case: str, rank: int, cfg):
    """The config rank ``rank`` passes in ``case``."""
    if case == "per_rank_device":  # each rank its own device string, and a callable divergence (a partial:
        # its repr holds a memory address, which differs between processes)
        return cfg.replace(divergence=functools.partial(mse), device="cpu" if rank == 0 else "cpu:0")
    if case == "lr":
        return cfg.replace(lr=0.02 if rank == 0 else 0.03)
    return cfg


def worker(rank: int, world: int, init_file: str, out: str, case: str, checkpoint: str = "") -> None:
    """One rank: decompose the data of ``case``; the ValueError or TypeError it raises goes to ``out.<rank>``,
    rank 0's factors to ``out``."""
    with process_group(rank, world, init_file, seconds=60):
        model, _, cfg = ddp_setup("token")
        cfg = case_config(case, rank, cfg)
        try:
            dec = l3d_lens.decompose(model, case_data(case, rank), cfg, progress=False,
                                     checkpoint=f"{checkpoint}-r{rank}" if checkpoint else None)
        except (ValueError, TypeError) as e:
            Path(f"{out}.{rank}").write_text(str(e))
        else:
            if rank == 0:
                save_file({k: v.contiguous() for k, v in dec.factors.items()}, out)


def run_ranks(tmp_path: Path, case: str, checkpoint: str = "", name: str = "init") -> str:
    out = str(tmp_path / f"out-{name}")
    mp.spawn(worker, args=(2, str(tmp_path / name), out, case, checkpoint), nprocs=2, join=True)
    return out


def errors(out: str) -> list[str]:
    return [Path(f"{out}.{rank}").read_text() if Path(f"{out}.{rank}").exists() else "" for rank in (0, 1)]


@pytest.mark.parametrize("case, message", [
    ("tensor", "the ranks of this torch.distributed run were given different data (rank 1 unlike rank 0); every "
               "rank must pass the same config, model and whole data (not a DistributedSampler shard)"),
    ("longer", "the data of rank 0 ends after batch 1 of epoch 0, that of the other ranks does not; every rank must "
               "pass the same"),
    ("other_batch", "batch 1 of epoch 0 differs between ranks (rank 1 unlike rank 0); every rank must pass the same"),
])
def test_different_data_on_the_ranks_stops_every_rank(tmp_path, case, message):
    """It trained silently on a mix of both (or, data of different lengths, hung in a collective)."""
    out = run_ranks(tmp_path, case)
    assert all(e.startswith(message) for e in errors(out)), errors(out)
    assert not Path(out).exists()


def test_a_config_field_that_differs_is_named_and_per_rank_devices_are_fine(tmp_path):
    """Ranks compare their configs field by field: a different lr is named; each rank's own
    device and a callable divergence (whose repr names an address) are the same run."""
    out = run_ranks(tmp_path, "lr", name="lr")
    assert all(e.startswith("the ranks of this torch.distributed run were given different config lr (rank 1 "
                            "unlike rank 0); every rank must pass") for e in errors(out)), errors(out)
    out = run_ranks(tmp_path, "per_rank_device", name="devices")
    assert errors(out) == ["", ""] and Path(out).exists()


def test_a_batch_one_rank_cannot_read_stops_every_rank(tmp_path):
    """Rank 1's second batch is floats: rank 1 raises its own error, rank 0 says which rank
    failed, instead of waiting in the step's collective until the timeout."""
    out = run_ranks(tmp_path, "bad_batch")
    rank0, rank1 = errors(out)
    # batch 0: an iterable is read one batch ahead (a too-small batch joins the one before)
    assert rank0 == "rank 1 failed while reading its data for batch 0 of epoch 0 (see its error); every rank stops", \
        rank0
    assert rank1.startswith("data must hold token ids (an integer tensor [n, seq]), got dtype torch.float32"), rank1


def test_a_checkpoint_folder_only_some_ranks_see_is_refused(tmp_path):
    """Each rank passes its own folder, as with node-local disks: only rank 0's holds the
    checkpoint (rank 0 saves), so rank 0 would resume and rank 1 start afresh."""
    ck = str(tmp_path / "ck")
    first = run_ranks(tmp_path, "same", ck, "first")
    assert errors(first) == ["", ""] and (tmp_path / "ck-r0" / "latest.json").is_file()
    assert not (tmp_path / "ck-r1" / "latest.json").exists()
    second = run_ranks(tmp_path, "same", ck, "second")
    for e in errors(second):
        assert e.startswith("the ranks of this torch.distributed run took up different checkpoints from "), e
        assert "(rank 0 resumes step 8, rank 1 finds no checkpoint); the checkpoint folder must be shared storage " \
               "that every rank sees" in e, e


def test_an_iterables_last_batch_smaller_than_the_world_joins_the_one_before(tmp_path):
    """Batches of 8, 8 and 1 rows over 2 ranks train as batches of 8 and 9 in one process (it
    stopped after an epoch: a batch of 1 row cannot be split over 2 ranks)."""
    out = run_ranks(tmp_path, "small_last")
    assert errors(out) == ["", ""]
    model, data, cfg = ddp_setup("token")
    single = l3d_lens.decompose(model, [data[:8], data[8:17]], cfg, progress=False)
    ddp = load_file(out)
    for k, v in single.factors.items():
        assert torch.allclose(ddp[k], v, rtol=1e-9, atol=1e-12), k


def test_a_checkpoint_folder_in_use_is_refused(tmp_path):
    """A second run in a folder a live run holds would remove its unfinished saves and overwrite
    its checkpoints, so it is refused; a lock file a killed run left (its flock gone with it), even
    one naming this very process or another host, does not stop a resume."""
    model, data, cfg = ddp_setup("token")
    cfg = cfg.replace(epochs=1)
    with FolderLock() as held:  # another run holding the folder (a separate open file: flock conflicts)
        held.take(tmp_path)
        with pytest.raises(RuntimeError, match=f"checkpoint folder {tmp_path} is in use by process {os.getpid()} "):
            l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path)
    assert not (tmp_path / "latest.json").exists()
    for left in (f"{socket.gethostname()} {os.getpid()}\n", "old-node-7 1\n"):  # a restarted pod; a requeue
        (tmp_path / LOCK).write_text(left)
        l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "latest.json", "step-4"]
