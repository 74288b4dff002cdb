"""Retrain the embedded default model (l3d_lens/assets/induction) from scratch.

    python scripts/train_default_model.py

One CPU thread, a few minutes; prints the induction losses it reaches."""

import torch

from l3d_lens.zoo import induction

torch.set_num_threads(1)
model = induction.train(kind="hooked")
path = induction.save(model)
print("saved to", path, "loss first half / repeated half:", induction.induction_loss(model))
