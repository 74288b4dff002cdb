"""Tucker subnetworks: ranks, dense reconstruction, norms and Gram matrices against explicit
mode products."""

from __future__ import annotations

import torch

from l3d_lens.adapters import make_adapter
from l3d_lens.selection import select
from l3d_lens.subnetworks import dense, factors_of, gram, init_factors, normalize_, resolve_ranks, sq_norms

from .helpers import tiny_lm


def selected():
    return select(make_adapter(tiny_lm("bridge")), ("blocks.0.attn", "blocks.1.mlp.W_in"))


def test_ranks():
    sel = selected()
    r = resolve_ranks(sel, 4)
    assert r["blocks.0.attn.W_Q"] == (2, 4, 4) and r["blocks.0.attn.b_Q"] == (2, 2)
    assert r["blocks.0.attn.b_O"] == (1,)  # a vector needs rank 1
    assert r["blocks.1.mlp.W_in"] == (4, 4)
    # fraction 0.5 of W_Q as stored, 16 x (2 heads * 8): matrix rank 8, which needs every head and
    # every d_head direction (``fraction_ranks``)
    assert resolve_ranks(sel, 0.5)["blocks.0.attn.W_Q"] == (2, 8, 8)
    # the earlier rule: 0.5 of each of (2, 16, 8) is (1, 8, 4); a mode rank above the product of the
    # others' adds nothing
    assert resolve_ranks(sel, 0.5, rule=1)["blocks.0.attn.W_Q"] == (1, 4, 4)
    assert resolve_ranks(sel, {"blocks.0.attn.W_Q": (2, 3, 1), "default": 1})["blocks.0.attn.W_Q"] == (2, 3, 1)


def explicit(core, us):
    """Mode products one mode at a time with tensordot."""
    out = core
    for m, u in enumerate(us):
        out = torch.movedim(torch.tensordot(out, u, dims=([m], [1])), -1, m)
    return out


def test_dense_norms_and_gram_against_explicit_products():
    sel = selected()
    f = init_factors(sel, resolve_ranks(sel, 3), 5, torch.Generator().manual_seed(0), torch.float64,
                     torch.device("cpu"))
    for side in ("in", "out"):
        assert torch.allclose(sq_norms(f, sel, side), torch.ones(5, dtype=torch.float64))
    flat = {side: torch.cat([dense(f, side, s).reshape(5, -1) for s in sel], 1) for side in ("in", "out")}
    for s in sel:
        core, us = factors_of(f, "out", s)
        manual = torch.stack([explicit(core[k], [u[k] for u in us]) for k in range(5)])
        assert torch.allclose(dense(f, "out", s), manual, atol=1e-12)
    assert torch.allclose(gram(f, sel), flat["out"] @ flat["out"].T, atol=1e-12)
    assert torch.allclose(gram(f, sel, "in", "out"), flat["in"] @ flat["out"].T, atol=1e-12)
    with torch.no_grad():
        for k in f:
            if k.endswith("/core"):  # every weight's tensor scaled by 1.7: same direction
                f[k].mul_(1.7)
    normalize_(f, sel, "out")
    assert torch.allclose(flat["out"].norm(dim=1), torch.ones(5, dtype=torch.float64))
    new = torch.cat([dense(f, "out", s).reshape(5, -1) for s in sel], 1)
    assert torch.allclose(new.norm(dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(new, flat["out"], atol=1e-12)  # only the scale changed
