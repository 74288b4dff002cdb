"""Does the x² model's training recipe decide how selective its circuits can be? Trains the x²
toy model from each seed with our recipe (``make_toy`` defaults: 100 epochs, AdamW lr 1e-2) and
with the paper's (1,000 epochs, lr 1e-3), and scores what each trained model allows with no
decomposition at all (``l3d_lens.toy.reproduce.square_reference``); writes the
"## Toy models: x² training recipe" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_square_recipe.py           # seeds 0-9, 2 jobs x 1 thread (about 28 min)

Both recipes use ``make_toy`` (PyTorch's init, the best of 3 starts by a 20-epoch probe, and a
fresh block of starts if a feature was never learned, ``LEARNED_R2``), so they differ in epochs
and learning rate only. The selectivity reference is the issue's x² number (relevant output over
the other outputs, at the delta where it has changed by half, smallest over the (feature, sign)
circuits) for the principal direction of each circuit's own gradients: what a subnetwork that
reconstructs them exactly would score. The training time of each model is also its time on this
machine (one thread per job, two jobs on two cores).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Measured, jobs_section, pool_map, seeds_jobs_main  # noqa: E402
from l3d_lens.toy import make_toy, metrics  # noqa: E402
from l3d_lens.toy.reproduce import square_reference  # noqa: E402

SECTION = "## Toy models: x² training recipe"
#: recipe name -> make_toy overrides
RECIPES = {"ours": {}, "paper": {"epochs": 1000, "lr": 1e-3}}
TARGET = 10.0


def run_one(recipe: str, seed: int, threads: int) -> dict[str, Any]:
    """Train the x² model from ``seed`` with ``recipe`` and score it on its held-out data."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        toy = make_toy("square", seed, **RECIPES[recipe])
    except RuntimeError as exc:  # no block of starts learned every feature
        return {"recipe": recipe, "seed": seed, "failed": str(exc), "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    x = toy.eval_data
    ref = square_reference(toy.model, x)
    row = {"recipe": recipe, "seed": seed, "seconds": seconds, "blocks": toy.blocks,
           "epochs_trained": len(toy.train_losses),
           "train_loss": toy.final_loss, "r2_per_feature": metrics.feature_r2(toy.model, x, x ** 2),
           "sign_alignment": ref["sign_alignment"],
           "reference_circuit_min": ref["reference_circuit_selectivity_by_output_min"],
           "reference_circuit": ref["reference_circuit_selectivity_by_output"],
           "reference_feature_min": ref["reference_selectivity_by_output_min"]}
    print(json.dumps({k: row[k] for k in ("recipe", "seed", "seconds", "blocks", "train_loss",
                                          "reference_circuit_min")}),
          flush=True)
    return row


def run(seeds, jobs: int, threads: int) -> list[dict[str, Any]]:
    # the long paper runs first, so the short ones fill in at the end
    tasks = [(recipe, seed) for recipe in ("paper", "ours") for seed in seeds]
    return pool_map(run_one, [(recipe, seed, threads) for recipe, seed in tasks], jobs)


def _mark(value: float) -> str:
    return f"**{value:.3g}**" if value >= TARGET else f"{value:.3g}"


def _cell(row: dict[str, Any]) -> str:
    if "failed" in row:
        return "no model learned every feature | – | – | –"
    return (f"{_mark(row['reference_circuit_min'])} | {row['reference_feature_min']:.3g} "
            f"| {min(row['r2_per_feature']):.3g} | {row['train_loss']:.3g} ({_time(row)})")


def _time(row: dict[str, Any]) -> str:
    """Training time, and the blocks of starts when more than one (``Toy.blocks``)."""
    return f"{row['seconds']:.0f} s" + (f", {row['blocks']} blocks" if row["blocks"] > 1 else "")


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["recipe"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    head = ("| seed | ours: reference selectivity, circuits | features | min r² of x_i² | training loss (time) "
            "| paper's: reference selectivity, circuits | features | min r² of x_i² | training loss (time) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        lines.append(f"| {s} | {_cell(by[('ours', s)])} | {_cell(by[('paper', s)])} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    for recipe in RECIPES:
        ok = [r for r in rows if r["recipe"] == recipe and "failed" not in r]
        n = len([r for r in rows if r["recipe"] == recipe])
        if not ok:
            out.append(f"- {recipe}: no model learned every feature in {n} seeds.")
            continue
        refs = [r["reference_circuit_min"] for r in ok]
        secs = [r["seconds"] for r in ok]
        out.append(
            f"- {recipe}: reference selectivity >= {TARGET:g} in {sum(v >= TARGET for v in refs)}/{n} seeds "
            f"(median {statistics.median(refs):.3g}, range {min(refs):.3g}-{max(refs):.3g}); training loss median "
            f"{statistics.median(r['train_loss'] for r in ok):.3g}; training time {min(secs):.0f}-{max(secs):.0f} s "
            f"(median {statistics.median(secs):.0f} s)" + (f"; {n - len(ok)} seeds without a model" if n > len(ok) else "")
            + ".")
    both = [(by_o, by_p) for by_o in rows if by_o["recipe"] == "ours" and "failed" not in by_o
            for by_p in rows if by_p["recipe"] == "paper" and by_p["seed"] == by_o["seed"] and "failed" not in by_p]
    if both:
        higher = sum(p["reference_circuit_min"] > o["reference_circuit_min"] for o, p in both)
        out.append(f"- The paper's recipe gives the higher reference in {higher}/{len(both)} seeds and the lower "
                   f"training loss in {sum(p['train_loss'] < o['train_loss'] for o, p in both)}/{len(both)}.")
    slow = [r for r in rows if r["recipe"] == "ours" and "failed" not in r and r["seconds"] > 60]
    if slow:
        out.append("- Our recipe over a minute: " + ", ".join(f"seed {r['seed']} ({_time(r)})" for r in slow) + ".")
    for recipe in RECIPES:
        ok = [r for r in rows if r["recipe"] == recipe and "failed" not in r]
        more = [r for r in ok if r["blocks"] > 1]
        if more:
            out.append(f"- {recipe}: more than one block of starts (the first block's kept model never learned a "
                       f"feature) in {len(more)}/{len(ok)} seeds with a model: "
                       + ", ".join(f"seed {r['seed']} ({r['blocks']} blocks)" for r in more) + ".")
    return "\n".join(out)


def section(rows, args, measured: Measured) -> str:
    return jobs_section(
        SECTION, "toy_square_recipe.py", args, measured,
        "The x² toy model trained by `make_toy(\"square\", seed)` with our recipe (100 epochs, AdamW lr 1e-2) and "
        "with the paper's (`epochs=1000, lr=1e-3`); everything else the same (PyTorch's init, best of 3 starts "
        "by a 20-epoch probe, a fresh block of starts if a feature was never learned, which about doubles the "
        "training time). No L3D here: "
        "\"reference selectivity\" is the issue's x² selectivity (relevant output over the other outputs at "
        "the delta where it has changed by half; smallest over the 10 (feature, sign) circuits, or over the 5 "
        "features) of the principal direction of each circuit's (feature's) own gradients, the direction a "
        "subnetwork reconstructing them exactly would take (`reproduce.square_reference`); bold: >= 10. "
        "\"min r² of x_i²\": how well the model squares its worst feature (`metrics.feature_r2`). All on the "
        "toy's 2,000 held-out samples; the \"ours\" column is the model of \"Toy models: more seeds\".",
        table(rows), summary(rows))


def main(argv=None) -> None:
    seeds_jobs_main(__doc__, SECTION, section, lambda args: run(args.seeds, args.jobs, args.threads), argv)


if __name__ == "__main__":
    main()
