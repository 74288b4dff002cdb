"""The two toy-model targets our settings do not meet in every seed (TMCS "r²" >= 0.92, which
the paper computes as a Pearson r; x² selectivity >= 10), measured on more seeds; writes the "## Toy models: more seeds" section of
BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_heldout.py                 # seeds 0-9, 300 L3D epochs, 2 jobs x 1 thread

Seeds 0-2 are the ones ``recommended_config`` was developed on (BENCHMARKS.md "Toy models");
seeds 3-9 were first run by an earlier version of this script (x² decomposed once), so they say
how often the targets hold for a model we did not tune on. Taking the best of 3 L3D runs for x²
as well was decided after that run, on seeing x² seeds 3, 7 and 8 share a subnetwork between two
features: for that column those seeds are no longer held out.

Per seed and toy: trained, then decomposed from 3 L3D seeds (seed, seed + 10, seed + 20); the
first alone is "one run", the lowest final training loss of the three is "best of 3" (the rule of
``l3d_lens.toy.sweep.best_of``; "run k" is L3D seed seed + 10 k). TMCS is scored with the paper's
statistic (``circuit_recovery``'s ``pearson_r``) next to the same statistic for the principal
direction of each feature's own gradients and for the matrix the trained model itself computes; x²
by the smallest per-(feature, sign) selectivity by output next to the same number for the model's
own circuit gradient directions (``l3d_lens.toy.reproduce.evaluate``). Those gradient references
are what a subnetwork reconstructing a feature's gradients exactly would score, not bounds: L3D's
subnetworks can score above them.
"""

from __future__ import annotations

import json
import math
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
from l3d_lens.toy.reproduce import evaluate, nanmin, recommended_config, scaled_lr_step  # noqa: E402
from l3d_lens.toy.sweep import kept_run  # noqa: E402

SECTION = "## Toy models: more seeds"
TUNED_SEEDS = (0, 1, 2)
RESTARTS = 3


def run_one(name: str, seed: int, epochs: int, threads: int) -> dict[str, Any]:
    """Train toy ``name`` from ``seed``, decompose it with ``recommended_config`` from
    ``RESTARTS`` L3D seeds and return the metrics of the first run and of the kept one."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    toy = make_toy(name, seed)
    cfg = recommended_config(name, seed=seed, epochs=epochs, lr_step=scaled_lr_step(epochs))
    decs = [decompose(toy.model, toy.l3d_data, cfg.replace(seed=seed + 10 * r)) for r in range(RESTARTS)]
    losses = [dec.history[-1]["loss"] for dec in decs]
    best = kept_run(losses)
    one = evaluate(toy, decs[0], seed=seed)
    row = {"toy": name, "seed": seed, "train_loss_model": toy.final_loss, "l3d_losses": losses, "best": best,
           "one": one, "best_of": one if best == 0 else evaluate(toy, decs[best], seed=seed),
           "seconds": time.perf_counter() - t0}
    print(json.dumps({k: v for k, v in row.items() if k not in ("one", "best_of")}), flush=True)
    return row


def run(seeds, epochs: int, jobs: int, threads: int) -> list[dict[str, Any]]:
    tasks = [(name, seed) for seed in seeds for name in ("tmcs", "square")]
    return pool_map(run_one, [(name, seed, epochs, threads) for name, seed in tasks], jobs)


def _mark(value: float, target: float) -> str:
    return f"**{value:.3g}**" if value >= target else f"{value:.3g}"


def none_shared(ev: dict[str, Any]) -> bool:
    """x²: one subnetwork per feature, none shared (``evaluate``'s ``one_per_feature_none_shared``,
    combined here because this benchmark's saved run predates that key; toy_loss_switch reads it)."""
    return bool(ev["one_per_feature"] and ev["feature_pure"])


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["toy"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| seed | TMCS statistic, one run | best of 3 (kept run) | reference (features' own gradient directions) "
             "| the trained model's own | TMCS error, best of 3 | x²: min selectivity by output, one run "
             "| best of 3 (kept run) | reference (model's own gradient directions) "
             "| x²: one per feature, none shared (one run / best of 3) | x² error, best of 3 "
             "| x² model: min over features of r² of x_i² |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        t, q = by[("tmcs", s)], by[("square", s)]
        one, kept, sq, sq_kept = t["one"], t["best_of"], q["one"], q["best_of"]
        lines.append(
            f"| {s}{' (tuned on)' if s in TUNED_SEEDS else ''} | {_mark(one['pearson_r'], 0.92)} "
            f"| {_mark(kept['pearson_r'], 0.92)} (run {t['best']}) | {kept['pearson_r_reference']:.3g} | {kept['pearson_r_model']:.3g} "
            f"| {100 * kept['error']:.1f}% | {_mark(sq['circuit_selectivity_by_output_min'], 10)} "
            f"| {_mark(sq_kept['circuit_selectivity_by_output_min'], 10)} (run {q['best']}) "
            f"| {sq['reference_circuit_selectivity_by_output_min']:.3g} "
            f"| {'yes' if none_shared(sq) else 'no'} / {'yes' if none_shared(sq_kept) else 'no'} "
            f"| {100 * sq_kept['error']:.1f}% "
            f"| {min(sq['model_r2_per_feature']):.3g} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    for label, group in (("seeds 0-2 (tuned on)", TUNED_SEEDS), ("held-out seeds (x² best of 3: seeds 3, 7, 8 seen first)", None)):
        pick = [r for r in rows if (r["seed"] in TUNED_SEEDS) == (group is not None)]
        t = [r for r in pick if r["toy"] == "tmcs"]
        q = [r for r in pick if r["toy"] == "square"]
        if not t:
            continue
        n = len(t)
        out.append(
            f"- {label} ({n}): TMCS statistic >= 0.92 in {sum(r['one']['pearson_r'] >= 0.92 for r in t)}/{n} single runs, "
            f"{sum(r['best_of']['pearson_r'] >= 0.92 for r in t)}/{n} best of 3, the reference in "
            f"{sum(r['best_of']['pearson_r_reference'] >= 0.92 for r in t)}/{n}; the trained model's own matrix "
            f"reaches it in {sum(r['best_of']['pearson_r_model'] >= 0.92 for r in t)}/{n}. "
            f"x² selectivity >= 10 in {sum(r['one']['circuit_selectivity_by_output_min'] >= 10 for r in q)}/{len(q)} "
            f"single runs, {sum(r['best_of']['circuit_selectivity_by_output_min'] >= 10 for r in q)}/{len(q)} best of 3, "
            f"the reference in {sum(r['one']['reference_circuit_selectivity_by_output_min'] >= 10 for r in q)}/{len(q)}; "
            f"one subnetwork per feature, none shared, in {sum(none_shared(r['one']) for r in q)}/{len(q)} single runs, "
            f"{sum(none_shared(r['best_of']) for r in q)}/{len(q)} best of 3.")
    q = [r for r in rows if r["toy"] == "square"]
    if q:
        out.append(_per_circuit(q))
    return "\n".join(out)


def _per_circuit(q: list[dict[str, Any]]) -> str:
    """The x² target per (feature, sign) circuit rather than at the worst circuit of a seed:
    how many circuits reach 10, how many of those below 10 have a reference below 10 too, how
    many seeds' median circuit reaches 10, and how far each kept subnetwork is from its
    circuit's reference. A circuit without an owner (NaN) counts as not reaching 10 and is left
    out of medians and ratios."""
    sel = [r["best_of"]["circuit_selectivity_by_output"] for r in q]
    ref = [r["best_of"]["reference_circuit_selectivity_by_output"] for r in q]
    pairs = [(a, b) for s, t in zip(sel, ref) for a, b in zip(s, t)]
    below = [(a, b) for a, b in pairs if not a >= 10]
    ratio = [a / b for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    medians = [statistics.median(v) for v in ([a for a in s if not math.isnan(a)] for s in sel) if v]
    worst = [min((a / b for a, b in zip(s, t) if not (math.isnan(a) or math.isnan(b))), default=float("nan"))
             for s, t in zip(sel, ref)]
    out = (f"- x² per circuit, best of 3, all {len(q)} seeds: {len(pairs) - len(below)}/{len(pairs)} (feature, sign) "
           f"circuits reach selectivity 10 (the reference: {sum(b >= 10 for _, b in pairs)}/{len(pairs)}); of the "
           f"{len(below)} below 10, {sum(not b >= 10 for _, b in below)} have a reference below 10 too; a seed's "
           f"median circuit reaches 10 in {sum(m >= 10 for m in medians)}/{len(q)} seeds")
    if medians:
        out += f" (median over circuits {min(medians):.3g}-{max(medians):.3g})"
    if ratio:
        out += (f"; a circuit's selectivity over its reference: median {statistics.median(ratio):.2f}, 10-90% "
                f"{_quantile(ratio, 0.1):.2f}-{_quantile(ratio, 0.9):.2f}, lowest per seed {nanmin(worst):.2f}-"
                f"{max(w for w in worst if not math.isnan(w)):.2f}")
    return out + ". The issue's target takes the worst circuit of a seed."


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def section(rows, args, measured: Measured) -> str:
    return jobs_section(
        SECTION, "toy_heldout.py", args, measured,
        f"Toy models and L3D as in \"Toy models\" (`recommended_config`, "
        f"{args.epochs} L3D epochs), metrics on 2,000 held-out samples. Seeds 0-2 are the ones the settings were "
        f"developed on. Seeds 3-9 were first run by an earlier version of this script, which decomposed x² once; "
        f"keeping the best of 3 x² runs as well was decided after seeing x² seeds 3, 7 and 8 share a subnetwork "
        f"between two features there, so for the x² best-of-3 columns those three are not held out. \"Run k\": L3D "
        f"seed = seed + 10 k; the kept run has the lowest final training loss (`toy.sweep.best_of`). Bold: at or "
        f"above the issue's target (0.92 for TMCS, 10 for x²). \"The trained model's own\": the paper's statistic "
        f"for f(e_i) - f(0) instead of a subnetwork's V[W_out] V[W_in] (`metrics.pearson_r`); \"reference\": the "
        f"statistic for the principal direction of each feature's own gradients (against zero, the decomposition's "
        f"reference), which a subnetwork reconstructing them exactly would take; the x² reference likewise per "
        f"(feature, sign) circuit. A reference is not a bound: L3D's subnetworks can score above it. \"x² model\": "
        f"how well the trained model squares each feature on the held-out rows where it is active "
        f"(`metrics.feature_r2`); `make_toy` replaces an x² model that never learned a feature (`LEARNED_R2`). "
        f"The earlier run of this section predates that check: its x² seed-3 model never squared feature 4 "
        f"(r² -0.45), so that row scored L3D on a model computing 4 of its 5 features.",
        table(rows), summary(rows))


def main(argv=None) -> None:
    seeds_jobs_main(__doc__, SECTION, section, lambda args: run(args.seeds, args.epochs, args.jobs, args.threads),
                    argv, lambda ap: ap.add_argument("--epochs", type=int, default=300,
                                                     help="L3D epochs (paper: 1000)"))


if __name__ == "__main__":
    main()
