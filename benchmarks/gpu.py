"""GPU benchmark: L3D step vs plain forward+backward, fp32 and bf16 autocast (fp32 factors),
fast vs exact engine, on the paper's TinyStories-8M setting. Appends a "## GPU" section to
BENCHMARKS.md. Exits with a message (status 2) when no CUDA device is present.

    python benchmarks/gpu.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import torch

import l3d_lens
from l3d_lens.decomposition import build_task
from l3d_lens.engine import batch_stats
from l3d_lens.objective import l3d_loss
from l3d_lens.subnetworks import gram, init_factors, normalize_, resolve_ranks

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = [f"blocks.4.attn.{w}" for w in ("W_Q", "W_K", "W_V", "W_O", "b_O")]


def tinystories_shape(device):
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=8, d_model=256, n_heads=16, d_head=16, d_mlp=1024, d_vocab=50257,
                                      n_ctx=2048, act_fn="gelu_new", normalization_type="LN", seed=0)
        return HookedTransformer(cfg).to(device).eval()
    except ImportError:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        cfg = TransformerBridgeConfig(n_layers=8, d_model=256, n_heads=16, d_head=16, d_mlp=1024, d_vocab=50257,
                                      n_ctx=2048, act_fn="gelu_new", normalization_type="LN", seed=0)
        return TransformerBridge.boot_native(cfg, device=device).eval()


def timed(fn, repeats):
    fn()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() - base


def l3d_step_fn(model, tokens, cfg):
    task = build_task(model, cfg)
    f = init_factors(task.selected, resolve_ranks(task.selected, cfg.rank), cfg.n_subnetworks,
                     torch.Generator().manual_seed(0), torch.float32, tokens.device)
    for t in f.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(f.values()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)

    def step():
        st = batch_stats(task, f, tokens, gen)
        loss, _ = l3d_loss(st.A, st.B, st.gsq, gram(f, task.selected), cfg.top_k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        normalize_(f, task.selected, "out")
    return step


def plain_fn(model, tokens, autocast):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
    return step


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    model = tinystories_shape(device)
    tokens = torch.randint(0, 50257, (args.batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for sample in ("sequence", "token"):
        for autocast in (None, "bf16"):
            cfg = l3d_lens.L3DConfig(components=COMPONENTS, n_subnetworks=100, rank=25, top_k=0.1, sample=sample,
                                     autocast=autocast, lr=0.005)
            t_plain, m_plain = timed(plain_fn(model, tokens, autocast is not None), args.repeats)
            t_step, m_step = timed(l3d_step_fn(model, tokens, cfg), args.repeats)
            rows.append(f"| {sample} | {autocast or 'fp32'} | fast | {t_plain * 1e3:.1f} | {t_step * 1e3:.1f} | "
                        f"{t_step / t_plain:.2f}x | {m_step / max(m_plain, 1) :.2f}x |")
        small = tokens[:4]
        cfg = l3d_lens.L3DConfig(components=COMPONENTS, n_subnetworks=100, rank=25, sample=sample, lr=0.005)
        t_fast, m_fast = timed(l3d_step_fn(model, small, cfg), args.repeats)
        t_exact, m_exact = timed(l3d_step_fn(model, small, cfg.replace(engine="exact")), args.repeats)
        rows.append(f"| {sample} (batch 4) | fp32 | exact vs fast | {t_fast * 1e3:.1f} | {t_exact * 1e3:.1f} | "
                    f"{t_exact / t_fast:.2f}x | {m_exact / max(m_fast, 1):.2f}x |")
    head = (f"## GPU\n\n`python benchmarks/gpu.py --batch {args.batch}` on {torch.cuda.get_device_name()} "
            f"(torch {torch.__version__}, {platform.python_version()}); TinyStories-8M shape, block-4 attention, "
            f"100 subnetworks, rank 25, 16 tokens. Times are medians of {args.repeats}; ratios against a plain "
            f"forward+backward (or the fast engine) in the same process; memory = peak allocated above the model.\n\n"
            "| sample | precision | engine | baseline ms | step ms | time ratio | memory ratio |\n"
            "|---|---|---|---|---|---|---|\n")
    section = head + "\n".join(rows) + "\n"
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    text = re.sub(r"\n## GPU\n.*?(?=\n## |\Z)", "", text, flags=re.S)
    path.write_text(text.rstrip() + "\n\n" + section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
