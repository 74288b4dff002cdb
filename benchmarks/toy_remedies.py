"""What each departure from the paper changes on the toy models, one at a time, and a k / rank
sweep (l3d_lens.toy.sweep); writes the "## Toy models: remedies and sweep" section of
BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_remedies.py --json benchmarks/results/toy_remedies.json
        # seeds 0 1 2, 300 L3D epochs, 2 jobs

Factor grid on TMS, TMCS and the higher-rank model: reference random (the paper) or zero,
AuxK off (the paper) or aux_coef 0.03 (in every epoch, or in the first third only);
everything else is ``paper_config``. Sweep on TMCS
with the recommended settings: top_k in (0.05, 0.1, 0.2) x rank in (1, 2).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Measured, add_output_arguments, section_main  # noqa: E402
from l3d_lens import decompose  # noqa: E402
from l3d_lens.toy import make_toy  # noqa: E402
from l3d_lens.toy.reproduce import evaluate, paper_config, recommended_config, scaled_lr_step  # noqa: E402
from l3d_lens.toy.sweep import sweep  # noqa: E402

SECTION = "## Toy models: remedies and sweep"
FACTORS = [("random", 0.0, None), ("random", 0.03, None), ("zero", 0.0, None), ("zero", 0.03, None),
           ("zero", 0.03, 1 / 3)]
KEY = {"tms": ("min_cos_encoder", "min \\|cos\\| W_in"), "tmcs": ("r2_decoder_vs_model", "r² of own matrix"),
       "higher_rank": ("n_live", "live (want 5; one per group)")}


def factor_run(name: str, seed: int, epochs: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    toy = make_toy(name, seed)
    rows = []
    for reference, aux, aux_share in FACTORS:
        aux_epochs = None if aux_share is None else max(1, round(aux_share * epochs))
        cfg = paper_config(name, seed=seed, epochs=epochs, lr_step=scaled_lr_step(epochs), reference=reference,
                           aux_coef=aux, aux_epochs=aux_epochs)
        dec = decompose(toy.model, toy.l3d_data, cfg, progress=False)
        r = evaluate(toy, dec, seed=seed)
        r.update(toy=name, seed=seed, reference=reference, aux_coef=aux, aux_epochs=aux_epochs)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}, default=str), flush=True)
    return rows


def sweep_run(seed: int, epochs: int, top_k: float) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    toy = make_toy("tmcs", seed)
    cfg = recommended_config("tmcs", seed=seed, epochs=epochs, lr_step=scaled_lr_step(epochs))

    def score(dec):
        r = evaluate(toy, dec, seed=seed)
        return {"r2_decoder_vs_model": r["r2_decoder_vs_model"], "r2_decoder": r["r2_decoder"]}

    rows = sweep(toy.model, toy.l3d_data, cfg, top_k=[top_k], rank=[1, 2], eval_data=toy.eval_data, score=score)
    for r in rows:
        print(json.dumps(r, default=str), flush=True)
    return rows


def section(rows: list[dict[str, Any]], args, measured: Measured) -> str:
    factors = [r for r in rows if r["part"] == "factor"]
    sweeps = [r for r in rows if r["part"] == "sweep"]
    lines = [SECTION, "",
             f"Command: `{measured.command('toy_remedies.py')}` ({args.jobs} jobs, one thread each); machine: "
             f"{measured.machine}; total {measured.seconds / 60:.1f} min. Seeds {', '.join(map(str, args.seeds))} (sweep: "
             f"{args.sweep_seed}), {args.epochs} L3D epochs, metrics on 2,000 held-out samples.", "",
             "One change at a time (everything else as `paper_config`):", "",
             "| toy | seed | reference | aux_coef | aux_epochs | reconstruction error | dead subnetworks | key metric | value |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in factors:
        key, label = KEY[r["toy"]]
        n = {"tms": 5, "tmcs": 10, "higher_rank": 10}[r["toy"]]
        value = r[key] if not isinstance(r[key], float) else f"{r[key]:.3f}"
        if r["toy"] == "higher_rank":
            value = (f"{r['n_live']} live, per group {r['live_per_group']}; 5 most active live and one per group: "
                     f"{'yes' if r['most_active_one_per_group'] else 'no'} (largest P_act of the rest "
                     f"{r['others_max_p_act']:.3f})")
        lines.append(f"| {r['toy']} | {r['seed']} | {r['reference']} | {r['aux_coef']:g} | {(r['aux_epochs'] or 'all') if r['aux_coef'] else '–'} | "
                     f"{100 * r['error']:.1f}% | "
                     f"{round(n * r['dead_fraction'])} of {n} | {label} | {value} |")
    lines += ["", "Sweep on TMCS (`recommended_config`: zero reference, AuxK 0.03), `l3d_lens.toy.sweep.sweep`:", "",
              "| top_k | rank | reconstruction error | dead fraction | r² of A | r² of the model's own matrix | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(sweeps, key=lambda r: (r["top_k"], r["rank"])):
        lines.append(f"| {r['top_k']:g} | {r['rank']} | {100 * r['error']:.1f}% | {r['dead_fraction']:.2f} | "
                     f"{r['r2_decoder']:.3f} | {r['r2_decoder_vs_model']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run(args) -> list[dict[str, Any]]:
    """Every factor-grid row, then every sweep row, each tagged with its ``part``."""
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        f_jobs = [pool.submit(factor_run, name, seed, args.epochs) for name in KEY for seed in args.seeds]
        s_jobs = [pool.submit(sweep_run, args.sweep_seed, args.epochs, k) for k in (0.05, 0.1, 0.2)]
        return ([{**r, "part": "factor"} for f in f_jobs for r in f.result()]
                + [{**r, "part": "sweep"} for f in s_jobs for r in f.result()])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the factor grid")
    ap.add_argument("--sweep-seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    add_output_arguments(ap, ROOT / "BENCHMARKS.md")
    section_main(ap, SECTION, section, run, argv)


if __name__ == "__main__":
    main()
