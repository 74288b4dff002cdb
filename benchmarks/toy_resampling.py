"""Resampling dead subnetworks (``L3DConfig.resample_epochs`` / ``resample_max``) on the toy
models, against no remedy and against AuxK; writes the "## Toy models: resampling" section of
BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_resampling.py          # 2 jobs, one thread each, 300 L3D epochs

Higher-rank model, seeds 0-9, zero reference, no AuxK (``recommended_config``), with and without
one resampling of at most one dead subnetwork at epoch 25. That setting was chosen by hand on
seeds 0-4 (earlier ad-hoc runs), so seeds 5-9 are the held-out test of it. TMCS, seeds 0-2,
zero reference: no remedy, AuxK (aux_coef 0.03) and resampling every dead subnetwork at epoch
25.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Measured, add_output_arguments, pool_map, section_main  # noqa: E402
from l3d_lens import decompose  # noqa: E402
from l3d_lens.toy import make_toy  # noqa: E402
from l3d_lens.toy.reproduce import evaluate, recommended_config, scaled_lr_step  # noqa: E402

SECTION = "## Toy models: resampling"
SELECTION_SEEDS = (0, 1, 2, 3, 4)
HELD_OUT_SEEDS = (5, 6, 7, 8, 9)


def settings(name: str, epochs: int) -> dict[str, dict[str, Any]]:
    """Setting name -> overrides of ``recommended_config``: the resampling epoch is the one
    ``recommended_config`` uses for the higher-rank model (1/12 of training, 25 of 300)."""
    (at,) = recommended_config("higher_rank", epochs=epochs).resample_epochs
    if name == "higher_rank":
        return {"none": dict(resample_epochs=()), f"resample 1 at epoch {at}": dict(resample_epochs=(at,),
                                                                                  resample_max=1)}
    return {"none": dict(aux_coef=0.0), "AuxK 0.03": dict(aux_coef=0.03),
            f"resample all at epoch {at}": dict(aux_coef=0.0, resample_epochs=(at,), resample_max=None)}


def run(name: str, seed: int, epochs: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    toy = make_toy(name, seed)
    rows = []
    for setting, overrides in settings(name, epochs).items():
        cfg = recommended_config(name, seed=seed, epochs=epochs, lr_step=scaled_lr_step(epochs), **overrides)
        t = time.perf_counter()
        dec = decompose(toy.model, toy.l3d_data, cfg, progress=False)
        r = evaluate(toy, dec, seed=seed)
        r.update(toy=name, seed=seed, setting=setting, seconds=time.perf_counter() - t,
                 n_resampled=sum(h.get("n_resampled", 0) for h in dec.history))
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, list) or k == "live_per_group"},
                         default=str), flush=True)
    return rows


def _higher_rank_table(rows) -> list[str]:
    lines = ["| seed | seeds' role | remedy | live per group | live (of 10) | one live per group, rest dead | "
             "largest P_act of the rest | resampled | reconstruction error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["setting"] != "none")):
        role = "selection" if r["seed"] in SELECTION_SEEDS else "held out"
        ok = r["one_per_group"] and r["n_live"] == 5
        lines.append(f"| {r['seed']} | {role} | {r['setting']} | {r['live_per_group']} | {r['n_live']} | "
                     f"{'yes' if ok else 'no'} | {r['others_max_p_act']:.3f} | {r['n_resampled']} | "
                     f"{100 * r['error']:.1f}% |")
    lines.append("")
    for setting in dict.fromkeys(r["setting"] for r in sorted(rows, key=lambda r: r["setting"] != "none")):
        for role, seeds in (("selection seeds 0-4", SELECTION_SEEDS), ("held-out seeds 5-9", HELD_OUT_SEEDS)):
            sel = [r for r in rows if r["setting"] == setting and r["seed"] in seeds]
            met = sum(r["one_per_group"] and r["n_live"] == 5 for r in sel)
            lines.append(f"- {setting}, {role}: exactly one live subnetwork per group, rest dead, in {met} of "
                         f"{len(sel)}.")
    return lines


def _tmcs_table(rows) -> list[str]:
    lines = ["| seed | remedy | reconstruction error | dead (of 10) | resampled | r² of A | r² of the model's own "
             "matrix |", "|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["setting"] for r in rows))
    for r in sorted(rows, key=lambda r: (r["seed"], order.index(r["setting"]))):
        lines.append(f"| {r['seed']} | {r['setting']} | {100 * r['error']:.1f}% | {round(10 * r['dead_fraction'])} | "
                     f"{r['n_resampled']} | {r['r2_decoder']:.3f} | {r['r2_decoder_vs_model']:.3f} |")
    lines.append("")
    for setting in order:
        sel = sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["seed"])
        errors = ", ".join(f"{100 * r['error']:.1f}% (seed {r['seed']})" for r in sel)
        lines.append(f"- {setting}: error {errors}; seeds ending with a dead subnetwork: "
                     f"{sum(r['dead_fraction'] > 0 for r in sel)} of {len(sel)}.")
    return lines


def section(rows, args, measured: Measured) -> str:
    hr = [r for r in rows if r["toy"] == "higher_rank"]
    tm = [r for r in rows if r["toy"] == "tmcs"]
    lines = [SECTION, "",
             f"Command: `{measured.command('toy_resampling.py')}` ({args.jobs} jobs, thread count 1 each: "
             f"`torch.set_num_threads(1)`); machine: {measured.machine}; total {measured.seconds / 60:.1f} min. "
             f"{args.epochs} L3D epochs, everything else `recommended_config` (zero reference); metrics on 2,000 "
             f"held-out samples (l3d_lens.toy.reproduce.evaluate).", "",
             "Higher-rank model (no AuxK, as `recommended_config`), with and without one resampling of at most "
             "one dead subnetwork at the start of epoch 25 of 300 (`resample_epochs=(25,), resample_max=1`, "
             "now part of `recommended_config`). That setting was picked by hand on seeds 0-4; seeds 5-9 were "
             "not looked at before this run.", ""]
    lines += _higher_rank_table(hr)
    lines += ["", "TMCS: no remedy, AuxK (`recommended_config`), and resampling every dead subnetwork at epoch 25 "
              "(`resample_epochs=(25,)`):", ""]
    lines += _tmcs_table(tm)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    add_output_arguments(ap, ROOT / "BENCHMARKS.md")

    def run_all(args) -> list[dict[str, Any]]:
        jobs = [("higher_rank", s) for s in (*SELECTION_SEEDS, *HELD_OUT_SEEDS)] + [("tmcs", s) for s in (0, 1, 2)]
        return [r for rows in pool_map(run, [(name, seed, args.epochs) for name, seed in jobs], args.jobs) for r in rows]

    section_main(ap, SECTION, section, run_all, argv)


if __name__ == "__main__":
    main()
