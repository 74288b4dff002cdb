"""Memory review 4: under torch.distributed the estimate of the outputs every rank gathers for
its references is the size of what ``Task.references`` gathers, in token mode too (a row of
d_vocab per position: it counted seq_len * d_vocab per position, 64x too much at 64 tokens,
and refused data-parallel runs that fit)."""

from __future__ import annotations

import pytest
import torch

import l3d_lens
from l3d_lens import distributed, memory
from l3d_lens.decomposition import build_task

from .helpers import tiny_lm

torch.set_num_threads(1)
GATHERED = "outputs gathered from every rank"


@pytest.mark.parametrize("sample, position", [("token", -1), ("sequence", "all"), ("sequence", -1)])
def test_the_gathered_outputs_are_sized_as_the_references_gather_them(monkeypatch, sample, position):
    model = tiny_lm("bridge", dtype=torch.float32, d_vocab=1000, n_ctx=64)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=4, rank=2, sample=sample, position=position,
                             batch_size=32)
    task = build_task(model, cfg)
    world, seq = 2, 64
    gathered = []

    def gather_cat(x):  # what every rank would receive: the world's shares of this rank's rows
        gathered.append(x.shape)
        return torch.cat([x] * world), slice(0, x.shape[0])

    monkeypatch.setattr(distributed, "world", lambda: world)
    monkeypatch.setattr(distributed, "gather_cat", gather_cat)
    monkeypatch.setattr(task, "sharded", True)
    outputs = torch.randn(32 // world, seq, 1000)
    task.references(outputs, torch.Generator().manual_seed(0))
    actual = world * gathered[0].numel() * 4  # float32 log-probs of the global batch
    estimate = memory.estimate(task, 32 // world, seq)[GATHERED]
    assert actual <= estimate <= 1.5 * actual, (estimate, actual)
