"""What oneDNN costs the x² toy model's training: PyTorch's CPU GeLU (forward and backward) runs
through oneDNN when it is enabled (the default), which on a [32, 5] batch costs a fixed overhead
several times the native kernel's. Measures the two ops, one training step of ``train.fit`` on the
x² MLP and of the superposition models, and ``make_toy("square", seed)`` end to end, each with
oneDNN on (the default, the runs of record) and off (``torch.backends.mkldnn.flags(enabled=False)``);
writes the "## Toy models: x² training and oneDNN" section of BENCHMARKS.md (other sections are
kept).

    python benchmarks/toy_onednn.py --json benchmarks/results/toy_onednn.json
        # seeds 0-9, 2 jobs x 1 thread (about 10 min on a 2-core AVX2 machine)

Why: x² seed 3 trains in 78-93 s on an AVX2 machine ("Toy models: training time" and runs of this
script), over the minute each toy model should take (``LIMIT``). Turning oneDNN off is not free:
the two GeLU kernels round differently in the last bit, so every x² model (and every x² run of
record) would change.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Measured, jobs_section, pool_map, seeds_jobs_main  # noqa: E402
from benchmarks.toy_train_time import recorded  # noqa: E402
from l3d_lens.toy import make_toy, metrics, models, train  # noqa: E402

SECTION = "## Toy models: x² training and oneDNN"
#: seconds: each toy model should train in under a minute (issue 4)
LIMIT = 60.0
#: the toy models' training batch (``train.fit``'s default), also the batch of the op timings
BATCH = 32


@contextlib.contextmanager
def onednn(enabled: bool):
    """oneDNN on or off for a block (``torch.backends.mkldnn.flags``), without its TF32 warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=enabled):
            yield


def _op_times(rounds: int = 7, calls: int = 2000) -> list[dict[str, Any]]:
    """GeLU forward and backward on a [32, 5] batch, oneDNN on and off interleaved: CPU µs per
    call (median over rounds), and the largest difference of the two on a million inputs."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 5, generator=gen)
    ops = {"gelu": lambda a, b: torch.nn.functional.gelu(a),
           "gelu_backward": lambda a, b: torch.ops.aten.gelu_backward(b, a)}
    big = torch.linspace(-4, 4, 1_000_001, dtype=torch.float32)
    rows = []
    for name, op in ops.items():
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for enabled in (True, False):
                with onednn(enabled):
                    op(x, g)
                    t = time.process_time()
                    for _ in range(calls):
                        op(x, g)
                    times[enabled].append((time.process_time() - t) / calls * 1e6)
        outs = {}
        for enabled in (True, False):
            with onednn(enabled):
                outs[enabled] = op(big, big.flip(0))
        diff = (outs[True] - outs[False]).abs()
        rows.append({"kind": "op", "op": name, "us_on": statistics.median(times[True]),
                     "us_off": statistics.median(times[False]), "max_abs_diff": diff.max().item(),
                     "differ": int((diff > 0).sum())})
    return rows


def _step_times(epochs: int = 5) -> list[dict[str, Any]]:
    """``train.fit``'s loop on each toy's model and training data, one epoch with oneDNN on and one
    off in turn (two models from the same seed): CPU µs per step (median over epochs), and
    whether the two models are still equal bit for bit after ``epochs``."""
    rows = []
    for name, build in (("square", models.square_mlp), ("tmcs", models.tmcs)):
        x, y = train.training_data(name, 0)
        lr = train.LR[name]
        pair = {enabled: build(0) for enabled in (True, False)}
        times: dict[bool, list[float]] = {True: [], False: []}
        for epoch in range(epochs):
            for enabled, model in pair.items():
                with onednn(enabled):
                    t = time.process_time()
                    train.fit(model, x, y, epochs=1, batch_size=BATCH, lr=lr, seed=epoch)
                    times[enabled].append((time.process_time() - t) / math.ceil(x.shape[0] / BATCH) * 1e6)
        same = all(torch.equal(a, b) for a, b in zip(pair[True].parameters(), pair[False].parameters()))
        ratios = [a / b for a, b in zip(times[True], times[False])]
        rows.append({"kind": "step", "toy": name, "us_on": statistics.median(times[True]),
                     "us_off": statistics.median(times[False]), "ratio": statistics.median(ratios),
                     "same_model": same, "epochs": epochs})
    return rows


def _seconds(t: float) -> str:
    """Whole seconds, or tenths where rounding would reach ``LIMIT`` from below."""
    return f"{t:.1f}" if t < LIMIT <= round(t) else f"{t:.0f}"


def run_one(seed: int, enabled: bool, threads: int) -> dict[str, Any]:
    """``make_toy("square", seed)`` with oneDNN on or off: wall seconds, blocks of starts, final
    training loss, and the worst feature's r² on held-out data."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with onednn(enabled):
        toy = make_toy("square", seed)
        seconds = time.perf_counter() - t0
        y = toy.eval_data ** 2
        worst = min(metrics.feature_r2(toy.model, toy.eval_data, y))
    row = {"kind": "make_toy", "seed": seed, "onednn": enabled, "seconds": seconds, "blocks": toy.blocks,
           "train_loss_model": toy.final_loss, "worst_r2_heldout": worst,
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(json.dumps(row), flush=True)
    return row


def run(seeds, jobs: int, threads: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rows = _op_times() + _step_times()
    return rows + pool_map(run_one, [(seed, enabled, threads) for seed in seeds for enabled in (True, False)], jobs)


def section(rows: list[dict[str, Any]], args, measured: Measured) -> str:
    ops = [r for r in rows if r["kind"] == "op"]
    steps = [r for r in rows if r["kind"] == "step"]
    made = {(r["seed"], r["onednn"]): r for r in rows if r["kind"] == "make_toy"}
    capability = {r["cpu_capability"] for r in made.values()}
    if len(capability) != 1:
        raise ValueError(f"rows from CPUs of several capabilities: {sorted(capability)}")
    record = recorded(capability.pop())
    op_lines = ["| op on a [32, 5] batch | oneDNN on: µs per call | off | on / off | largest difference on 10⁶ "
                "inputs in [-4, 4] (values that differ) |", "|---|---|---|---|---|"]
    op_lines += [f"| `{r['op']}` | {r['us_on']:.1f} | {r['us_off']:.1f} | {r['us_on'] / r['us_off']:.1f} | "
                 f"{r['max_abs_diff']:.2g} ({r['differ']:,}) |" for r in ops]
    step_lines = ["| model | oneDNN on: µs per step | off | on / off (median of per-epoch ratios) | same model "
                  "after the epochs |", "|---|---|---|---|---|"]
    step_lines += [f"| {r['toy']} | {r['us_on']:.0f} | {r['us_off']:.0f} | {r['ratio']:.2f} | "
                   f"{'yes' if r['same_model'] else 'no'} ({r['epochs']} epochs) |" for r in steps]
    seeds = sorted({s for s, _ in made})
    toy_lines = ["| seed | oneDNN on (default): seconds | same model as recorded | off: seconds | "
                 "final training loss, on / off | worst feature r² held out, on / off |", "|---|---|---|---|---|---|"]

    def secs(r):
        text = _seconds(r["seconds"]) + (f", {r['blocks']} blocks" if r["blocks"] > 1 else "")
        return f"**{text}**" if r["seconds"] >= LIMIT else text

    for s in seeds:
        on, off = made[(s, True)], made[(s, False)]
        losses = record.get(("square", s))
        same = "–" if not losses else "yes" if losses == {on["train_loss_model"]} else "NO"
        toy_lines.append(f"| {s} | {secs(on)} | {same} | {secs(off)} | "
                         f"{on['train_loss_model']:.5f} / {off['train_loss_model']:.5f} | "
                         f"{on['worst_r2_heldout']:.3f} / {off['worst_r2_heldout']:.3f} |")
    summary = []
    for enabled, label in ((True, "on (default)"), (False, "off")):
        sel = [made[(s, enabled)] for s in seeds]
        t = [r["seconds"] for r in sel]
        summary.append(f"- oneDNN {label}: {_seconds(min(t))}-{_seconds(max(t))} s "
                       f"(median {_seconds(statistics.median(t))} s), "
                       f"over a minute: {sum(x >= LIMIT for x in t)}/{len(t)}; more than one block of starts: "
                       f"{sum(r['blocks'] > 1 for r in sel)}/{len(sel)}; worst feature r² held out "
                       f"{min(r['worst_r2_heldout'] for r in sel):.3f}-{max(r['worst_r2_heldout'] for r in sel):.3f}.")
    pairs = [(made[(s, True)], made[(s, False)]) for s in seeds]
    same_off = sum(off["train_loss_model"] == on["train_loss_model"] for on, off in pairs)
    loss_gap = max(abs(off["train_loss_model"] / on["train_loss_model"] - 1) for on, off in pairs)
    r2_gap = max(abs(off["worst_r2_heldout"] - on["worst_r2_heldout"]) for on, off in pairs)
    summary.append(f"- Same model with oneDNN off as on: {same_off}/{len(seeds)} seeds, bit for bit; the final "
                   f"training losses differ by at most {100 * loss_gap:.2g}% and the worst feature's held-out r² by "
                   f"at most {r2_gap:.2g}.")
    if same_off < len(seeds):
        slowest = max(off["seconds"] for _, off in pairs)
        summary.append(f"- oneDNN stays on in `make_toy`: off, x² models change (in {len(seeds) - same_off} of these "
                       f"{len(seeds)} seeds; the two GeLU kernels differ in the last bit, which training grows to the "
                       "differences above, as it does across CPUs), and with them the x² runs of record; the slowest "
                       f"model off took {_seconds(slowest)} s.")
    return jobs_section(
        SECTION, "toy_onednn.py", args, measured,
        "PyTorch runs GeLU and its backward through oneDNN on CPU when `torch.backends.mkldnn` is enabled (the "
        "default); the x² MLP has four GeLU layers, the superposition models none. Op and step times: CPU time of "
        f"the main process, `torch.set_num_threads({args.threads})`, oneDNN on and off interleaved, before the "
        "`make_toy` runs; `make_toy` rows: "
        "wall seconds with the jobs in parallel, as in \"Toy models: training time\". \"Same model as recorded\": "
        "the final training loss equals, bit for bit, the x² run of record made on a CPU of this capability.",
        "\n".join(op_lines), "\n".join(step_lines), "\n".join(toy_lines), "\n".join(summary))


def main(argv=None) -> None:
    seeds_jobs_main(__doc__, SECTION, section, lambda args: run(args.seeds, args.jobs, args.threads), argv)


if __name__ == "__main__":
    main()
