"""GPU check of the toy models: train each toy on the CPU, then decompose and ``evaluate`` it
on the CPU and, after ``Toy.to(device)``, on the device, and print the main metrics side by
side. The two runs are not expected to agree to the bit (different kernels), only to run and
land close; the check fails (status 1) if the device run raises or gives a non-finite error,
and exits with a message (status 2) when the device is absent.

    python benchmarks/gpu_toy.py [--device cuda] [--epochs 30] [--train-epochs 20]

``--device cpu`` runs the same code path on the CPU (both columns then agree exactly).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch

import l3d_lens
from l3d_lens.toy import TOY_NAMES, evaluate, make_toy, recommended_config

#: per toy, the ``evaluate`` keys printed side by side
SHOWN = {"tms": ("error", "min_cos_encoder", "dead_fraction"),
         "tmcs": ("error", "pearson_r", "r2_decoder", "dead_fraction"),
         "higher_rank": ("error", "live_per_group", "n_live_impure"),
         "square": ("error", "one_per_feature_none_shared", "circuit_selectivity_by_output_min")}


def run(name: str, device: str, epochs: int, train_epochs: int) -> tuple[dict, dict, float]:
    """(CPU result, device result, device seconds) for toy ``name`` with seed 0."""
    toy = make_toy(name, 0, epochs=train_epochs, n_train=4000, n_l3d=500, n_eval=1000, check_learned=False)
    cfg = recommended_config(name, epochs=epochs)
    on_cpu = evaluate(toy, l3d_lens.decompose(toy.model, toy.l3d_data, cfg, progress=False))
    moved = copy.deepcopy(toy).to(device)
    start = time.perf_counter()
    on_device = evaluate(moved, l3d_lens.decompose(moved.model, moved.l3d_data, cfg, progress=False))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return on_cpu, on_device, time.perf_counter() - start


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--epochs", type=int, default=30, help="L3D epochs")
    ap.add_argument("--train-epochs", type=int, default=20, help="toy training epochs")
    ap.add_argument("--toys", nargs="+", default=list(TOY_NAMES), choices=TOY_NAMES)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    print(f"toy models, CPU vs {args.device} ({where}); torch {torch.__version__}, 1 CPU thread; "
          f"{args.train_epochs} training epochs, {args.epochs} L3D epochs, seed 0")
    failed = []
    for name in args.toys:
        try:
            on_cpu, on_device, seconds = run(name, args.device, args.epochs, args.train_epochs)
        except Exception as e:  # the check reports every toy, then fails
            failed.append(name)
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
            continue
        if on_cpu.keys() != on_device.keys() or not math.isfinite(on_device["error"]):
            failed.append(name)
        for key in SHOWN[name]:
            print(f"{name:12s} {key:36s} cpu {_shown(on_cpu[key]):>18s}  {args.device} {_shown(on_device[key]):>18s}")
        print(f"{name:12s} {'decompose + evaluate seconds':36s} {args.device} {seconds:.1f}")
    print("FAILED: " + ", ".join(failed) if failed else "all toys ran on the device")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
