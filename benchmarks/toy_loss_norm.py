"""The per-sample loss (``L3DConfig.loss_norm="sample"``: every sample's gradient weighs the
same) against the paper's batch-normalised loss on TMCS and x²: one L3D run per toy, seed and
loss from L3D seed = model seed (``recommended_config``, 300 epochs, as the "one run" of "Toy
models: more seeds"); writes the "## Toy models: per-sample loss" section of BENCHMARKS.md
(other sections are kept).

    python benchmarks/toy_loss_norm.py              # seeds 0-9, 2 jobs x 1 thread (about 35 min)

Why: with the batch form sum_i ||g_i - g_hat_i||^2 / sum_i ||g_i||^2, a TMCS row with several
active features has a larger gradient, and its cross terms (feature c's weights along feature
d's outputs, which no one-feature subnetwork holds) weigh more; decomposing single-feature rows
alone closes the gap to the gradient reference ("Toy models: TMCS and multi-feature rows"), but
real data has no feature labels. Weighing every sample the same needs none. The held-out
reconstruction error is the batch form for both losses.
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

from l3d_lens import decompose  # noqa: E402
from benchmarks.common import Measured, jobs_section, pool_map, seeds_jobs_main  # noqa: E402
from l3d_lens.toy import make_toy  # noqa: E402
from l3d_lens.toy.reproduce import evaluate, recommended_config, scaled_lr_step  # noqa: E402

SECTION = "## Toy models: per-sample loss"
EPOCHS = 300
NORMS = ("batch", "sample")
#: toy -> (key of evaluate's result, its reference key, target)
TARGETS = {"tmcs": ("pearson_r", "pearson_r_reference", 0.92),
           "square": ("circuit_selectivity_by_output_min", "reference_circuit_selectivity_by_output_min", 10.0)}


def run_one(name: str, seed: int, threads: int) -> list[dict[str, Any]]:
    """Train toy ``name`` from ``seed`` once and decompose it with each loss; score on held-out data."""
    torch.set_num_threads(threads)
    toy = make_toy(name, seed)
    key, ref_key, _ = TARGETS[name]
    out = []
    for norm in NORMS:
        t0 = time.perf_counter()
        cfg = recommended_config(name, seed=seed, epochs=EPOCHS, lr_step=scaled_lr_step(EPOCHS), loss_norm=norm)
        dec = decompose(toy.model, toy.l3d_data, cfg, progress=False)
        ev = evaluate(toy, dec, seed=seed)
        row = {"toy": name, "seed": seed, "loss_norm": norm, "value": ev[key], "reference": ev[ref_key],
               "error": ev["error"], "dead_fraction": ev["dead_fraction"], "seconds": time.perf_counter() - t0}
        if name == "square":
            row.update(one_per_feature_none_shared=ev["one_per_feature_none_shared"],
                       per_circuit=ev["circuit_selectivity_by_output"],
                       per_circuit_reference=ev["reference_circuit_selectivity_by_output"])
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
        out.append(row)
    return out


def run(seeds, jobs: int, threads: int) -> list[dict[str, Any]]:
    tasks = [(name, seed) for name in ("square", "tmcs") for seed in seeds]  # the long x² jobs first
    return [row for rows in pool_map(run_one, [(name, seed, threads) for name, seed in tasks], jobs) for row in rows]


def fmt(name: str, value: float) -> str:
    """``value`` of toy ``name``'s statistic, bold at or above its target."""
    text = f"{value:.4f}" if name == "tmcs" else f"{value:.3g}"
    return f"**{text}**" if value >= TARGETS[name][2] else text


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["toy"], r["seed"], r["loss_norm"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| seed | TMCS reference | TMCS statistic: batch (error) | per-sample (error) | x² reference "
             "| x² min selectivity by output: batch (error) | per-sample (error) | x² one per feature, none shared: "
             "batch / per-sample |", "|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        t = [by[("tmcs", s, n)] for n in NORMS]
        q = [by[("square", s, n)] for n in NORMS]
        lines.append(f"| {s} | {fmt('tmcs', t[0]['reference'])} | "
                     + " | ".join(f"{fmt('tmcs', r['value'])} ({100 * r['error']:.1f}%)" for r in t)
                     + f" | {fmt('square', q[0]['reference'])} | "
                     + " | ".join(f"{fmt('square', r['value'])} ({100 * r['error']:.1f}%)" for r in q)
                     + " | " + " / ".join("yes" if r["one_per_feature_none_shared"] else "no" for r in q) + " |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    seeds = sorted({r["seed"] for r in rows})
    for name, label in (("tmcs", "TMCS statistic"), ("square", "x² min selectivity by output")):
        target = TARGETS[name][2]
        ref = [r["reference"] for r in rows if r["toy"] == name and r["loss_norm"] == "batch"]
        out.append(f"- {label}: the reference reaches {target:g} in {sum(v >= target for v in ref)}/{len(seeds)} seeds.")
        for norm in NORMS:
            sel = [r for r in rows if r["toy"] == name and r["loss_norm"] == norm]
            err = [r["error"] for r in sel]
            error = (f"held-out error {100 * min(err):.1f}-{100 * max(err):.1f}% "
                     f"(median {100 * statistics.median(err):.1f}%)")
            line = f"  - {norm}: >= {target:g} in {sum(r['value'] >= target for r in sel)}/{len(sel)}; "
            if name == "tmcs":
                gap = [r["value"] - r["reference"] for r in sel]
                line += (f"statistic - reference median {statistics.median(gap):+.4f} (range {min(gap):+.4f} to "
                         f"{max(gap):+.4f}); {error}; dead subnetworks in "
                         f"{sum(r['dead_fraction'] > 0 for r in sel)} seeds.")
            else:
                ratio = [r["value"] / r["reference"] for r in sel]
                line += (f"selectivity / reference median {statistics.median(ratio):.3f} (range {min(ratio):.3f}-"
                         f"{max(ratio):.3f}); circuits >= 10: {sum(v >= 10 for r in sel for v in r['per_circuit'])}/"
                         f"{sum(len(r['per_circuit']) for r in sel)}; one per feature, none shared in "
                         f"{sum(r['one_per_feature_none_shared'] for r in sel)}/{len(sel)}; {error}.")
            out.append(line)
    return "\n".join(out)


def section(rows, args, measured: Measured) -> str:
    return jobs_section(
        SECTION, "toy_loss_norm.py", args, measured,
        "TMCS and x² as in \"Toy models: more seeds\", one L3D run per toy, seed and loss from L3D seed = model seed "
        f"(`recommended_config`, {EPOCHS} epochs); \"batch\": the paper's loss sum_i ||g_i - g_hat_i||² / "
        "sum_i ||g_i||² (the \"one run\" column there); \"per-sample\": `loss_norm=\"sample\"`, mean_i "
        "||g_i - g_hat_i||² / ||g_i||², every sample weighing the same. \"Reference\": the same statistic for the "
        "principal direction of each feature's (x²: each (feature, sign) circuit's) own gradients; the error is the "
        "batch form on the 2,000 held-out samples for both losses; bold: at or above the issue's target.",
        table(rows), summary(rows))


def main(argv=None) -> None:
    seeds_jobs_main(__doc__, SECTION, section, lambda args: run(args.seeds, args.jobs, args.threads), argv)


if __name__ == "__main__":
    main()
