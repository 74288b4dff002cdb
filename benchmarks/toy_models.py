"""Reproduce the paper's four toy models (TMS, TMCS, higher-rank circuits, x -> x^2) with
several seeds and write the "## Toy models" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_models.py                     # paper settings, seeds 0 1 2
    python benchmarks/toy_models.py --epochs 200        # shorter L3D run (lr step scaled)

Every seed re-trains the toy model (l3d_lens.toy.make_toy) and re-runs L3D with the paper's
settings (l3d_lens.toy.reproduce.paper_config) and that seed; the metrics are those of
l3d_lens.toy.reproduce.evaluate on 2,000 held-out samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l3d_lens import decompose  # noqa: E402
from l3d_lens.toy import DEFAULT_EPOCHS, TOY_NAMES, make_toy  # noqa: E402
from l3d_lens.toy.reproduce import PAPER_SHAPES, evaluate, paper_config  # noqa: E402

SECTION = "## Toy models"

NOTES_FILE = Path(__file__).with_name("toy_models_notes.md")


def run(toys, seeds, epochs: int) -> list[dict[str, Any]]:
    rows = []
    for name in toys:
        for seed in seeds:
            t0 = time.perf_counter()
            toy = make_toy(name, seed)
            t1 = time.perf_counter()
            cfg = paper_config(name, seed=seed, epochs=epochs, lr_step=max(1, round(100 * epochs / 1000)))
            dec = decompose(toy.model, toy.l3d_data, cfg, progress=False)
            t2 = time.perf_counter()
            r = evaluate(toy, dec, seed=seed)
            r.update(toy=name, seed=seed, seconds_model=t1 - t0, seconds_l3d=t2 - t1)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}, default=str), flush=True)
    return rows


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
    by = {name: [r for r in rows if r["toy"] == name] for name in TOY_NAMES}
    lines = ["| toy model | metric | paper | ours: mean ± sd (min–max) over seeds | target | met |",
             "|---|---|---|---|---|---|"]

    def add(toy, metric, paper, ours, target, met):
        lines.append(f"| {toy} | {metric} | {paper} | {ours} | {target} | {met} |")

    if by["tms"]:
        r = by["tms"]
        add("TMS", "reconstruction error", "19%", _pct(x["error"] for x in r), "≤ 19%",
            _count(x["error"] <= 0.19 for x in r))
        add("TMS", "min over 5 features of max \\|cos\\| (W_in column + W_out row)", "encoder directions parallel",
            _stats(x["min_cos"] for x in r), "≥ 0.99", _count(x["min_cos"] >= 0.99 for x in r))
        add("TMS", "mean max \\|cos\\| (APD/SPD score)", "–", _stats(x["mmcs"] for x in r), "–", "–")
        add("TMS", "dead subnetworks", "–", _stats(5 * x["dead_fraction"] for x in r), "–", "–")
    if by["tmcs"]:
        r = by["tmcs"]
        add("TMCS", "reconstruction error", "6.4%", _pct(x["error"] for x in r), "≤ 6.4%",
            _count(x["error"] <= 0.064 for x in r))
        add("TMCS", "r² of A from subnetworks (output JVP at x = e_i)", "0.92", _stats(x["r2"] for x in r), "≥ 0.92",
            _count(x["r2"] >= 0.92 for x in r))
        add("TMCS", "r² of A from subnetworks (V_k[W_out] @ W_in[:, i])", "0.92", _stats(x["r2_decoder"] for x in r),
            "≥ 0.92", _count(x["r2_decoder"] >= 0.92 for x in r))
        add("TMCS", "matched \\|cos\\| with feature's W_in column (mean over features)", "–",
            _stats(statistics.fmean(x["match_cos"]) for x in r), "–", "–")
        add("TMCS", "dead subnetworks", "–", _stats(10 * x["dead_fraction"] for x in r), "–", "–")
    if by["higher_rank"]:
        r = by["higher_rank"]
        add("higher-rank", "exactly one live subnetwork per group, rest dead", "yes",
            "; ".join(f"seed {x['seed']}: {x['live_per_group']}" for x in r), "[1, 1, 1, 1, 1]",
            _count(x["one_per_group"] and x["n_live"] == 5 for x in r))
        add("higher-rank", "live subnetworks (of 10)", "5", _stats(x["n_live"] for x in r), "5",
            _count(x["n_live"] == 5 for x in r))
        add("higher-rank", "reconstruction error", "–", _pct(x["error"] for x in r), "–", "–")
    if by["square"]:
        r = by["square"]
        add("x²", "reconstruction error", "0.32", _pct(x["error"] for x in r), "–", "–")
        add("x²", "one subnetwork per feature (argmax of activity share)", "yes", _count(x["one_per_feature"] for x in r),
            "all seeds", _count(x["one_per_feature"] for x in r))
        add("x²", "min over features of selectivity at half change", "\"mostly the relevant outputs\"",
            _stats(x["selectivity_min"] for x in r), "≥ 10",
            _count(x["selectivity_min"] >= 10 and x["selectivity_reached"] and x["one_per_feature"] for x in r))
        add("x²", "activity share of the feature's own subnetwork (mean)", "–",
            _stats(statistics.fmean(x["activity_share"]) for x in r), "–", "–")
    return "\n".join(lines)


def section(rows, args, seconds: float) -> str:
    models = ", ".join(f"{n} {DEFAULT_EPOCHS[n]}" for n in TOY_NAMES)
    shapes = ", ".join(f"{n} {k} × rank {r}" for n, (k, r) in PAPER_SHAPES.items())
    losses = "; ".join(f"{n} {_stats(r['train_loss_model'] for r in rows if r['toy'] == n)}"
                       for n in TOY_NAMES if any(r["toy"] == n for r in rows))
    cmd = "python benchmarks/toy_models.py " + " ".join(sys.argv[1:])
    parts = [SECTION, "",
             f"Command: `{cmd.strip()}` (thread count {args.threads}: `torch.set_num_threads({args.threads})`); "
             f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, torch {torch.__version__}; total {seconds / 60:.1f} min.",
             "",
             f"L3D: the paper's settings (all weights and biases, k = 0.1, batch 32, Adam lr 0.01 ×0.8 every "
             f"{max(1, round(100 * args.epochs / 1000))} epochs, {args.epochs} epochs, 1,000 samples, random other-sample "
             f"reference, MSE); subnetworks: {shapes}. Seeds {', '.join(map(str, args.seeds))}: each seed re-trains the "
             f"toy model and re-runs L3D. Metrics on 2,000 held-out samples (l3d_lens.toy.reproduce.evaluate).",
             "",
             f"Toy models: 10,000 samples, batch 32, AdamW lr 1e-3, MSE, epochs {models} (paper: 1,000; the losses "
             f"plateau well before, see notes). Final training MSE: {losses}.",
             "", table(rows), ""]
    if NOTES_FILE.exists():
        parts += [NOTES_FILE.read_text().strip(), ""]
    return "\n".join(parts)


def write_section(path: Path, text: str) -> None:
    """Replace the "## Toy models" section of ``path`` (up to the next "## " heading), or
    append it; the rest of the file is kept byte for byte."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    path.write_text(new.rstrip("\n") + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toys", nargs="+", default=list(TOY_NAMES), choices=TOY_NAMES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1000, help="L3D epochs (paper: 1000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's metrics here")
    ap.add_argument("--from-json", type=Path, default=None, help="only rewrite the section from saved metrics")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, seconds = saved["rows"], saved["seconds"]
    else:
        rows = run(args.toys, args.seeds, args.epochs)
        seconds = time.perf_counter() - start
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "seconds": seconds}, default=str))
    write_section(args.out, section(rows, args, seconds))
    print(f"wrote {SECTION!r} to {args.out}")


if __name__ == "__main__":
    main()
