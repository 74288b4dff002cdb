"""What the dead-subnetwork remedy (the AuxK auxiliary loss, ``L3DConfig.aux_coef`` /
``dead_steps``) does on the paper's toy models: plain L3D (aux_coef = 0, the paper) against
L3D + AuxK on the same toy model, data, init and seed, scored with the toy metrics.

    python benchmarks/dead_remedy.py --toys tms higher_rank --epochs 200 --seeds 0 1 2 --aux-coef 1.0

Prints one JSON line per run. Shorter L3D runs (lr step scaled to epochs/10) are where plain
L3D leaves subnetworks dead most often, so they show the remedy best; on the higher-rank
model extra subnetworks *should* die (10 subnetworks, 5 groups), so reviving them is a cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l3d_lens import decompose  # noqa: E402
from l3d_lens.toy import TOY_NAMES, make_toy  # noqa: E402
from l3d_lens.toy.reproduce import evaluate, paper_config, scaled_lr_step  # noqa: E402

KEYS = ("error", "dead_fraction", "min_cos", "mmcs", "r2", "r2_decoder", "live_per_group", "one_per_group", "n_live",
        "one_per_feature", "selectivity_min")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toys", nargs="+", default=["tms", "higher_rank"], choices=TOY_NAMES)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--aux-coef", type=float, default=1.0)
    ap.add_argument("--dead-steps", type=int, default=20)
    ap.add_argument("--runs", nargs="+", default=["plain", "aux"], choices=["plain", "aux"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.toys:
        for seed in args.seeds:
            toy = make_toy(name, seed)
            cfg = paper_config(name, epochs=args.epochs, lr_step=scaled_lr_step(args.epochs), seed=seed)
            runs = {"plain": cfg, "aux": cfg.replace(aux_coef=args.aux_coef, dead_steps=args.dead_steps)}
            for label in args.runs:
                run_cfg = runs[label]
                start = time.perf_counter()
                dec = decompose(toy.model, toy.l3d_data, run_cfg, progress=False)
                r = evaluate(toy, dec, seed=seed)
                print(json.dumps(dict(toy=name, seed=seed, run=label, epochs=args.epochs, aux_coef=run_cfg.aux_coef,
                                      seconds=round(time.perf_counter() - start, 1),
                                      **{k: r[k] for k in KEYS if k in r})), flush=True)


if __name__ == "__main__":
    main()
