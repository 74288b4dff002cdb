"""How long ``evaluate`` takes on the x² toy, with ``metrics.selectivity`` sweeping every delta
of both signs (as before commit c88bf7d) and walking the grid up in chunks of
``metrics.SWEEP_CHUNK`` until the first chunk with a hit (the default); writes the
"## Toy models: evaluate time" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_evaluate_time.py --seeds 0 1 2 --json benchmarks/results/toy_evaluate_time.json
        # 2 jobs x 1 thread (about 12 min on AVX2)
    python benchmarks/toy_evaluate_time.py --from-json benchmarks/results/toy_evaluate_time.json

Per seed: ``make_toy("square", seed)``, one L3D run (``recommended_config``, 300 epochs, L3D
seed = model seed), then ``evaluate`` ``ROUNDS`` times per sweep, alternating, timed as CPU time
of the process (one thread). A full sweep is ``SWEEP_CHUNK`` larger than the grid: the chunk
loop then runs once over all deltas, the former code path. Every ``evaluate`` result is compared
with the first, as JSON text: the early stop must change no number.
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
from l3d_lens import decompose  # noqa: E402
from l3d_lens.toy import make_toy, metrics  # noqa: E402
from l3d_lens.toy.reproduce import evaluate, recommended_config, scaled_lr_step  # noqa: E402

SECTION = "## Toy models: evaluate time"
EPOCHS = 300
ROUNDS = 2
#: ``SWEEP_CHUNK`` per sweep: the whole grid in one chunk (no early stop) or the default
SWEEPS = {"full": 10 ** 9, "early": metrics.SWEEP_CHUNK}


def run_one(seed: int, threads: int) -> dict[str, Any]:
    """Train and decompose the x² toy from ``seed``, then time ``evaluate`` with each sweep."""
    torch.set_num_threads(threads)
    toy = make_toy("square", seed)
    cfg = recommended_config("square", seed=seed, epochs=EPOCHS, lr_step=scaled_lr_step(EPOCHS))
    dec = decompose(toy.model, toy.l3d_data, cfg, progress=False)
    cpu: dict[str, list[float]] = {name: [] for name in SWEEPS}
    results = []
    try:
        for _ in range(ROUNDS):
            for name, chunk in SWEEPS.items():
                metrics.SWEEP_CHUNK = chunk
                start = time.process_time()
                results.append(json.dumps(evaluate(toy, dec, seed=seed), sort_keys=True))
                cpu[name].append(time.process_time() - start)
    finally:
        metrics.SWEEP_CHUNK = SWEEPS["early"]
    deltas = json.loads(results[0])["circuit_selectivity_delta"]
    row = {"seed": seed, "cpu": cpu, "same": all(r == results[0] for r in results),
           "max_abs_delta": max(abs(d) for d in deltas if d == d)}
    print(json.dumps(row), flush=True)
    return row


def run(seeds, jobs: int, threads: int) -> list[dict[str, Any]]:
    return pool_map(run_one, [(seed, threads) for seed in seeds], jobs)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | full sweep: CPU seconds per evaluate | early stop | full / early | same result |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["seed"]):
        full, early = statistics.median(r["cpu"]["full"]), statistics.median(r["cpu"]["early"])
        lines.append(f"| {r['seed']} | {full:.1f} | {early:.1f} | {full / early:.2f} | "
                     f"{'yes' if r['same'] else '**no**'} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    ratios = [statistics.median(r["cpu"]["full"]) / statistics.median(r["cpu"]["early"]) for r in rows]
    return (f"- full / early: {min(ratios):.2f}-{max(ratios):.2f} (median of each seed's {ROUNDS} rounds); the same "
            f"evaluate result, as JSON text, in {sum(r['same'] for r in rows)}/{len(rows)} seeds.\n"
            f"- The largest |delta| at which a circuit's subnetwork reached its half change: "
            f"{max(r['max_abs_delta'] for r in rows):.3g} (the grid runs from 1e-3 to 100; the sweep stops after the "
            f"{SWEEPS['early']} deltas of the chunk with the first hit).")


def section(rows, args, measured: Measured) -> str:
    return jobs_section(
        SECTION, "toy_evaluate_time.py", args, measured,
        f"x² toy models from `make_toy(\"square\", seed)`, one L3D run each (`recommended_config`, {EPOCHS} epochs, "
        f"L3D seed = model seed); `evaluate` {ROUNDS} times per sweep, alternating, timed as CPU time of the process. "
        "\"Full sweep\": `metrics.selectivity` computes every delta of both signs (251 each) for each of its 30 "
        "targets (5 features and 10 (feature, sign) circuits, for the subnetworks and for the model's own gradient "
        f"directions); \"early stop\": it walks the grid up in chunks of {SWEEPS['early']} deltas for both signs and "
        "stops after the chunk with the first hit (`metrics.SWEEP_CHUNK`, the default).",
        table(rows), summary(rows))


def main(argv=None) -> None:
    seeds_jobs_main(__doc__, SECTION, section, lambda args: run(args.seeds, args.jobs, args.threads), argv)


if __name__ == "__main__":
    main()
