"""Does ``train.GIVE_UP`` drop an x² start that would have learned every feature? For each seed,
``make_toy("square", seed)``'s training with the give-up check recording instead of acting:
every kept start trains to the end, and its worst feature r² on its training data is recorded
after every epoch after its probe and at the end, where ``LEARNED_R2`` decides; any rule
(epoch, threshold) can then be judged on the same runs. Writes the "## Toy models: x² give-up
check" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/toy_give_up.py --seeds $(seq 0 119) --json benchmarks/results/toy_give_up.json
        # 2 jobs x 1 thread (about 50 min on a 2-core AVX2 machine)

Why: the first rule, a check after 20 epochs (``FIRST_RULE``), was chosen on seeds 0-19, where a
single start never learned a feature. Seeds 20-59 held it out, and one of them (seed 37) learns
only after 41 epochs, so ``GIVE_UP`` now checks after 50, chosen on seeds 0-59 (``CHOSEN_ON``);
seeds 60 and up hold that choice out. A start a rule
drops but that passes ``LEARNED_R2`` at the end is a wrong give-up (make_toy then trains the next
block and returns a different model); a start that fails at the end but passes the check only
costs time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Measured, jobs_section, pool_map, seeds_jobs_main, span  # noqa: E402
from l3d_lens.toy import metrics, models, train  # noqa: E402

SECTION = "## Toy models: x² give-up check"
TUNED_ON = range(20)
#: the seeds ``train.GIVE_UP`` was chosen on (an earlier run of this benchmark on seeds 0-59)
CHOSEN_ON = range(60)
CHECK_EPOCHS = (10, 20, 30, 40, 50, 60, 70)
#: the rule chosen on seeds 0-19 before this benchmark; ``train.GIVE_UP`` was chosen on its result
FIRST_RULE = (20, 0.0)
#: the x² models of record (seeds 0-9, "Toy models: x² training recipe", our recipe)
RECORD = ROOT / "benchmarks" / "results" / "toy_square_recipe.json"


def run_one(seed: int, threads: int) -> dict[str, Any]:
    """Train the x² toy of ``seed`` as ``make_toy`` does, the give-up check only recording; one
    entry per kept start: its worst feature r² after each epoch after its probe (the last at
    the end, where ``LEARNED_R2`` decides)."""
    torch.set_num_threads(threads)
    x, y = train.training_data("square", seed)
    starts: list[list[float]] = [[]]

    def record(m: torch.nn.Module) -> bool:
        starts[-1].append(min(metrics.feature_r2(m, x, y)))
        return True

    def learned(m: torch.nn.Module) -> bool:
        record(m)
        starts.append([])
        return starts[-2][-1] >= train.LEARNED_R2

    epochs, (restarts, probe) = train.DEFAULT_EPOCHS["square"], train.RESTARTS["square"]
    t0 = time.perf_counter()
    try:
        fitted = train.fit_best_of(models.square_mlp, x, y, epochs=epochs, seed=seed, restarts=restarts,
                                   probe_epochs=probe, lr=train.LR["square"], learned=learned,
                                   give_up=(range(1, epochs - probe), record))
        blocks, loss = fitted.blocks, fitted.losses[-1]
    except RuntimeError:  # no block learned every feature: make_toy raises for this seed too
        blocks, loss = None, None
    row = {"toy": "square", "seed": seed, "r2": starts[:-1], "blocks": blocks, "train_loss_model": loss,
           "seconds": time.perf_counter() - t0}
    print(json.dumps({**row, "r2": [[r[train.GIVE_UP[0] - 1], r[-1]] for r in row["r2"]]}), flush=True)
    return row


def run(seeds, jobs: int, threads: int) -> list[dict[str, Any]]:
    return pool_map(run_one, [(seed, threads) for seed in seeds], jobs)


class Start(NamedTuple):
    """A kept start: its seed, block, and worst feature r² after each epoch after its probe."""

    seed: int
    block: int
    r2: list[float]

    @property
    def learned(self) -> bool:
        return self.r2[-1] >= train.LEARNED_R2


def _starts(rows: list[dict[str, Any]]) -> list[Start]:
    return sorted(Start(r["seed"], b, traj) for r in rows for b, traj in enumerate(r["r2"]))


def _drops(start: Start, epoch: int, threshold: float) -> bool:
    """Whether a give-up check after ``epoch`` epochs (after the probe) drops ``start``."""
    return start.r2[epoch - 1] < threshold


def _verdict(start: Start, rule: tuple[int, float]) -> str:
    drop = _drops(start, *rule)
    return {(True, True): "**wrong give-up**", (True, False): "given up early (right)",
            (False, True): "kept, learned", (False, False): "kept, never learned (costs time only)"}[
        (drop, start.learned)]


def _count(starts: list[Start]) -> str:
    return f"{len(starts)} ({', '.join(f'{s.seed}/{s.block}' for s in starts)})" if starts else "0"


def _rules_table(starts: list[Start], threshold: float) -> str:
    """One line per check epoch: what a give-up rule (epoch, ``threshold``) would do to every start."""
    lines = ["| check after (epochs after the probe) | drops a start that learns (wrong) | drops one that never "
             "learns (right) | keeps one that never learns | epochs of never-learning starts saved |",
             "|---|---|---|---|---|"]
    n_after = len(starts[0].r2)
    for epoch in CHECK_EPOCHS:
        wrong = [s for s in starts if _drops(s, epoch, threshold) and s.learned]
        right = [s for s in starts if _drops(s, epoch, threshold) and not s.learned]
        kept = [s for s in starts if not _drops(s, epoch, threshold) and not s.learned]
        mark = " (`GIVE_UP`)" if (epoch, threshold) == train.GIVE_UP else ""
        lines.append(f"| {epoch}{mark} | {_count(wrong)} | {_count(right)} | {_count(kept)} | "
                     f"{len(right) * (n_after - epoch)} |")
    return "\n".join(lines)


def section(rows: list[dict[str, Any]], args, measured: Measured) -> str:
    starts = _starts(rows)
    epoch, threshold = train.GIVE_UP
    shown = [1, 5, 10, 20, 40, 60]
    lines = ["| seed/block | " + " | ".join(f"after {e}" for e in shown) + f" | at the end | {FIRST_RULE} would | "
             f"`GIVE_UP` {train.GIVE_UP} would |", "|---|" + "---|" * (len(shown) + 3)]
    for s in starts:
        if min(s.r2[FIRST_RULE[0] - 1:]) < 0.5 or not s.learned:
            lines.append(f"| {s.seed}/{s.block} | " + " | ".join(f"{s.r2[e - 1]:.3f}" for e in shown)
                         + f" | {s.r2[-1]:.3f} | {_verdict(s, FIRST_RULE)} | {_verdict(s, train.GIVE_UP)} |")
    out = []
    groups = ((f"seeds {span(TUNED_ON)} (the first rule, {FIRST_RULE}, was chosen on these, `GIVE_UP` on seeds "
               f"{span(CHOSEN_ON)})", lambda seed: seed in TUNED_ON),
              (f"seeds {span(range(TUNED_ON.stop, CHOSEN_ON.stop))} (held out for the first rule; `GIVE_UP` "
               f"{train.GIVE_UP} was chosen on seeds {span(CHOSEN_ON)})",
               lambda seed: seed in CHOSEN_ON and seed not in TUNED_ON),
              (f"seeds {CHOSEN_ON.stop} and up (held out for both rules)", lambda seed: seed not in CHOSEN_ON))
    for label, keep in groups:
        sel = [s for s in starts if keep(s.seed)]
        if not sel:
            continue
        learned = [s for s in sel if s.learned]
        failed = [s for s in sel if not s.learned]
        line = (f"- {label} ({len({s.seed for s in sel})} seeds, {len(sel)} kept starts): {len(learned)} learned every "
                f"feature")
        if learned:
            line += ", their worst r² at the lowest " + ", ".join(
                f"{min(s.r2[e - 1] for s in learned):.3f} after {e} epochs" for e in sorted({FIRST_RULE[0], epoch}))
        line += f"; never learned one: {_count(failed)}"
        out.append(line + ".")
    late = [s for s in starts if s.learned and min(s.r2[FIRST_RULE[0] - 1:-1]) < threshold]
    for s in late:
        last_below = max(i for i, v in enumerate(s.r2[:-1]) if v < threshold) + 1
        out.append(f"- {s.seed}/{s.block} learns late: its worst r² is below {threshold:g} for the last time after "
                   f"{last_below} epochs ({s.r2[last_below - 1]:.2f}) and {s.r2[last_below]:.2f} one epoch later; a "
                   f"start learning after epoch {epoch} would be given up (make_toy then trains the next block).")
    record = {r["seed"]: r["train_loss"] for r in json.loads(RECORD.read_text())["rows"] if r["recipe"] == "ours"}
    both = [r for r in rows if r["seed"] in record and r["train_loss_model"] is not None]
    if both:
        same = sum(r["train_loss_model"] == record[r["seed"]] for r in both)
        worst = max(abs(r["train_loss_model"] / record[r["seed"]] - 1) for r in both)
        out.append(f"- Against the models of record (\"Toy models: x² training recipe\", seeds 0-9): {same} of {len(both)} "
                   f"end at the same training loss bit for bit; the largest relative difference is {100 * worst:.2g}% "
                   "(the same code and seeds on another CPU, see the machine lines, round differently).")
    return jobs_section(
        SECTION, "toy_give_up.py", args, measured,
        f"x² toy models trained as `make_toy(\"square\", seed)` (default recipe) with a give-up check after every "
        f"epoch that only records, so every kept start trains its {train.DEFAULT_EPOCHS['square']} epochs "
        f"({train.RESTARTS['square'][1]} of them the probe); \"worst r²\": the smallest over features of the model's "
        f"own r² of x_i² on its training rows where feature i is active (`metrics.feature_r2`), after the given "
        f"number of epochs after the probe; at the end `LEARNED_R2` = {train.LEARNED_R2:g} decides. A rule (e, t) "
        f"drops a start whose worst r² is below t after e epochs: the first rule {FIRST_RULE} was chosen on seeds "
        f"{span(TUNED_ON)}, `train.GIVE_UP` = {train.GIVE_UP} on seeds {span(CHOSEN_ON)} (an earlier run of this "
        f"benchmark); seeds {CHOSEN_ON.stop} and up hold both out. Starts as seed/block; the first table lists those below 0.5 at some point from epoch {FIRST_RULE[0]} on, or never learned.",
        "\n".join(lines), f"Give-up rules (epoch, r² < {threshold:g}) on all {len(starts)} kept starts:",
        _rules_table(starts, threshold), "\n".join(out))


def main(argv=None) -> None:
    seeds_jobs_main(__doc__, SECTION, section, lambda args: run(args.seeds, args.jobs, args.threads), argv)


if __name__ == "__main__":
    main()
