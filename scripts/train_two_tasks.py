"""Retrain the two-task model from scratch: one run, saved as the "unpruned" variant
(l3d_lens/assets/two_tasks_unpruned), then with the unused heads pruned as the default
(l3d_lens/assets/two_tasks).

    python scripts/train_two_tasks.py

One CPU thread, about a minute. Prints the accuracies it reaches and the per-head ablation
table that checks the ground truth (each task's heads matter, every other head is silent at
the answer position). The result is a model of the same construction, not a bit-identical copy
of the shipped one (with torch 2.13 here the unpruned weights differ by up to 0.13)."""

import time

import torch

from l3d_lens.zoo import two_tasks

torch.set_num_threads(1)
t = time.perf_counter()
model = two_tasks.train(kind="hooked", prune=False)
print(f"trained in {time.perf_counter() - t:.0f} s")
for variant in ("unpruned", "default"):
    if variant == "default":
        two_tasks.prune_unused_heads(model)
    path = two_tasks.save(model, two_tasks.asset_dir(variant))
    print(f"{variant}: saved to {path}")
    print(two_tasks.evaluate(model))
    print(two_tasks.head_ablation(model).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
