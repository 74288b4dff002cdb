"""Module-level helpers for the scale-out tests (run in subprocesses and spawned ranks)."""

from __future__ import annotations

import os
import time

import torch

import l3d_lens

from .helpers import process_group, tiny_lm, tokens


def slow_kl(out, ref):
    """KL(reference || model); sleeps when L3D_TEST_SLOW is set so a run can be killed mid-way."""
    if os.environ.get("L3D_TEST_SLOW"):
        time.sleep(0.05)
    return (ref.exp() * (ref - out.log_softmax(-1))).sum(-1)


def resume_setup():
    model = tiny_lm("bridge", dtype=torch.float32)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=4, rank=2, epochs=4,
                             batch_size=8, lr=0.02, lr_step=2, divergence=slow_kl, sample="sequence")
    return model, tokens(40, 6), cfg


def run_with_checkpoint(path: str) -> None:
    torch.set_num_threads(1)
    model, data, cfg = resume_setup()
    l3d_lens.decompose(model, data, cfg, progress=False, checkpoint=path, checkpoint_every=1)


def ddp_setup(sample: str):
    model = tiny_lm("bridge", dtype=torch.float64)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=4, rank=2, epochs=2,
                             batch_size=8, lr=0.02, top_k=0.2, dtype="float64", sample=sample)
    return model, tokens(27, 6), cfg  # 27: the last global batch is uneven across 2 ranks


def ddp_worker(rank: int, world: int, init_file: str, out: str, sample: str, backend: str = "gloo") -> None:
    """One rank of a data-parallel run; with NCCL, rank r's model (so its data) is on GPU r."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    with process_group(rank, world, init_file, backend=backend):
        model, data, cfg = ddp_setup(sample)
        if backend == "nccl":
            model.to(f"cuda:{rank}")
        dec = l3d_lens.decompose(model, data, cfg, progress=False)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in dec.factors.items()}, out)
            with open(out + ".history", "w") as fh:
                import json

                json.dump(dec.history, fh)


def ddp_small_batch_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """25 sequences in batches of 8 leave a last batch of 1 for 2 ranks: every rank must stop
    before training with the same error (it used to crash after an epoch, one rank empty)."""
    with process_group(rank, world, init_file):
        model, _, cfg = ddp_setup("token")
        try:
            l3d_lens.decompose(model, tokens(25, 6), cfg, progress=False)
        except ValueError as e:
            with open(f"{out}.{rank}", "w") as fh:
                fh.write(str(e))
