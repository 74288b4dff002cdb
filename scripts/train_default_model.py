"""Retrain the embedded induction models (l3d_lens/assets/induction*) from scratch.

    python scripts/train_default_model.py                      # the default model
    python scripts/train_default_model.py --variant redundant  # without the head penalty

One CPU thread, about 4 minutes each; prints the induction losses it reaches and the circuit
(attention patterns and mean-ablation, l3d_lens.zoo.induction.identify_circuit). The default
model (head_sparsity=0.1) computes the repeat with one previous-token head and one induction
head; the redundant one (head_sparsity=0) with one previous-token head and four induction heads."""

import argparse

import torch

from l3d_lens.zoo import induction

SPARSITY = {"default": 0.1, "redundant": 0.0}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--variant", choices=sorted(SPARSITY), default="default")
args = parser.parse_args()
torch.set_num_threads(1)
model = induction.train(kind="hooked", head_sparsity=SPARSITY[args.variant])
path = induction.save(model, variant=args.variant)
print("saved to", path, "loss first half / repeated half:", induction.induction_loss(model))
truth, table = induction.identify_circuit(model)
print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), "\ncircuit:", sorted(truth))
