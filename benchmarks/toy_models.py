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
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_or_load, write_section  # noqa: E402
from l3d_lens import decompose  # noqa: E402
from l3d_lens.toy import DEFAULT_EPOCHS, TOY_NAMES, make_toy  # noqa: E402
from l3d_lens.toy.reproduce import PAPER_SHAPES, evaluate, paper_config, recommended_config  # noqa: E402
from l3d_lens.toy.train import LR  # noqa: E402

SECTION = "## Toy models"

#: findings written into the section under the table (they describe the run of record)
NOTES = """
Findings (run of record above):

- **Reference.** With the paper's stated reference, a random other sample, each gradient is
  g_i = J_i^T (f(x_i) - f(x_j)): it also carries the partner's features (for TMCS terms like
  x_c x_d W_out^T a_d e_c^T, on feature c's weights but along feature d's output), which no
  one-feature rank-1 subnetwork reconstructs. Errors stay at 23-37% and subnetworks die. The
  paper's public code for the toy models has a `ZeroOutput` reference in its scripts; with y_r = 0
  (`reference="zero"`), g_i = J_i^T f(x_i) involves only the sample's own features, and TMS and
  TMCS reach 10-11% and 3-4.3% error, below the paper's 19% and 6.4%.
- **AuxK** (aux_coef 0.03) keeps every subnetwork alive on TMS, TMCS and x²; the next section
  shows each change alone.
- **TMCS r².** The trained model itself reproduces A only with r² 0.87-0.92 (the "ceiling" row:
  10 inputs through 5 hidden units; its loss has converged by 100 epochs, 400 give the same), so
  r² >= 0.92 against A is out of reach for this model. Against the matrix the model actually
  computes, f(e_i) - f(0), the subnetworks give r² 0.90-0.98.
- **TMS |cos|.** APD and SPD score TMS on its one tied matrix W, whose column i is feature
  i's direction; here that is W_in (stored untied), and every feature has a subnetwork within
  0.99 of it in every seed. The stricter score over W_in column + W_out row stays at
  0.986-0.989. The idealised direction is not quite where the gradients point: a feature's own
  gradients (g = J^T f(x) on rows where it alone is active) have their principal direction at
  0.993-0.994 from it (the "reference" row), because its interference switches on other outputs,
  whose W_out rows get gradient too. The subnetworks are within 0.996-0.999 of that principal
  direction but tilted a little further toward the interference rows (about 2% of their squared
  norm): the top-k keeps the samples with large feature values, whose gradients are tilted more
  (principal direction 0.991-0.992 from the idealised one for values > 0.75, ad hoc); we have
  not pinned down the rest. Longer L3D (1,000 epochs), k = 0.2, rank 2 or no AuxK all left the
  stricter score at 0.987 (seed 0, ad hoc runs).
- **Higher-rank.** Zero reference, no remedy: a subnetwork that dies early gets no gradient, so
  when one subnetwork has taken two groups no other takes the second over (4 live), and in some
  seeds a group keeps two. One resampling of at most one dead subnetwork early in training (epoch
  25 of 300, toward the residual the live ones leave) gives exactly one live subnetwork per group
  with the rest dead; the section "Toy models: resampling" tests it on 10 seeds, 5 of them held
  out. AuxK instead keeps every subnetwork alive (next section): the 5 most active are one per
  group, but the other 5 stay live with P_act <= 0.025 instead of dying.
- **x².** With the better-trained model (every feature learned, own r² >= 0.80) one subnetwork
  per feature in 1 of 3 seeds. In the other two, L3D gives one feature two subnetworks, one for
  x > 0 and one for x < 0 (89-94% of that sign's activity each), and two other features share
  one: the GeLU MLP computes x² with different units for the two signs, and with 5 subnetworks
  the split wins. The minimum selectivity over features is 2.2-7.7 (target 10), the mean over
  features 7.4-10.5. Error 27-33% against the paper's 32%.
"""


SETTINGS = {"paper": paper_config, "ours": recommended_config}


def run_one(name: str, seed: int, epochs: int, threads: int) -> list[dict[str, Any]]:
    """Train toy ``name`` from ``seed`` and decompose it with each of ``SETTINGS``."""
    torch.set_num_threads(threads)
    rows = []
    t0 = time.perf_counter()
    toy = make_toy(name, seed)
    seconds_model = time.perf_counter() - t0
    for setting, config in SETTINGS.items():
        t1 = time.perf_counter()
        cfg = config(name, seed=seed, epochs=epochs, lr_step=max(1, round(100 * epochs / 1000)))
        dec = decompose(toy.model, toy.l3d_data, cfg, progress=False)
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
    return _stats([100 * v for v in values]).replace(" (", "% (").replace(")", "%)")


def _count(flags) -> str:
    flags = list(flags)
    return f"{sum(bool(f) for f in flags)}/{len(flags)} seeds"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per metric: the paper's number, ours with the paper's settings, ours with
    ``recommended_config``, the target, and how many seeds meet it (recommended settings)."""
    lines = ["| toy model | metric | paper | paper's settings: mean ± sd (min–max) | our settings: mean ± sd (min–max) "
             "| target | met (our settings) |", "|---|---|---|---|---|---|---|"]

    def add(toy, metric, paper, fmt, target="–", ok=None):
        cells = []
        for setting in SETTINGS:
            r = [x for x in rows if x["toy"] == toy and x["setting"] == setting]
            cells.append(fmt(r) if r else "n/a")
        ours = [x for x in rows if x["toy"] == toy and x["setting"] == "ours"]
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
            "gradients (single-feature rows, W_in + W_out) with W_in column + W_out row", "–", stat("min_cos_reference"))
        add("tms", "min over features of \\|cos\\| of the feature's subnetwork (one-to-one assignment) with the "
            "principal direction of its own gradients (W_in + W_out)", "–", stat("min_cos_to_gradient"))
        add("tms", "mean max \\|cos\\| (W_in column + W_out row)", "–", stat("mmcs"))
        add("tms", "dead subnetworks (of 5)", "–", stat("dead_fraction", 5))
    if "tmcs" in present:
        add("tmcs", "reconstruction error", "6.4%", pct("error"), "≤ 6.4%", lambda x: x["error"] <= 0.064)
        add("tmcs", "r² of A from subnetworks (V_k[W_out] @ W_in[:, i])", "0.92", stat("r2_decoder"), "≥ 0.92",
            lambda x: x["r2_decoder"] >= 0.92)
        add("tmcs", "r² of A from subnetworks (output JVP at x = e_i)", "–", stat("r2"))
        add("tmcs", "ceiling: r² of A from the model itself, f(e_i) - f(0)", "–", stat("r2_model"))
        add("tmcs", "r² of the model's own matrix f(e_i) - f(0) from subnetworks (V_k[W_out] @ W_in[:, i])", "–",
            stat("r2_decoder_vs_model"))
        add("tmcs", "dead subnetworks (of 10)", "–", stat("dead_fraction", 10))
    if "higher_rank" in present:
        add("higher_rank", "live subnetworks per group of 5 inputs", "one per group, rest dead",
            lambda r: "; ".join(f"seed {x['seed']}: {x['live_per_group']}" for x in r), "[1, 1, 1, 1, 1]",
            lambda x: x["one_per_group"] and x["n_live"] == 5)
        add("higher_rank", "live subnetworks (of 10)", "5", stat("n_live"), "5", lambda x: x["n_live"] == 5)
        add("higher_rank", "descriptive: the 5 most active subnetworks are live and own one group each", "–",
            lambda r: _count(x["most_active_one_per_group"] and x["n_live"] >= 5 for x in r))
        add("higher_rank", "descriptive: largest P_act of the other 5", "–", stat("others_max_p_act"))
        add("higher_rank", "reconstruction error", "–", pct("error"))
    if "square" in present:
        add("square", "min over features of the model's own r² of x_i² (rows where feature i is active)", "–",
            lambda r: _stats(min(x["model_r2_per_feature"]) for x in r))
        add("square", "reconstruction error", "32%", pct("error"), "≤ 32%", lambda x: x["error"] <= 0.32)
        add("square", "one subnetwork per feature (argmax of activity share)", "yes",
            lambda r: _count(x["one_per_feature"] for x in r), "all seeds", lambda x: x["one_per_feature"])
        add("square", "min over features of selectivity at half change", "\"mostly the relevant outputs\"",
            stat("selectivity_min"), "≥ 10",
            lambda x: x["selectivity_min"] >= 10 and x["selectivity_reached"] and x["one_per_feature"])
        add("square", "mean over features of selectivity at half change", "–",
            lambda r: _stats(statistics.fmean(x["selectivity"]) for x in r))
        add("square", "activity share of the feature's own subnetwork (mean)", "–",
            lambda r: _stats(statistics.fmean(x["activity_share"]) for x in r))
    return "\n".join(lines)


def _run_args(argv: list[str]) -> list[str]:
    """The arguments that shape the run (output-only options --out/--json/--from-json dropped)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--out", "--json", "--from-json"):
            skip = True
            continue
        if a.split("=")[0] in ("--out", "--json", "--from-json"):
            continue
        out.append(a)
    return out


def section(rows, args, seconds: float) -> str:
    models = ", ".join(f"{n} {DEFAULT_EPOCHS[n]}" for n in TOY_NAMES)
    shapes = ", ".join(f"{n} {k} × rank {r}" for n, (k, r) in PAPER_SHAPES.items())
    losses = "; ".join(f"{n} {_stats(r['train_loss_model'] for r in rows if r['toy'] == n and r['setting'] == 'ours')}"
                       for n in TOY_NAMES if any(r["toy"] == n for r in rows))
    cmd = "python benchmarks/toy_models.py " + " ".join(_run_args(sys.argv[1:]))
    parts = [SECTION, "",
             f"Command: `{cmd.strip()}` ({args.jobs} jobs, thread count {args.threads} each: "
             f"`torch.set_num_threads({args.threads})`); "
             f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, torch {torch.__version__}; total {seconds / 60:.1f} min.",
             "",
             f"L3D, both settings: all weights and biases, k = 0.1, batch 32, Adam lr 0.01 ×0.8 every "
             f"{max(1, round(100 * args.epochs / 1000))} epochs, {args.epochs} epochs (paper: 1,000; the schedule is "
             f"scaled), 1,000 samples, MSE; subnetworks: {shapes}. *Paper's settings*: a random other sample of the "
             f"batch as reference, no dead-subnetwork remedy (`paper_config`). *Our settings*: reference zero and "
             f"AuxK aux_coef 0.03, except higher-rank (no AuxK; one resampling of at most one dead subnetwork "
             f"at epoch {recommended_config('higher_rank', epochs=args.epochs).resample_epochs[0]}) (`recommended_config`). Seeds "
             f"{', '.join(map(str, args.seeds))}: each seed re-trains the toy model and runs both decompositions. "
             f"Metrics on 2,000 held-out samples (l3d_lens.toy.reproduce.evaluate).",
             "",
             f"Toy models: 10,000 samples, batch 32, AdamW, MSE, epochs {models} (paper: 1,000), lr "
             f"{', '.join(f'{n} {LR[n]:g}' for n in TOY_NAMES)} (paper: 1e-3); the paper's initialisation for the "
             f"superposition models, PyTorch's for x²; TMS trained tied and stored untied, best of 4 starts by "
             f"training loss; x² best of 3 (l3d_lens.toy.train). Final training MSE: {losses}.",
             "", table(rows), ""]
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
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's metrics here")
    ap.add_argument("--from-json", type=Path, default=None, help="only rewrite the section from saved metrics")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, seconds = run_or_load(lambda: run(args.toys, args.seeds, args.epochs, args.jobs, args.threads),
                                args.from_json, args.json)
    write_section(SECTION, section(rows, args, seconds), args.out)
    print(f"wrote {SECTION!r} to {args.out}")


if __name__ == "__main__":
    main()
