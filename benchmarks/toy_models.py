"""Reproduce the paper's four toy models (TMS, TMCS, higher-rank circuits, x -> x^2) with
several seeds and write the "## Toy models" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_models.py                     # seeds 0 1 2, 300 L3D epochs, 2 jobs
    python benchmarks/toy_models.py --epochs 1000       # the paper's length (lr step scaled)

Every seed re-trains the toy model (l3d_lens.toy.make_toy) and decomposes it twice: with the
paper's stated settings (l3d_lens.toy.reproduce.paper_config) and with ours
(l3d_lens.toy.reproduce.recommended_config: zero reference, AuxK or, higher-rank, resampling); the
metrics are those of l3d_lens.toy.reproduce.evaluate on 2,000 held-out samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Measured, add_output_arguments, section_main  # noqa: E402
from l3d_lens.toy import DEFAULT_EPOCHS, TOY_NAMES, make_toy, metrics  # noqa: E402
from l3d_lens.toy.data import circuit_matrix  # noqa: E402
from l3d_lens.toy.metrics import PURE_GROUP  # noqa: E402
from l3d_lens.toy.reproduce import (PAPER_SHAPES, evaluate, nanmin, paper_config, recommended_config,  # noqa: E402
                                     scaled_lr_step)
from l3d_lens.toy.sweep import best_of  # noqa: E402
from l3d_lens.toy.train import LR  # noqa: E402

SECTION = "## Toy models"

#: findings written into the section under the table (they describe the run of record)
NOTES = """
Findings (run of record above). "The paper's code" is the authors' public repository
(github.com/briannachrisman/eigenestimation): `scripts/*/train_*_eigenmodel.py` for the
references, `notebooks/tm2_circuit_superposition.ipynb` for the TMCS statistic.

- **Reference.** With the paper's stated reference, a random other sample, each gradient is
  g_i = J_i^T (f(x_i) - f(x_j)): it also carries the partner's features (for TMCS terms like
  x_c x_d W_out^T a_d e_c^T, on feature c's weights but along feature d's output), which no
  one-feature rank-1 subnetwork reconstructs. TMS and TMCS errors stay at 23-37% and subnetworks
  die. The
  paper's code uses other references: zero (`ZeroOutput`) for TMCS and the higher-rank model,
  the batch mean (`MeanOutput`) for TMS and x². Our settings take zero for TMCS, higher-rank and
  x² (on x² the mean gave 40% error against zero's 27% in an ad hoc run on seed 1, 29% against
  29% on seed 0) and the mean for TMS.
- **TMS |cos|.** With the batch mean as reference every feature has a subnetwork within 0.99
  of its W_in column *and* W_out row together in 3 of 3 seeds, at the same error as with zero
  (10-11%). With zero (the previous run of record) that stricter score stayed at 0.986-0.989:
  a feature's interference switches on other outputs a little, g = J^T f(x) then puts
  gradient on their W_out rows, and the zero-reference gradients' own principal direction was
  only 0.993-0.994 from the idealised one (the paper's-settings column of the "reference" row).
  Subtracting the batch mean, which those small outputs are close to, removes most of that:
  against the mean the features' own gradients point 0.9994-0.9998 from the idealised
  direction. APD and SPD score TMS on its one tied matrix W, i.e. on the W_in column alone;
  that row is met too.
- **AuxK** (aux_coef 0.03) keeps every subnetwork alive on TMS, TMCS and x²; the next section
  shows each change alone on TMS, TMCS and the higher-rank model.
- **TMCS r².** The target copies the paper's figure, whose number is a Pearson r: the paper's
  notebook prints `np.corrcoef` of the entries of A against those of each subnetwork's own
  V_k[W_out] @ V_k[W_in] (no per-subnetwork scale, not squared). A true r² of 0.92 asks more
  than these models compute: the trained models of seeds 0-2 themselves reproduce A with r²
  0.87-0.92 (the "reference" row; over seeds 0-19 0.84-0.93, 0.92 or more in 2: section "Toy
  models: TMCS with more subnetworks"), just above the best any rank-5 W_out W_in can do (the "linear-part bound" row,
  0.86-0.91; for random A see the line under the table), the output ReLU adding 0.002-0.014.
  Against the matrix the model actually computes, f(e_i) - f(0), the subnetworks
  give r² 0.90-0.98. On the paper's own statistic we get 0.918 and 0.924 in two seeds and 0.69
  in seed 2, where the L3D run landed in a poorer optimum: the best of 3 L3D seeds by final
  training loss (`l3d_lens.toy.sweep.best_of`, the "best of 3" rows; seed 2's kept run ended at
  0.028) gives 0.905 there, r² 0.97 against the model's own matrix, and keeps seeds 0 and 1
  at 0.918 and 0.923 (the single runs: 0.918, 0.924): within 0.016 of the paper's single run, 1
  of 3 at or above it.
  Without a per-subnetwork scale the statistic also depends on how each unit-norm subnetwork
  splits its norm between W_in, W_out and the bias. The same statistic for the principal
  direction of each feature's own gradients, which exact reconstruction would give, is 0.924,
  0.932 and 0.916: the kept runs are 0.007-0.012 below it, and in seed 2 it is itself below
  0.92. On 10 seeds (section "Toy models: more seeds") the best of 3 reaches 0.92 in 4, that
  reference in 7, and the best of 3 is never more than 0.017 below the reference. That gap is
  what the rows with two or more active features cost, not an optimisation shortfall (section
  "Toy models: TMCS and multi-feature rows", one L3D run per seed): the paper's 1,000 L3D
  epochs instead of 300 move the statistic by 0.0007 (median over 10 seeds), while L3D on the
  single-feature rows alone lands within 0.002 of the reference in 10 of 10 seeds (0.92 in 7,
  as the reference), with no poor optimum where the run on all rows has three (0.69-0.85), at
  7-12% held-out error instead of the all-rows run's 3-7%. On a two-feature row the zero-reference
  gradient has cross terms (feature c's W_in column times feature d's outputs) that no
  one-feature subnetwork holds, and fitting them tilts the subnetworks off the features'
  own directions.
- **Higher-rank.** Zero reference, no remedy: a subnetwork that dies early gets no gradient, so
  when one subnetwork has taken two groups no other takes the second over (4 live), and in one
  seed of ten (seed 7, next-but-one section) a group keeps two. One resampling of at most one dead subnetwork early in training (epoch
  25 of 300, toward the residual the live ones leave) gives exactly one live subnetwork per group
  with the rest dead; the section "Toy models: resampling" tests it on 10 seeds, 5 of them held
  out. AuxK instead keeps every subnetwork alive (next section): the 5 most active are one per
  group, but the other 5 stay live with P_act <= 0.026 instead of dying.
- **x²: circuits per sign.** The GeLU MLP squares x > 0 and x < 0 of most features with
  different units: the principal directions of a feature's gradients on its positive and its
  negative rows are at |cos| 0.06-0.96 (the "model" row), so the model has up to 10 circuits,
  not 5. One subnetwork, having one coefficient, cannot reconstruct two near-orthogonal
  directions, so with the paper's 5 subnetworks L3D must merge two circuits somewhere, and in 3
  of 3 seeds it merged signs of *different* features into one subnetwork at least once. With
  10 subnetworks of rank 1 (our settings; the paper also ran 10) no subnetwork serves two
  features and every feature has its own in 3 of 3 seeds, one subnetwork for both signs where
  they align and one per sign where they do not, at 6-8% error instead of 27-33%.
- **x² selectivity.** The target (>= 10, relevant output over the other outputs, at the delta
  where the relevant output has changed by half) is met per (feature, sign) circuit in 2 of 3
  seeds with 10 subnetworks. In seed 1 the model itself stands in the way: the principal
  direction of each circuit's own gradients, which a subnetwork reconstructing them exactly
  would follow, reaches only 6.8 there (the "reference" row; a reference, not a proven ceiling:
  L3D also fits rows with several features), and L3D's subnetworks get 6.0;
  training that model longer does not change this (ad hoc, with the tie rule below before its
  fix: 9.0 after 300 epochs, 7.6 after the paper's 1,000; a decayed learning rate for the last
  30 of 100 epochs: 6.0).
  Where the model allows it L3D comes close to the reference (16.4 against 15.8, 11.6 against
  13.1). The strict version, which also counts output i on rows without the feature against the
  subnetwork, stays at 3.9-9.4: moving a circuit's weights also shifts what output i gives at
  x_i = 0, which no gradient at x_i != 0 constrains. Selectivity reads each direction at both
  signs of delta; where both first reach the half change at the same grid point, this run reads
  the larger change there (then the less selective), the same for v and -v. Until 3f8c7ca it read
  +delta, which made the score depend on v's arbitrary sign; on the same models and
  decompositions as the run before, that changed seed 1's minimum over circuits in two rows (the
  reference 6.70 to 6.82; 5 × rank 2 2.32 to 2.16) and no other number of this table. "Toy models:
  more seeds" was rerun with it too (seed 4's best of 3 went from 8.51 to 10.4, its reference
  10.4); the sections "x² training recipe", "per-sample loss" and "per-sample, then batch" were
  measured with the earlier rule.
- **x² on 10 seeds** (section "Toy models: more seeds", the same models as seeds 0-2 here). A single
  L3D run shares a subnetwork between two features in 1 of 10 seeds (8); the best of 3 L3D
  seeds by final training loss gets one subnetwork per feature, none shared, in 10 of 10, and
  selectivity >= 10 in 6 of 10, as does the model's own reference. Below 10 the reference is too
  (seeds 1, 3, 7, 8: 4.7-9.4, L3D 0.05-1.2 under it). Seed 3's x² model used to leave feature 4 unlearned (r² -0.45), so that row
  scored a model of 4 features; `make_toy` now replaces such a model (`LEARNED_R2`), and the
  retrained seed-3 model is one of the least selective (reference 4.7). Training is
  bit-reproducible on one machine but not across CPUs (x² seed 0 trained to loss 0.002027 on
  the CPU of an earlier run of this section, to 0.002041 on this one), and a single x² run can
  change its answer with the last bits: seed 7 shared a subnetwork on that CPU and not on this.
- **x² training recipe** (section "Toy models: x² training recipe"). The paper's own recipe
  (1,000 epochs, AdamW lr 1e-3) does not make the target easier: its models reach a lower
  training loss in 9 of 10 seeds (the worst feature's held-out r² is higher in 5) but their
  reference reaches 10 in none of the 10 seeds (4.5-9.9), against 6 of 10 for ours (seed 9 at
  10.03). How selective a circuit can be is a property of the
  trained model, which the paper reports only as "mostly the relevant outputs".
"""


SETTINGS = {"paper": paper_config, "ours": recommended_config}
#: extra decompositions with our settings, per toy: setting -> (config overrides, L3D restarts).
#: x² with the paper's 5 subnetworks of rank 2 (``recommended_config`` gives it 10 of rank 1);
#: TMCS as the best of 3 L3D seeds by final training loss (``l3d_lens.toy.sweep.best_of``)
EXTRA = {"square": {"ours_5x2": (dict(n_subnetworks=5, rank=2), 1)},
         "tmcs": {"ours_best3": ({}, 3)}}


def run_one(name: str, seed: int, epochs: int, threads: int) -> list[dict[str, Any]]:
    """Train toy ``name`` from ``seed`` and decompose it with each of ``SETTINGS``."""
    torch.set_num_threads(threads)
    rows = []
    t0 = time.perf_counter()
    toy = make_toy(name, seed)
    seconds_model = time.perf_counter() - t0
    runs = [(setting, config, {}, 1) for setting, config in SETTINGS.items()]
    runs += [(setting, recommended_config, shape, restarts)
             for setting, (shape, restarts) in EXTRA.get(name, {}).items()]
    for setting, config, shape, restarts in runs:
        t1 = time.perf_counter()
        cfg = config(name, seed=seed, epochs=epochs, lr_step=scaled_lr_step(epochs), **shape)
        dec = best_of(toy.model, toy.l3d_data, cfg, seeds=[seed + 10 * r for r in range(restarts)])
        t2 = time.perf_counter()
        r = evaluate(toy, dec, seed=seed)
        r.update(toy=name, seed=seed, setting=setting, seconds_model=seconds_model, seconds_l3d=t2 - t1)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}, default=str), flush=True)
    return rows


def run(toys, seeds, epochs: int, jobs: int, threads: int) -> list[dict[str, Any]]:
    tasks = [(name, seed) for name in toys for seed in seeds]
    if jobs <= 1:
        return [r for name, seed in tasks for r in run_one(name, seed, epochs, threads)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, name, seed, epochs, threads) for name, seed in tasks]
        return [r for f in futures for r in f.result()]


def _stats(values) -> str:
    values = [float(v) for v in values]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {sd:.2g} ({min(values):.3g}–{max(values):.3g})"


def _pct(values) -> str:
    values = [100 * float(v) for v in values]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g}% ± {sd:.2g}% ({min(values):.3g}%–{max(values):.3g}%)"


def _live_purity(row: dict[str, Any]) -> float:
    """The smallest share of a live subnetwork's W_in mass in the group it is counted for."""
    return min(p for p, a in zip(row["purity"], row["p_act"]) if a > 0)


def _count(flags) -> str:
    flags = list(flags)
    return f"{sum(bool(f) for f in flags)}/{len(flags)} seeds"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per metric: the paper's number, ours with the paper's settings, ours with
    ``recommended_config``, the target, and how many seeds meet it (recommended settings)."""
    lines = ["| toy model | metric | paper | paper's settings: mean ± sd (min–max) | our settings: mean ± sd (min–max) "
             "| target | met (our settings) |", "|---|---|---|---|---|---|---|"]

    def add(toy, metric, paper, fmt, target="–", ok=None, ours_setting="ours", paper_column=None):
        paper_rows = [x for x in rows if x["toy"] == toy and x["setting"] == "paper"]
        ours = [x for x in rows if x["toy"] == toy and x["setting"] == ours_setting]
        # the paper's-settings column only on rows of its shape (x²: 5 × rank 2, ``ours_5x2``)
        paper_column = ours_setting == "ours" if paper_column is None else paper_column
        cells = [(fmt(paper_rows) if paper_rows else "n/a") if paper_column else "–",
                 fmt(ours) if ours else "n/a"]
        met = _count(ok(x) for x in ours) if ok and ours else "–"
        label = {"tms": "TMS", "tmcs": "TMCS", "higher_rank": "higher-rank", "square": "x²"}[toy]
        lines.append(f"| {label} | {metric} | {paper} | {cells[0]} | {cells[1]} | {target} | {met} |")

    def stat(key, scale=1.0):
        return lambda r: _stats(scale * x[key] for x in r)

    def pct(key):
        return lambda r: _pct(x[key] for x in r)

    present = {x["toy"] for x in rows}
    if "tms" in present:
        add("tms", "reconstruction error", "19%", pct("error"), "≤ 19%", lambda x: x["error"] <= 0.19)
        add("tms", "min over 5 features of max over subnetworks of \\|cos\\| with the feature's column of W (W_in; "
            "APD/SPD's TMS is tied, one W)", "encoder directions parallel", stat("min_cos_encoder"), "≥ 0.99",
            lambda x: x["min_cos_encoder"] >= 0.99)
        add("tms", "min over 5 features of max \\|cos\\| (W_in column + W_out row, stricter)", "–", stat("min_cos"),
            "≥ 0.99", lambda x: x["min_cos"] >= 0.99)
        add("tms", "reference: min over features of \\|cos\\| of the principal direction of the feature's own "
            "gradients (single-feature rows, W_in + W_out; against zero in the paper's-settings column, against the "
            "batch mean in ours) with W_in column + W_out row", "–", stat("min_cos_reference"))
        add("tms", "min over features of \\|cos\\| of the feature's subnetwork (one-to-one assignment) with the "
            "principal direction of its own gradients (as in the row above)", "–", stat("min_cos_to_gradient"))
        add("tms", "mean max \\|cos\\| (W_in column + W_out row)", "–", stat("mmcs"))
        add("tms", "dead subnetworks (of 5)", "–", stat("dead_fraction", 5))
    if "tmcs" in present:
        add("tmcs", "reconstruction error", "6.4%", pct("error"), "≤ 6.4%", lambda x: x["error"] <= 0.064)
        add("tmcs", "r² of A from subnetworks (V_k[W_out] @ W_in[:, i])", "0.92 (a Pearson r, see below)",
            stat("r2_decoder"), "≥ 0.92", lambda x: x["r2_decoder"] >= 0.92)
        add("tmcs", "the paper's statistic: Pearson r of A with the subnetworks' own V_k[W_out] @ V_k[W_in] "
            "(np.corrcoef, unscaled; the paper's figure labels it r²)", "0.92 (one run)", stat("pearson_r"),
            "≥ 0.92", lambda x: x["pearson_r"] >= 0.92)
        add("tmcs", "linear-part bound: r² of A's best rank-5 approximation (no rank-5 W_out W_in does better; the "
            "output ReLU can take the model a little past it)", "–", stat("r2_rank_bound"))
        add("tmcs", "r² of A from subnetworks (output JVP at x = e_i)", "–", stat("r2"))
        add("tmcs", "reference: r² of A from the model itself, f(e_i) - f(0) (what subnetworks that follow the model "
            "give back; not a bound: directions fitted to A alone can score higher)", "–", stat("r2_model"))
        add("tmcs", "r² of the model's own matrix f(e_i) - f(0) from subnetworks (V_k[W_out] @ W_in[:, i])", "–",
            stat("r2_decoder_vs_model"))
        add("tmcs", "dead subnetworks (of 10)", "–", stat("dead_fraction", 10))
        if any(x["toy"] == "tmcs" and x["setting"] == "ours_best3" for x in rows):
            best3 = dict(ours_setting="ours_best3")
            tag = "best of 3 L3D seeds by final training loss (`best_of`): "
            add("tmcs", tag + "reconstruction error", "6.4%", pct("error"), "≤ 6.4%", lambda x: x["error"] <= 0.064,
                **best3)
            add("tmcs", tag + "the paper's statistic (Pearson r)", "0.92 (one run)", stat("pearson_r"), "≥ 0.92",
                lambda x: x["pearson_r"] >= 0.92, **best3)
            add("tmcs", tag + "r² of A (V_k[W_out] @ W_in[:, i])", "–", stat("r2_decoder"), "≥ 0.92",
                lambda x: x["r2_decoder"] >= 0.92, **best3)
            add("tmcs", tag + "r² of the model's own matrix f(e_i) - f(0)", "–", stat("r2_decoder_vs_model"), **best3)
    if "higher_rank" in present:
        add("higher_rank", "live subnetworks per group of 5 inputs", "one per group, rest dead",
            lambda r: "; ".join(f"seed {x['seed']}: {x['live_per_group']}" for x in r), "[1, 1, 1, 1, 1]",
            lambda x: x["one_per_group"] and x["n_live"] == 5 and _live_purity(x) >= PURE_GROUP)
        add("higher_rank", "live subnetworks (of 10)", "5", stat("n_live"), "5", lambda x: x["n_live"] == 5)
        add("higher_rank", "lowest share of a live subnetwork's W_in mass in its own group (one per group also "
            f"needs ≥ {PURE_GROUP:.0%}, `metrics.PURE_GROUP`)", "–", lambda r: _stats(_live_purity(x) for x in r))
        add("higher_rank", "descriptive: the 5 most active subnetworks are live and own one group each", "–",
            lambda r: _count(x["most_active_one_per_group"] and x["n_live"] >= 5 for x in r))
        add("higher_rank", "descriptive: largest P_act of the other 5", "–", stat("others_max_p_act"))
        add("higher_rank", "reconstruction error", "–", pct("error"))
    if "square" in present:
        add("square", "min over features of the model's own r² of x_i² (rows where feature i is active)", "–",
            lambda r: _stats(min(x["model_r2_per_feature"]) for x in r))
        add("square", "model: \\|cos\\| of the principal gradient directions of x_i > 0 and x_i < 0 (min over "
            "features; mean)", "–", lambda r: _stats(nanmin(x["sign_alignment"]) for x in r) + "; "
            + _stats(statistics.fmean(v for v in x["sign_alignment"] if v == v) for x in r))
        for setting, shape in (("ours", "10 × rank 1"), ("ours_5x2", "5 × rank 2")):
            if not any(x["toy"] == "square" and x["setting"] == setting for x in rows):
                continue
            kw = dict(ours_setting=setting, paper_column=setting == "ours_5x2")
            tag = f"**{shape}**: " if setting == "ours" else f"{shape} (our settings, the paper's shape): "
            add("square", tag + "reconstruction error", "32% (5 × rank 2)", pct("error"), "≤ 32%",
                lambda x: x["error"] <= 0.32, **kw)
            add("square", tag + "one subnetwork per feature: distinct subnetworks dominate the features, and none "
                "dominates a sign of two features", "yes", lambda r: _count(x["one_per_feature_none_shared"] for x in r),
                "all seeds", lambda x: x["one_per_feature_none_shared"], **kw)
            add("square", tag + "subnetworks per feature (one for both signs of x, or one per sign)", "–",
                lambda r: "; ".join(f"seed {x['seed']}: {x['subnetworks_per_feature']}" for x in r), **kw)
            # the target row: per feature where a subnetwork is meant to carry the whole feature (5
            # subnetworks), per circuit where a feature may have one subnetwork per sign (10)
            per_circuit = setting == "ours"
            add("square", tag + "min over features of selectivity at half change of the feature's dominant "
                "subnetwork: output i vs the other outputs", "\"mostly the relevant outputs\"",
                stat("selectivity_by_output_min"), *(() if per_circuit else (
                    "≥ 10", lambda x: x["selectivity_by_output_min"] >= 10 and x["selectivity_reached"]
                    and x["one_per_feature"])), **kw)
            add("square", tag + "the same per (feature, sign) circuit, with that sign's rows relevant"
                + (" (the target row here: a subnetwork of one sign acts on that sign's rows only)" if per_circuit
                   else ""), "–", stat("circuit_selectivity_by_output_min"), *(("≥ 10", lambda x: (
                    x["circuit_selectivity_by_output_min"] >= 10 and x["circuit_selectivity_reached"]
                    and x["feature_pure"])) if per_circuit else ()), **kw)
            add("square", tag + "strict selectivity (output i on the relevant rows vs every other (sample, output)): "
                "min over features; min over circuits", "–",
                lambda r: _stats(x["selectivity_min"] for x in r) + "; "
                + _stats(x["circuit_selectivity_min"] for x in r), **kw)
            add("square", tag + "dead subnetworks", "–",
                lambda r: _stats(x["dead_fraction"] * len(x["p_act"]) for x in r), **kw)
        add("square", "reference (the model, no L3D): the same selectivities for the principal direction of each "
            "feature's (circuit's) own gradients, the direction a subnetwork reconstructing them exactly would take: "
            "by output, features; by output, circuits; strict, features; strict, circuits", "–",
            lambda r: "; ".join(_stats(x[k] for x in r) for k in (
                "reference_selectivity_by_output_min", "reference_circuit_selectivity_by_output_min",
                "reference_selectivity_min", "reference_circuit_selectivity_min")))
    return "\n".join(lines)


def rank_bound_spread(draws: int = 2000) -> str:
    """How far a true r² of A can go for TMCS's shape: the rank-5 bound over ``draws`` random
    A (``circuit_matrix(10, 10, seed=s)``, s = 0..draws-1), mean, 5-95% range and how often it
    reaches 0.92."""
    b = torch.tensor([metrics.rank_bound_r2(circuit_matrix(10, 10, seed=s), 5) for s in range(draws)])
    return (f"over {draws:,} random A (uniform in [0, 3], `circuit_matrix` seeds 0-{draws - 1}) the rank-5 bound has "
            f"mean {b.mean():.3f}, 5-95% range {b.quantile(0.05):.3f}-{b.quantile(0.95):.3f}, and reaches 0.92 "
            f"for {100 * (b >= 0.92).double().mean():.1f}% of them")


def section(rows, args, measured: Measured) -> str:
    models = ", ".join(f"{n} {DEFAULT_EPOCHS[n]}" for n in TOY_NAMES)
    shapes = ", ".join(f"{n} {k} × rank {r}" for n, (k, r) in PAPER_SHAPES.items())
    losses = "; ".join(f"{n} {_stats(r['train_loss_model'] for r in rows if r['toy'] == n and r['setting'] == 'ours')}"
                       for n in TOY_NAMES if any(r["toy"] == n for r in rows))
    parts = [SECTION, "",
             f"Command: `{measured.command('toy_models.py')}` ({args.jobs} jobs, thread count {args.threads} each: "
             f"`torch.set_num_threads({args.threads})`); machine: {measured.machine}; total "
             f"{measured.seconds / 60:.1f} min.",
             "",
             f"L3D, both settings: all weights and biases, k = 0.1, batch 32, Adam lr 0.01 ×0.8 every "
             f"{scaled_lr_step(args.epochs)} epochs, {args.epochs} epochs (paper: 1,000; the schedule is "
             f"scaled), 1,000 samples, MSE; subnetworks: {shapes} (the paper's-settings column always has these shapes; x² with our settings: 10 × rank 1, "
             f"and also the paper's 5 × rank 2). *Paper's settings*: a random other sample of the "
             f"batch as reference, no dead-subnetwork remedy (`paper_config`). *Our settings*: reference zero (TMS: the batch "
             f"mean) and AuxK aux_coef 0.03, except higher-rank (no AuxK; one resampling of at most one dead subnetwork "
             f"at epoch {recommended_config('higher_rank', epochs=args.epochs).resample_epochs[0]}) (`recommended_config`). Seeds "
             f"{', '.join(map(str, args.seeds))}: each seed re-trains the toy model and runs every decomposition. "
             f"Metrics on 2,000 held-out samples (l3d_lens.toy.reproduce.evaluate).",
             "",
             f"Toy models: 10,000 samples, batch 32, AdamW, MSE, epochs {models} (paper: 1,000), lr "
             f"{', '.join(f'{n} {LR[n]:g}' for n in TOY_NAMES)} (paper: 1e-3); the paper's initialisation for the "
             f"superposition models, PyTorch's for x²; TMS trained tied and stored untied, best of 4 starts by "
             f"training loss; x² best of 3, and of a fresh 3 if the kept model never learned a feature "
             f"(`LEARNED_R2`; l3d_lens.toy.train). Final training MSE: {losses}.",
             "", table(rows), ""]
    if any(r["toy"] == "tmcs" for r in rows):
        parts += [f"TMCS r² bound: {rank_bound_spread()}.", ""]
    if NOTES.strip():
        parts += [NOTES.strip(), ""]
    return "\n".join(parts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toys", nargs="+", default=list(TOY_NAMES), choices=TOY_NAMES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=300, help="L3D epochs (paper: 1000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=2, help="toy models run in parallel processes")
    add_output_arguments(ap, ROOT / "BENCHMARKS.md")
    section_main(ap, SECTION, section, lambda args: run(args.toys, args.seeds, args.epochs, args.jobs, args.threads),
                 argv)


if __name__ == "__main__":
    main()
