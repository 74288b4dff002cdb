"""Micro-benchmarks behind single proposals (CPU seconds, one thread, interleaved in one process).

- token-mode A/B contraction of one W_Q-shaped weight (TinyStories setting, batch 32 x 16
  tokens, 16 targets): the current single einsum (output ``n u k``), the same einsum asked
  for ``n k u`` output, and the explicit order of prototype P6 (k-major Z, strided bmm over n);
- Adam over the factor set: torch's default CPU implementation vs ``foreach=True`` vs
  ``fused=True``, for the TinyStories factor set and for one GPT-2-small layer's factors.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import build_model, interleaved


def token_contraction(repeats: int = 3) -> list[dict]:
    from l3d_lens.subnetworks import contract

    g = torch.Generator().manual_seed(0)
    n, u, s, B, A, C, K2 = 32, 16, 16, 256, 16, 16, 200
    x, y = torch.randn(n, s, B, generator=g), torch.randn(n, u, s, A, C, generator=g)
    core = torch.randn(K2, 16, 25, 16, generator=g, requires_grad=True)
    U0 = torch.randn(K2, A, 16, generator=g, requires_grad=True)
    U1 = torch.randn(K2, B, 25, generator=g, requires_grad=True)
    U2 = torch.randn(K2, C, 16, generator=g, requires_grad=True)
    w = torch.randn(n, u, K2, generator=g)
    eq = "nsB,nusAC,kabc,kAa,kBb,kCc->"

    def current():
        return contract(eq + "nuk", x, y, core, U0, U1, U2)

    def output_nku():
        return contract(eq + "nku", x, y, core, U0, U1, U2).transpose(1, 2)

    def zbmm():
        Z = contract("nsB,kabc,kAa,kBb,kCc->knsAC", x, core, U0, U1, U2)
        return torch.bmm(Z.reshape(K2, n, -1).transpose(0, 1), y.reshape(n, u, -1).transpose(1, 2)).transpose(1, 2)

    variants = {"current (einsum -> n u k)": current, "same einsum -> n k u": output_nku, "P6 k-major Z + bmm": zbmm}
    ref = current().detach()

    def fwd_bwd(fn):
        def run():
            (fn() * w).sum().backward()
            for p in (core, U0, U1, U2):
                p.grad = None
        return run

    cpu, _ = interleaved({name: fwd_bwd(fn) for name, fn in variants.items()}, repeats=repeats)
    base = statistics.median(cpu["current (einsum -> n u k)"])
    rows = []
    for name, fn in variants.items():
        err = float((fn().detach() - ref).norm() / ref.norm())
        t = statistics.median(cpu[name])
        rows.append({"what": "token-mode A/B contraction, one W_Q, fwd+bwd", "variant": name, "cpu_s": t,
                     "vs_current": t / base, "rel_diff": err})
    return rows


def adam(repeats: int = 3) -> list[dict]:
    from l3d_lens import L3DConfig
    from l3d_lens.decomposition import build_task
    from l3d_lens.subnetworks import init_factors, resolve_ranks

    from benchmarks.common import PAPER

    rows = []
    for label, model_name, comps in (("TinyStories setting (5 weights)", "tinystories-8m", PAPER["components"]),
                                     ("GPT-2-small block 0 attn+mlp (12 weights)", "gpt2-small",
                                      ["blocks.0.attn", "blocks.0.mlp"])):
        model = build_model(model_name)
        task = build_task(model, L3DConfig(components=comps, n_subnetworks=100, rank=25, sample="sequence"))
        f0 = init_factors(task.selected, resolve_ranks(task.selected, 25), 100, torch.Generator().manual_seed(0),
                          torch.float32, torch.device("cpu"))
        del model
        fns, opts = {}, {}
        for kind in ("default", "foreach", "fused"):
            params = [t.clone().requires_grad_(True) for t in f0.values()]
            for p in params:
                p.grad = torch.randn_like(p)
            kw = {} if kind == "default" else {kind: True}
            opt = torch.optim.Adam(params, lr=0.005, **kw)
            opt.step()  # state allocated outside the timing
            opts[kind] = opt
            fns[kind] = opt.step
        cpu, _ = interleaved(fns, repeats=repeats)
        n = sum(t.numel() for t in f0.values())
        base = statistics.median(cpu["default"])
        for kind in fns:
            t = statistics.median(cpu[kind])
            rows.append({"what": f"Adam step, {label}, {n / 1e6:.1f} M floats", "variant": kind, "cpu_s": t,
                         "vs_current": t / base, "rel_diff": 0.0})
    return rows


def run(repeats: int = 3) -> list[dict]:
    t = time.process_time()
    rows = token_contraction(repeats) + adam(repeats)
    for r in rows:
        print(f"{r['what']}: {r['variant']}: {r['cpu_s'] * 1000:.1f} ms, x{r['vs_current']:.2f}", flush=True)
    print(f"micro: {time.process_time() - t:.0f} CPU s")
    return rows
