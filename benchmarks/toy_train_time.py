"""How long ``make_toy`` takes to train each of the four toy models (the issue asks for under a
minute each on this machine), per seed; writes the "## Toy models: training time" section of
BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_train_time.py --seeds $(seq 0 119) --json benchmarks/results/toy_train_time.json
        # 2 jobs x 1 thread: 13 min on an AVX512 host. On a slower one, seeds 0-9 and the x² seeds
        # of 0-119 that need a second block of starts (34 86 89 93 101 107; "Toy models: x²
        # give-up check") take 11 min on an AVX2 host

Each model's final training loss is compared with the one recorded for the same toy and seed by
the runs of record made on a CPU of the same capability (``RECORDS``): equal means the model is
the one those sections decomposed or trained, bit for bit, so a change that only saves time
(``train.GIVE_UP``) is shown to change nothing else. Times are wall seconds with two jobs on two
cores, as in the other toy sections.
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

from benchmarks.common import (DEFAULT_SEEDS, RESULTS, Measured, jobs_header, jobs_section, measured_of,  # noqa: E402
                               pool_map, saved_run, seeds_jobs_main, span)
from l3d_lens.toy import make_toy  # noqa: E402
from l3d_lens.toy.train import DEFAULT_EPOCHS, TOY_NAMES  # noqa: E402

SECTION = "## Toy models: training time"
LIMIT = 60.0
#: the runs of record, by the CPU capability of the machine that made them (its "machine" line in
#: BENCHMARKS.md): x² training rounds differently with AVX2 and AVX512 kernels
RECORDS = {"AVX512": ("toy_heldout.json", "toy_square_recipe.json"),
           "AVX2": ("toy_switch_epoch.json", "toy_give_up.json", "toy_remedies.json", "toy_resampling.json")}
#: earlier saved runs (``benchmarks/results``) summarised under the latest one, with what they
#: measured: the hosts of this machine differ from session to session (AVX2 or AVX512 CPUs of
#: different speeds), and the training step has changed since some of them
EARLIER = {
    "toy_train_time_e5ed19a_avx2.json": "commit e5ed19a (`toy.chain_step` before its per-step lookups were hoisted "
                                        "and its AdamW call made direct), on an AVX2 host",
    "toy_train_time_e5ed19a_avx512.json": "commit e5ed19a (the same older step), on an AVX512 host: the latest "
                                          "run's host, run just before it",
}


def run_one(name: str, seed: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    toy = make_toy(name, seed)
    row = {"toy": name, "seed": seed, "seconds": time.perf_counter() - t0, "blocks": toy.blocks,
           "epochs": len(toy.train_losses), "final_loss": toy.final_loss,
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(json.dumps(row), flush=True)
    return row


def run(seeds, jobs: int, threads: int) -> list[dict[str, Any]]:
    tasks = [(name, seed, threads) for name in ("square", "tms", "tmcs", "higher_rank") for seed in seeds]
    return pool_map(run_one, tasks, jobs)


def recorded(capability: str) -> dict[tuple[str, int], set[float]]:
    """(toy, seed) -> the final training losses the runs of record made on a CPU of
    ``capability`` saved for that model."""
    out: dict[tuple[str, int], set[float]] = {}
    for name in RECORDS.get(capability, ()):
        for r in saved_run(name)["rows"]:
            if r.get("train_loss_model") is not None:  # None: a toy_give_up seed without a model
                out.setdefault((r["toy"], r["seed"]), set()).add(r["train_loss_model"])
            elif r.get("recipe") == "ours" and "train_loss" in r:  # toy_square_recipe
                out.setdefault(("square", r["seed"]), set()).add(r["train_loss"])
    return out


def _match(row: dict[str, Any], saved: dict[tuple[str, int], set[float]]) -> str:
    losses = saved.get((row["toy"], row["seed"]))
    if not losses:
        return "–"
    return "yes" if losses == {row["final_loss"]} else "NO"


def table(rows: list[dict[str, Any]], saved) -> str:
    by = {(r["toy"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| seed | " + " | ".join(f"{name}: seconds (same model as recorded)" for name in TOY_NAMES) + " |",
             "|---|" + "---|" * len(TOY_NAMES)]
    for s in seeds:
        cells = []
        for name in TOY_NAMES:
            r = by[(name, s)]
            text = _secs(r["seconds"]) + (f", {r['blocks']} blocks" if r["blocks"] > 1 else "")
            text = f"**{text}**" if r["seconds"] >= LIMIT else text
            cells.append(f"{text} ({_match(r, saved)})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _secs(seconds: float) -> str:
    """Seconds as the table shows them: one decimal under 10 s, whole seconds above."""
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def summary(rows: list[dict[str, Any]], saved) -> str:
    out = []
    for name in TOY_NAMES:
        sel = [r for r in rows if r["toy"] == name]
        secs = [r["seconds"] for r in sel]
        over = [f"seed {r['seed']} ({_secs(r['seconds'])} s)" for r in sel if r["seconds"] >= LIMIT]
        matches = [_match(r, saved) for r in sel]
        line = (f"- {name}: {_secs(min(secs))}-{_secs(max(secs))} s (median {_secs(statistics.median(secs))} s); "
                f"over a minute: {', '.join(over) if over else 'none'}")
        if name == "square":
            line += f"; more than one block of starts: {sum(r['blocks'] > 1 for r in sel)}/{len(sel)} seeds"
        recorded_seeds = len(sel) - matches.count("–")
        line += (f"; same model as recorded in {matches.count('yes')}/{recorded_seeds} seeds" if recorded_seeds
                 else "; no record from a CPU of this capability to compare with")
        out.append(line + ".")
    return "\n".join(out)


def section(rows, args, measured: Measured) -> str:
    capability = {r["cpu_capability"] for r in rows}
    if len(capability) != 1:
        raise ValueError(f"rows from CPUs of several capabilities: {sorted(capability)}")
    saved = recorded(capability.pop())
    runs = earlier_runs()
    seeds = sorted({r["seed"] for r in rows})
    extra = sorted(set(seeds) - set(DEFAULT_SEEDS))
    note = ""
    if extra and seeds != list(range(len(seeds))):  # picked seeds, not a run over every seed from 0
        give_up = saved_run("toy_give_up.json")["rows"]
        second = [r["seed"] for r in give_up if r["blocks"] != 1]
        picked = [s for s in extra if s in second]
        note = (f" Seeds beyond {span(DEFAULT_SEEDS)} ({', '.join(map(str, extra))}): {len(picked)} picked because their x² model needs "
                f"a second block of starts (\"Toy models: x² give-up check\": {len(second)} of its {len(give_up)} seeds "
                "do), so the counts below are not rates.")
    return jobs_section(
        SECTION, "toy_train_time.py", args, measured,
        f"`make_toy(name, seed)` with its defaults ({', '.join(f'{n} {e}' for n, e in DEFAULT_EPOCHS.items())} "
        "epochs; TMS and x² keep the best of a few starts, x² trains a fresh block of starts when its kept model "
        "never learned a feature and gives a kept start up early when it is far from it, `train.GIVE_UP`; every "
        "step but TMS's tied training model's by `toy.chain_step`, autograd's numbers without its overhead), timed "
        "from the call to the trained model (data, training, and the learned checks). \"Same model as recorded\": "
        "its final training loss equals, bit for bit, the one saved by the runs of record made on a CPU of this "
        "capability (AVX512: `toy_heldout.py` for TMCS and x², `toy_square_recipe.py` for x²; AVX2: "
        "`toy_switch_epoch.py` for TMCS, `toy_give_up.py` for x², `toy_remedies.py` for seeds 0-2, "
        "`toy_resampling.py` for the higher-rank model and TMCS; – where none trained that model). Bold: a minute "
        "or more." + note,
        table(rows, saved), summary(rows, saved) + same_as_earlier(rows, runs), *earlier(runs))


def earlier_runs() -> list[tuple[str, str, dict[str, Any]]]:
    """(file, what it measured, saved run) of each run of ``EARLIER`` that is saved."""
    return [(name, what, saved_run(name)) for name, what in EARLIER.items() if (RESULTS / name).is_file()]


def same_as_earlier(rows: list[dict[str, Any]], runs) -> str:
    """A line per earlier run (``earlier_runs``) on a CPU of the same capability: how many of these
    models end at its final training loss, bit for bit (a faster step must change none)."""
    lines = []
    for name, _, run in runs:
        theirs = {(r["toy"], r["seed"]): r for r in run["rows"]}
        pairs = [(r, theirs[(r["toy"], r["seed"])]) for r in rows if (r["toy"], r["seed"]) in theirs
                 and theirs[(r["toy"], r["seed"])]["cpu_capability"] == r["cpu_capability"]]
        if pairs:
            same = sum(a["final_loss"] == b["final_loss"] for a, b in pairs)
            lines.append(f"\n- Same final training loss, bit for bit, as the earlier run `{name}` (below): "
                         f"{same}/{len(pairs)} models.")
    return "".join(lines)


def earlier(runs) -> list[str]:
    """A block per earlier run (``earlier_runs``): what it measured, its command line as a
    section's, and its summary lines."""
    blocks = []
    for _, what, run in runs:
        capability = {r["cpu_capability"] for r in run["rows"]}
        saved = recorded(capability.pop()) if len(capability) == 1 else {}
        header = jobs_header("toy_train_time.py", argparse.Namespace(**run["args"]), measured_of(run))
        blocks.append(f"Earlier run, {what}. {header}\n\n" + summary(run["rows"], saved))
    return blocks


def main(argv=None) -> None:
    seeds_jobs_main(__doc__, SECTION, section, lambda args: run(args.seeds, args.jobs, args.threads), argv)


if __name__ == "__main__":
    main()
