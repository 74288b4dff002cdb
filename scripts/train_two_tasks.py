"""Retrain the two-task model (l3d_lens/assets/two_tasks) from scratch.

    python scripts/train_two_tasks.py

One CPU thread, about a minute. Prints the accuracies it reaches and the per-head ablation
table that checks the ground truth (each task's heads matter, every other head is silent at
the answer position)."""

import time

import torch

from l3d_lens.zoo import two_tasks

torch.set_num_threads(1)
t = time.perf_counter()
model = two_tasks.train(kind="hooked")
path = two_tasks.save(model)
print(f"trained in {time.perf_counter() - t:.0f} s; saved to {path}")
print(two_tasks.evaluate(model))
print(two_tasks.head_ablation(model).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
