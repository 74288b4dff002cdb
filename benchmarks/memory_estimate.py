"""How close ``l3d_lens.memory``'s estimate (made before training; ``decompose`` refuses a run
that it says cannot fit) comes to the measured peak of a training step; writes the
"## Memory estimate" section of BENCHMARKS.md (other sections are kept).

    python benchmarks/memory_estimate.py        # about 10 min, one thread, TL 3.9 interpreter

Measured: the peak RSS of one step after a warm-up step, minus the RSS with the model and data
loaded, in a fresh subprocess (``common.measure_memory``, as the "Fast engine" section; for the
plain module, ``measure_plain`` here does the same). The
estimate counts the same thing (the L3D state and one step's working memory, not the model's
weights). A ratio above 1 errs high (a run near the limit may be refused), below 1 low (a run
the estimate passes may still run out of memory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (BENCHMARKS_MD, PAPER, L3DStep, build_model, environment, l3d_cfg, measure_in_subprocess,  # noqa: E402
                               measure_memory, peak_rss_mib, reset_peak_rss, rss_mib, setup_threads, write_section)
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
#: a big vocabulary read at every position (the logits' copies dominate)
VOCAB = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=64, n_ctx=64, d_vocab=20000, act_fn="gelu")
VOCAB_CASES = [
    (32, 32, "sequence", "fast", "block-0 attention, position=\"all\" (1 layer, d_model 16, vocab 20000)",
     ["blocks.0.attn"], {"position": "all", "n_subnetworks": 4, "rank": 2}),
]
#: a plain nn.Module (no language model): its own activations, 64 -> 4096 -> 4096 -> 64 ReLU MLP
MLP_WIDTHS = [64, 4096, 4096, 64]
#: (batch, engine, widths, label, components)
PLAIN_CASES = [
    (2048, "fast", MLP_WIDTHS, "first layer of a 64-4096-4096-64 MLP", ["0.weight"]),
    (1024, "exact", [64, 1024, 1024, 64], "second layer of a 64-1024-1024-64 MLP", ["2.weight"]),
    (256, "exact", [64, 1024, 1024, 64], "first layer of a 64-1024-1024-64 MLP", ["0.weight"]),
]
PLAIN_CFG = {"n_subnetworks": 4, "rank": 2, "divergence": "mse", "reference": "mean"}


def build_mlp(widths: list[int]) -> torch.nn.Sequential:
    """A ReLU MLP with seeded random weights."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(widths) - 2 else [])
    return torch.nn.Sequential(*layers)


def _plain_main(spec: dict) -> dict:
    """``common._memory_main`` for a plain module: RSS with the MLP and its rows loaded, then the
    peak of one L3D step after a warm-up step."""
    setup_threads(spec.get("threads", 1))
    model = build_mlp(spec["widths"])
    rows = torch.randn(spec["batch"], spec["widths"][0], generator=torch.Generator().manual_seed(1))
    base = rss_mib()
    step = L3DStep(model, l3d_cfg(spec))
    step(rows)
    before = rss_mib()
    reset_peak_rss()
    step(rows)
    peak = peak_rss_mib()
    return {"model_loaded_mib": base, "before_step_mib": before, "peak_mib": peak, "increment_mib": peak - base}


def measure_plain(spec: dict, timeout: float = 1800) -> dict:
    """``_plain_main`` in a fresh subprocess, as ``common.measure_memory`` measures."""
    return measure_in_subprocess([__file__, "--plain", json.dumps(spec)], spec, timeout)


def plain_row(batch: int, engine: str, widths: list[int], label: str, components: list[str],
              threads: int) -> tuple[list[str], dict, dict]:
    """(the row's first cells, the estimate's parts, the measurement) of a ``PLAIN_CASES`` row."""
    spec = {"batch": batch, "widths": widths, "threads": threads,
            "cfg": {**PLAIN_CFG, "components": components, "engine": engine}}
    parts = memory.estimate(build_task(build_mlp(widths), l3d_cfg(spec)), batch, 1)
    return [str(batch), "–", "row", engine, label], parts, measure_plain(spec)


def lm_row(models: dict, shape: str, overrides: dict, case: tuple, threads: int) -> tuple[list[str], dict, dict]:
    """(the row's first cells, the estimate's parts, the measurement) of a language-model row."""
    batch, seq, sample, engine, label, components, *extra = case
    spec = {"model": MODEL, "batch": batch, "seq": seq, "kind": "l3d", "threads": threads,
            "cfg": {"sample": sample, "engine": engine, "components": components, **(extra[0] if extra else {})},
            **({"model_overrides": overrides} if overrides else {})}
    parts = memory.estimate(build_task(models[shape], l3d_cfg(spec)), batch, seq)
    return [str(batch), str(seq), sample, engine, label], parts, measure_memory(spec)


def cells(first: list[str], parts: dict, measured: dict) -> str:
    """A table row: the case, the estimate with its largest part, the measured increment, the ratio."""
    estimate = sum(parts.values()) / 2**20
    largest = max(parts, key=parts.get)
    row = first + [f"{estimate:,.0f} ({largest} {parts[largest] / 2**20:,.0f})"]
    if "error" in measured:
        row += [f"failed: {measured['error']}", "–"]
    else:
        row += [f"{measured['increment_mib']:,.0f}", f"{estimate / measured['increment_mib']:.2f}"]
    return "| " + " | ".join(row) + " |"


def main(argv: "list[str] | None" = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BENCHMARKS_MD, help="the file whose section is rewritten")
    args = ap.parse_args(argv)
    threads = setup_threads(1)
    start = time.perf_counter()
    models = {"tinystories": build_model(MODEL), "small": build_model(MODEL, **SMALL),
              "vocab": build_model(MODEL, **VOCAB)}
    rows = []
    lm_cases = ([("tinystories", {}, c) for c in CASES] + [("small", SMALL, c) for c in SMALL_CASES]
                + [("vocab", VOCAB, c) for c in VOCAB_CASES])
    for shape, overrides, case in lm_cases:
        rows.append(cells(*lm_row(models, shape, overrides, case, threads)))
        print(rows[-1], flush=True)
    for case in PLAIN_CASES:
        rows.append(cells(*plain_row(*case, threads)))
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
    write_section(SECTION, text, args.out)
    print(f"wrote {SECTION!r} to {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plain"]:
        print(json.dumps(_plain_main(json.loads(sys.argv[2]))))
    else:
        main()
