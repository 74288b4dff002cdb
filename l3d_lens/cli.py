"""The ``l3d-lens`` command. User errors print one line and exit 2, not a traceback."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _demo(args: argparse.Namespace) -> int:
    """Decompose the embedded induction model and print what each subnetwork is."""
    import transformer_lens  # noqa: F401

    from importlib.metadata import version

    from . import L3DConfig, decompose
    from .zoo import induction

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = induction.load()
    half = induction.HALF
    data = induction.repeated_sequences(args.n_sequences, seed=args.seed)
    print(f"l3d-lens demo: {type(model).__name__} (transformer-lens {version('transformer-lens')}), "
          f"2-layer attention-only model trained on repeated random words; torch threads: {args.threads}")
    first, second = induction.induction_loss(model)
    print(f"model loss on the first half {first:.3f} nats, on the repeated half {second:.4f} nats (induction)")
    cfg = L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=args.n_subnetworks, rank=4,
                    top_k=0.1, sample="token", epochs=args.epochs, batch_size=32, lr=0.01, lr_step=4,
                    include_biases=False, seed=args.seed)
    dec = decompose(model, data, cfg, progress=not args.quiet)
    out = Path(args.out)
    dec.save(out / "decomposition")

    heads = dec.head_attribution(as_tensor=True)
    probe = data[: min(64, len(data))]
    coef = dec.coefficients(probe).abs().reshape(len(probe), probe.shape[1], -1)
    first_half = coef[:, 1 : half + 1].mean((0, 1))
    repeated = coef[:, half + 1 :].mean((0, 1))
    p_act = dec.fraction_active
    print(f"\nreconstruction error {dec.history[-1]['loss']:.3f}, dead subnetworks {dec.history[-1]['n_dead']}"
          f"/{dec.n_subnetworks}")
    print(f"{'subnet':>6} {'P_act':>6}  {'top heads (share of squared norm)':<40} {'|c| repeated/first half':>24}")
    for k in torch.argsort(p_act, descending=True).tolist():
        flat = heads[k].flatten()
        top = torch.argsort(flat, descending=True)[:3].tolist()
        desc = ", ".join(f"L{i // heads.shape[2]}H{i % heads.shape[2]} {flat[i]:.2f}" for i in top)
        ratio = (repeated[k] / first_half[k].clamp_min(1e-12)).item()
        print(f"{k:>6} {p_act[k]:>6.3f}  {desc:<40} {ratio:>24.1f}")
    print(f"\nsaved to {out / 'decomposition'} (safetensors + JSON); wall time {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l3d-lens", description="Local Loss Landscape Decomposition for "
                                     "TransformerLens models: parameter-space circuits.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="decompose the embedded default model (no download) and summarise it")
    demo.add_argument("--out", default="l3d_demo_out", help="output folder (default: l3d_demo_out)")
    demo.add_argument("--n-sequences", type=int, default=512, help="number of training sequences (default 512)")
    demo.add_argument("--n-subnetworks", type=int, default=8)
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for small models)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
        print(f"l3d-lens {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
