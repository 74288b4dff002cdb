"""Data-parallel L3D on the embedded model: each rank takes its share of every global batch.

    torchrun --nproc_per_node 2 demos/distributed.py        # CPU (gloo); NCCL on GPUs

The result equals a single-process run on the same global batches (up to the order of
floating-point sums); rank 0 saves it. A checkpoint folder makes the run resumable.
"""

import os

import torch
import torch.distributed as dist

import l3d_lens
from l3d_lens.zoo import induction

torch.set_num_threads(1)
if torch.cuda.is_available():  # NCCL: one GPU per rank, and the model (so the data and collectives) on it
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
else:
    device = torch.device("cpu")
    dist.init_process_group("gloo")
try:
    model = induction.load().to(device)
    data = induction.repeated_sequences(256, seed=0)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=8, rank=4, epochs=2,
                             batch_size=64, include_biases=False)
    dec = l3d_lens.decompose(model, data, cfg, checkpoint="l3d_ddp_checkpoint", checkpoint_every=2)
    if dist.get_rank() == 0:
        dec.save("l3d_ddp_out")
        print(dec)
    dist.barrier()  # every rank is done with its collectives and files before gloo/NCCL is torn down
finally:
    dist.destroy_process_group()
