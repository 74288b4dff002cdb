"""Retrain the embedded induction models from scratch.

    python scripts/train_default_model.py                      # the default model
    python scripts/train_default_model.py --variant redundant  # without the head penalty

One CPU thread, about 4 minutes each; prints the induction losses it reaches and the circuit
(attention patterns and mean-ablation, l3d_lens.zoo.induction.identify_circuit). The default
model (head_sparsity=0.1) computes the repeat with one previous-token head and one induction
head; the redundant one (head_sparsity=0) with one previous-token head and four induction heads.

The model goes to --out (default ./induction_<variant>; load it with
``induction.load(path=...)``): the shipped weights in l3d_lens/assets stay as they are, since
the README's and BENCHMARKS.md's numbers come from them and a retrain on another CPU or torch
build may differ in the last bits. --replace-shipped writes over them instead. The head penalty
of the default variant reads each head's output through HookedTransformer hooks, so it needs
TransformerLens 2 or 3; the redundant variant trains a TransformerBridge on TransformerLens 4."""

import argparse
from pathlib import Path

import torch

from l3d_lens.zoo import induction

SPARSITY = {"default": 0.1, "redundant": 0.0}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--variant", choices=sorted(SPARSITY), default="default")
where = parser.add_mutually_exclusive_group()
where.add_argument("--out", type=Path, default=None, help="folder to write (default: ./induction_<variant>)")
where.add_argument("--replace-shipped", action="store_true",
                   help="write over the shipped weights in l3d_lens/assets")
args = parser.parse_args()
try:
    from transformer_lens import HookedTransformer  # noqa: F401

    kind = "hooked"
except ImportError:
    kind = "bridge"
if SPARSITY[args.variant] and kind != "hooked":
    parser.error(f"--variant {args.variant} trains with a head penalty that needs HookedTransformer "
                 f"(TransformerLens 2 or 3), which this TransformerLens no longer has; use --variant redundant, "
                 f"or install transformer-lens<4")
out = induction.asset_dir(args.variant) if args.replace_shipped else (args.out or Path(f"induction_{args.variant}"))
if out.exists() and not out.is_dir():
    parser.error(f"--out {out} is a file")
torch.set_num_threads(1)
model = induction.train(kind=kind, head_sparsity=SPARSITY[args.variant])
path = induction.save(model, out)
print("saved to", path, "loss first half / repeated half:", induction.induction_loss(model))
truth, table = induction.identify_circuit(model)
print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), "\ncircuit:", sorted(truth))
