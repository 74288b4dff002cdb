"""The paper's toy models: train one, decompose it with L3D and check what L3D recovers against
the known answer.

    python demos/toy_models.py                        # TMS, seed 0 (about a minute, one thread)
    python demos/toy_models.py --toy all --restarts 3 # all four, best of 3 L3D seeds (about 15 min)
    python demos/toy_models.py --toy tmcs --epochs 30 --train-epochs 20   # a quick look (seconds)

Each toy is trained from ``--seed`` (``make_toy``), decomposed with ``recommended_config`` (300
L3D epochs, the paper's learning-rate schedule scaled to them) from ``--restarts`` L3D seeds,
keeping the lowest final training loss (``sweep.best_of``), and scored on held-out data
(``evaluate``, ``scorecard``). "reference" is what the model itself gives on the same number
(its own gradient directions; for TMCS's r², its own matrix f(e_i) - f(0)): a target the
reference misses is one the trained model stands in the way of.
BENCHMARKS.md has these over 3 and 10 seeds.
"""

from __future__ import annotations

import argparse
import time

import torch

from l3d_lens.toy import TOY_NAMES, evaluate, make_toy, recommended_config, scorecard
from l3d_lens.toy.reproduce import Scorecard, scaled_lr_step
from l3d_lens.toy.sweep import best_of


def run(name: str, seed: int = 0, restarts: int = 1, epochs: int = 300, train_epochs=None) -> Scorecard:
    """Train, decompose and score toy ``name``; prints the scorecard and returns it."""
    t0 = time.perf_counter()
    # a shortened training (--train-epochs) keeps its best start even if it never learned a
    # feature of x² (make_toy would refuse it): the help promises a less trained model
    toy = make_toy(name, seed, epochs=train_epochs, check_learned=train_epochs is None)
    t1 = time.perf_counter()
    cfg = recommended_config(name, seed=seed, epochs=epochs, lr_step=scaled_lr_step(epochs))
    dec = best_of(toy.model, toy.l3d_data, cfg, seeds=[seed + 10 * r for r in range(restarts)])
    rows = scorecard(name, evaluate(toy, dec, seed=seed))
    print(f"{name} (seed {seed}): trained in {t1 - t0:.0f} s to MSE {toy.final_loss:.3g}; L3D "
          f"{cfg.n_subnetworks} x rank {cfg.rank}, best of {restarts}, {time.perf_counter() - t1:.0f} s")
    print(rows)
    return rows


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", choices=TOY_NAMES + ("all",), default="tms")
    ap.add_argument("--seed", type=_at_least(0), default=0)
    ap.add_argument("--restarts", type=_at_least(1), default=1, help="L3D seeds; the lowest final loss is kept")
    ap.add_argument("--epochs", type=_at_least(1), default=300, help="L3D epochs (paper: 1000)")
    ap.add_argument("--train-epochs", type=_at_least(1), default=None,
                    help="toy-model training epochs (default: make_toy's, 100; fewer gives a less trained "
                         "model, kept even where x² has not learned every feature)")
    ap.add_argument("--threads", type=_at_least(1), default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in TOY_NAMES if args.toy == "all" else (args.toy,):
        run(name, args.seed, args.restarts, args.epochs, args.train_epochs)


if __name__ == "__main__":
    main()
