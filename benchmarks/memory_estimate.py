"""How close ``l3d_lens.memory``'s estimate (made before training; ``decompose`` refuses a run
that it says cannot fit) comes to the measured peak of a training step; writes the
"## Memory estimate" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/memory_estimate.py        # about 10 min, one thread, TL 3.9 interpreter

Measured: the peak RSS of one step after a warm-up step, minus the RSS with the model and data
loaded, in a fresh subprocess (``common.measure_memory``, as the "Fast engine" section). The
estimate counts the same thing (the L3D state and one step's working memory, not the model's
weights). A ratio above 1 errs high (a run near the limit may be refused), below 1 low (a run
the estimate passes may still run out of memory).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (PAPER, build_model, environment, l3d_cfg, measure_memory, setup_threads,  # noqa: E402
                               write_section)
from l3d_lens import memory  # noqa: E402
from l3d_lens.decomposition import build_task  # noqa: E402

SECTION = "## Memory estimate"
MODEL = "tinystories-8m"
BLOCK0_ATTN = [f"blocks.0.attn.{w}" for w in ("W_Q", "W_K", "W_V", "W_O", "b_O")]
#: (batch, seq, sample, engine, selection label, components)
CASES = [
    (4, 16, "token", "fast", "block-4 attention", PAPER["components"]),
    (32, 16, "sequence", "fast", "block-4 attention", PAPER["components"]),
    (32, 16, "token", "fast", "block-4 attention", PAPER["components"]),
    (8, 64, "sequence", "fast", "block-4 attention", PAPER["components"]),
    (8, 64, "token", "fast", "block-4 attention", PAPER["components"]),
    (8, 64, "token", "fast", "block-0 attention", BLOCK0_ATTN),
    (32, 16, "token", "exact", "block-4 attention", PAPER["components"]),
]
#: every weight of every block (attention and MLP) of a smaller model: many captured sites at once
SMALL = dict(n_layers=6, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=64, d_vocab=100, act_fn="gelu")
SMALL_CASES = [
    (8, 64, "token", "fast", "every block weight (6 layers, d_model 128, vocab 100)", ["blocks.*"]),
    (8, 64, "sequence", "fast", "every block weight (6 layers, d_model 128, vocab 100)", ["blocks.*"]),
]


def main() -> None:
    threads = setup_threads(1)
    start = time.perf_counter()
    models = {"tinystories": build_model(MODEL), "small": build_model(MODEL, **SMALL)}
    rows = []
    for shape, (batch, seq, sample, engine, label, components) in (
            [("tinystories", c) for c in CASES] + [("small", c) for c in SMALL_CASES]):
        spec = {"model": MODEL, "batch": batch, "seq": seq, "kind": "l3d", "threads": threads,
                "cfg": {"sample": sample, "engine": engine, "components": components},
                **({"model_overrides": SMALL} if shape == "small" else {})}
        parts = memory.estimate(build_task(models[shape], l3d_cfg(spec)), batch, seq)
        measured = measure_memory(spec)
        estimate = sum(parts.values()) / 2**20
        largest = max(parts, key=parts.get)
        cells = [str(batch), str(seq), sample, engine, label, f"{estimate:,.0f} ({largest} {parts[largest] / 2**20:,.0f})"]
        if "error" in measured:
            cells += [f"failed: {measured['error']}", "–"]
        else:
            cells += [f"{measured['increment_mib']:,.0f}", f"{estimate / measured['increment_mib']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    env = environment()
    text = "\n".join([
        SECTION, "",
        f"Command: `python benchmarks/memory_estimate.py` (one thread); machine: {env['machine']}; torch {env['torch']}, "
        f"TL {env['transformer_lens']}, l3d_lens {env['l3d_lens']}; total {(time.perf_counter() - start) / 60:.1f} min. "
        f"Model: TinyStories-8M shape with random weights (as \"Fast engine\"), and for the last rows the same with 6 "
        "layers, d_model 128, d_mlp 512, vocab 100; L3D: the paper's setting there (100 "
        "subnetworks, rank 25, top_k 0.1, KL to a random other sample) on the selection named. Estimate: "
        "`l3d_lens.memory.estimate` (what `decompose` checks before training), its largest part in brackets; "
        "measured: the peak RSS of one step after a warm-up step minus the RSS with the model and data loaded, in a "
        "fresh subprocess (`benchmarks/common.py: measure_memory`). Ratio above 1: the estimate errs high.", "",
        "| batch | seq | sample | engine | selection | estimate MiB (largest part MiB) | measured MiB | estimate / measured |",
        "|---|---|---|---|---|---|---|---|",
        *rows, ""])
    write_section(SECTION, text)
    print(f"wrote {SECTION!r}")


if __name__ == "__main__":
    main()
