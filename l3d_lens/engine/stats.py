"""What L3D's loss needs from a batch, as functions of the factors (differentiable):

- ``A`` [S, K]: coefficients V_in[k] . g_i
- ``B`` [S, K]: V_out[k] . g_i
- ``gsq`` [S]: ||g_i||^2

``from_captured`` contracts Tucker factors directly with captured inputs and output
gradients (the fast engine, opt_einsum picks per weight between a position Gram and
materialising); ``from_gradients`` uses materialised per-sample gradients (the exact engine).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from jaxtyping import Float

from ..adapters import POSITIONS, TOKENS
from ..selection import Selected
from ..subnetworks import Factors, contract, dense, factors_of, mode_letters
from ..task import Task
from .fast import Captured


@dataclasses.dataclass
class Stats:
    A: Float[torch.Tensor, "s k"]
    B: Float[torch.Tensor, "s k"]
    gsq: Float[torch.Tensor, " s"]


def _stacked(f: Factors, s: Selected) -> tuple[torch.Tensor, list[torch.Tensor]]:
    core_in, us_in = factors_of(f, "in", s)
    core_out, us_out = factors_of(f, "out", s)
    return torch.cat([core_in, core_out]), [torch.cat([a, b]) for a, b in zip(us_in, us_out)]


def _sizes(s: Selected, modes: tuple[str, ...]) -> list[int]:
    return [s.site.shape[s.site.modes.index(m)] for m in modes]


def site_terms(task: Task, s: Selected, cap: Captured, dtype: torch.dtype):
    """Per weight: the activation operands with their einsum labels, and the one-hot input kind."""
    site = s.site
    big, _ = mode_letters(len(site.modes))
    label = dict(zip(site.modes, big))
    token = task.token_mode
    y = cap.douts[site.output].to(dtype)
    n = y.shape[0]
    y = y.reshape(n, *((y.shape[1],) if token else ()), -1, *_sizes(s, site.out_modes))
    x = None
    if site.input not in (None, TOKENS, POSITIONS):
        x = cap.inputs[site.input].to(dtype)
        x = x.reshape(n, -1, *_sizes(s, site.in_modes))
    sl = s.mode_slice
    if sl is not None:
        mode, idx = sl
        if mode in site.out_modes:
            y = y.index_select(y.dim() - len(site.out_modes) + site.out_modes.index(mode), idx.to(y.device))
        if x is not None and mode in site.in_modes:
            x = x.index_select(2 + site.in_modes.index(mode), idx.to(x.device))
    u = "u" if token else ""
    x_lab = "".join(label[m] for m in site.in_modes)
    y_lab = "".join(label[m] for m in site.out_modes)
    return x, y, x_lab, y_lab, u


def _row_terms(task: Task, s: Selected, cap: Captured, row: int, dtype: torch.dtype):
    """Sample ``row``'s share of ``site_terms``: (its inputs [positions, *in sizes] or None, its
    output gradients [positions, *out sizes], their labels, its sequence)."""
    x, y, x_lab, y_lab, u = site_terms(task, s, cap, dtype)
    n, t = divmod(row, y.shape[1]) if u else (row, None)
    return (None if x is None else x[n]), (y[n, t] if u else y[n]), x_lab, y_lab, n


def captured_gradient(task: Task, s: Selected, cap: Captured, row: int,
                      dtype: torch.dtype) -> Float[torch.Tensor, "*shape"]:
    """The per-sample gradient of weight ``s`` for sample ``row`` of a captured batch (fast
    engine), materialised from the captured input activations and output gradients: the sum
    over positions of in (x) dout, with one-hot inputs for token and position embeddings."""
    x_row, y_row, x_lab, y_lab, n = _row_terms(task, s, cap, row, dtype)
    big, _ = mode_letters(len(s.site.modes))
    if s.site.input == TOKENS:
        return y_row.new_zeros(s.shape).index_add_(0, cap.tokens[n].to(y_row.device), y_row)
    if s.site.input == POSITIONS:
        pad = y_row.new_zeros((s.shape[0] - y_row.shape[0], *y_row.shape[1:]))
        return torch.cat([y_row, pad])
    if x_row is None:
        return contract(f"s{y_lab}->{big}", y_row)
    return contract(f"s{x_lab},s{y_lab}->{big}", x_row, y_row)


def gradient_bound(task: Task, s: Selected, cap: Captured, row: int, dtype: torch.dtype) -> torch.Tensor:
    """||in|| ||dout|| of sample ``row``'s positions for weight ``s`` (||dout|| where its input is
    one-hot or none): a bound on its per-sample gradient's terms, the scale of their round-off."""
    x_row, y_row, _, _, _ = _row_terms(task, s, cap, row, dtype)
    if x_row is None or s.site.input in (TOKENS, POSITIONS):
        return y_row.norm()
    return x_row.norm() * y_row.norm()


def from_captured(task: Task, f: Factors, cap: Captured) -> Stats:
    K = next(iter(f.values())).shape[0]
    dtype = next(iter(f.values())).dtype
    coef = 0.0
    gsq = 0.0
    for s in task.selected:
        site = s.site
        x, y, x_lab, y_lab, u = site_terms(task, s, cap, dtype)
        core, us = _stacked(f, s)
        big, small = mode_letters(len(us))
        ops, terms = [], []
        sq_ops, sq_terms = [y, y], [f"n{u}s{y_lab}", f"n{u}S{y_lab}"]
        if x is not None:
            ops.append(x), terms.append(f"ns{x_lab}")
            sq_ops += [x, x]
            sq_terms += [f"ns{x_lab}", f"nS{x_lab}"]
        ops.append(y), terms.append(f"n{u}s{y_lab}")
        ops.append(core), terms.append("k" + small)
        for m, (b, r) in enumerate(zip(big, small)):
            um = us[m]
            if m == 0 and site.input == TOKENS:
                ops.append(um[:, cap.tokens]), terms.append(f"kns{r}")
            elif m == 0 and site.input == POSITIONS:
                ops.append(um[:, : y.shape[2 if u else 1]]), terms.append(f"ks{r}")
            else:
                ops.append(um), terms.append(f"k{b}{r}")
        if site.input == TOKENS:
            tok = cap.tokens
            sq_ops.append((tok[:, :, None] == tok[:, None, :]).to(dtype)), sq_terms.append("nsS")
        elif site.input == POSITIONS:
            t = y.shape[2 if u else 1]
            sq_ops.append(torch.eye(t, dtype=dtype, device=y.device)), sq_terms.append("sS")
        coef = coef + contract(",".join(terms) + f"->n{u}k", *ops)
        gsq = gsq + contract(",".join(sq_terms) + f"->n{u}", *sq_ops)
    coef = coef.reshape(-1, 2 * K)
    return Stats(coef[:, :K], coef[:, K:], gsq.reshape(-1))


def from_gradients(task: Task, f: Factors, grads: dict[str, torch.Tensor]) -> Stats:
    A = B = gsq = 0.0
    for s in task.selected:
        g = grads[s.name].to(next(iter(f.values())).dtype)
        big, _ = mode_letters(g.dim() - 1)
        eq = f"S{big},k{big}->Sk"
        A = A + contract(eq, g, dense(f, "in", s))
        B = B + contract(eq, g, dense(f, "out", s))
        gsq = gsq + torch.cat([c.reshape(c.shape[0], -1).pow(2).sum(-1) for c in row_chunks(g)])
    return Stats(A, B, gsq)


def row_chunks(t: torch.Tensor, elements: int = 2**24) -> tuple[torch.Tensor, ...]:
    """``t`` split along its first axis into views of about ``elements`` entries: an elementwise
    pass over a per-sample gradient or a captured activation (its square, its finiteness) then
    holds a temporary of one chunk, not of the whole tensor (``isfinite`` makes 1.75 copies)."""
    per_row = max(1, math.prod(t.shape[1:]))
    return t.split(max(1, elements // per_row)) if t.dim() else (t,)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, chunk by chunk (``row_chunks``)."""
    return all(bool(torch.isfinite(c).all()) for c in row_chunks(t))
