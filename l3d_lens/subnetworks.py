"""Low-rank subnetworks: per-weight Tucker factors of V_in and V_out.

For a decomposed weight of shape (I_1, ..., I_N), subnetwork k on side ``in`` or ``out`` is
``core[k] x_1 U_1[k] ... x_N U_N[k]`` with ``core`` [K, R_1..R_N] and ``U_m`` [K, I_m, R_m].
Factors live in a flat dict of tensors (``"out/blocks.0.attn.W_Q/core"``) so that they can
be optimised, saved with safetensors, and contracted with opt_einsum.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Mapping, Sequence

import opt_einsum
import torch
from jaxtyping import Float

from .selection import Selected

Factors = dict[str, torch.Tensor]
SIDES = ("in", "out")


def key(side: str, name: str, part: str) -> str:
    return f"{side}/{name}/{part}"


#: how a fractional rank is read (``resolve_ranks``): 1, of each mode of the TransformerLens
#: tensor (an l3d_lens before rule 2); 2, of each dimension of the weight as the model stores it
RANK_RULE = 2
#: modes that a model stores as one dimension (an attention weight's n_heads * d_head)
JOINT_MODES = ("head", "d_head")


def resolve_ranks(selected: Sequence[Selected], rank, rule: int = RANK_RULE) -> dict[str, tuple[int, ...]]:
    """Tucker rank per mode of every decomposed weight (see ``L3DConfig.rank``); ``rule``: how a
    fraction is read (``RANK_RULE``; 1 for factors an earlier l3d_lens saved)."""
    largest = max(max(s.shape) for s in selected)
    if isinstance(rank, int) and rank > largest:
        raise ValueError(f"rank {rank} is above every dimension of the selected weights (largest: {largest})")
    out = {}
    per = dict(rank) if isinstance(rank, Mapping) else {}
    unknown = set(per) - {s.name for s in selected} - {"default"}
    if unknown:
        raise ValueError(f"rank given for {sorted(unknown)}, which are not decomposed; decomposed: "
                         f"{[s.name for s in selected]} (or 'default')")
    for s in selected:
        r = per.get(s.name, per.get("default", 0.1 if per else rank))
        if isinstance(r, (list, tuple)):
            if len(r) != len(s.shape):
                raise ValueError(f"rank for {s.name} lists {len(r)} modes; the weight has {len(s.shape)} {s.shape}")
            for m, (ri, dim) in enumerate(zip(r, s.shape)):
                if ri > dim:
                    raise ValueError(f"rank {ri} for mode {m} ({s.site.modes[m]}) of {s.name} is above its size {dim}")
            out[s.name] = tuple(int(x) for x in r)
            continue
        if isinstance(r, float):
            ranks = fraction_ranks(s, r) if rule >= 2 else [max(1, math.ceil(r * dim)) for dim in s.shape]
        else:
            if s.name in per and r > max(s.shape):
                raise ValueError(f"rank {r} for {s.name} is above all its dimensions {s.shape}")
            ranks = [min(int(r), dim) for dim in s.shape]
        out[s.name] = _trim(ranks)
    return out


def fraction_ranks(s: Selected, fraction: float) -> list[int]:
    """Tucker ranks for a ``fraction`` of each dimension of the weight as the model stores it,
    as the paper takes them (its 25 for 256; rounded up here, 26): an attention weight's head
    and d_head modes are one dimension there (W_Q is d_model x n_heads*d_head), so its subnetwork
    is a matrix of rank r = min(ceil(fraction * d_model), ceil(fraction * n_heads*d_head)), and
    a Tucker tensor holds every such matrix, and no matrix of higher rank, with d_model rank r,
    head rank min(n_heads, r*d_head) and d_head rank min(d_head, r*n_heads) (a bias, stored as one
    vector, takes r of n_heads*d_head alone); a fraction of each mode alone gave a head rank of 1
    up to 10 heads, every head of a subnetwork one matrix scaled."""
    joint = [m for m, mode in enumerate(s.site.modes) if mode in JOINT_MODES]
    if len(joint) != len(JOINT_MODES):
        return [max(1, math.ceil(fraction * dim)) for dim in s.shape]
    size = math.prod(s.shape[m] for m in joint)
    own = [max(1, math.ceil(fraction * dim)) for m, dim in enumerate(s.shape) if m not in joint]
    r = min([math.ceil(fraction * size), *own])
    return [min(dim, r * size // dim) if m in joint else r for m, dim in enumerate(s.shape)]


def factor_ranks(f: Factors, selected: Sequence[Selected]) -> dict[str, tuple[int, ...]]:
    """The Tucker ranks the factors ``f`` hold per weight (their cores' shapes), whichever rule
    gave them."""
    return {s.name: tuple(f[key("out", s.name, "core")].shape[1:]) for s in selected}


def _trim(ranks: list[int]) -> tuple[int, ...]:
    """Drop Tucker ranks that add parameters but no expressivity: a mode's rank above the
    product of the others' (a vector needs rank 1: any vector is U[:, 0] * core)."""
    if len(ranks) == 1:
        return (1,)
    out = list(ranks)
    for m in range(len(out)):
        out[m] = min(out[m], math.prod(out[:m] + out[m + 1:]))
    return tuple(out)


def init_factors(selected: Sequence[Selected], ranks: Mapping[str, tuple[int, ...]], n_subnetworks: int,
                 generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Factors:
    """Random factors (normal cores, orthonormal-ish columns), each side unit norm per subnetwork."""
    f: Factors = {}
    for side in SIDES:
        for s in selected:
            r = ranks[s.name]
            f[key(side, s.name, "core")] = torch.randn((n_subnetworks, *r), generator=generator, dtype=torch.float64)
            for m, (dim, rm) in enumerate(zip(s.shape, r)):
                f[key(side, s.name, f"U{m}")] = torch.randn((n_subnetworks, dim, rm), generator=generator,
                                                            dtype=torch.float64) / math.sqrt(dim)
    f = {k: v.to(device=device, dtype=dtype) for k, v in f.items()}
    for side in SIDES:
        normalize_(f, selected, side)
    return f


def factors_of(f: Factors, side: str, s: Selected) -> tuple[torch.Tensor, list[torch.Tensor]]:
    core = f[key(side, s.name, "core")]
    return core, [f[key(side, s.name, f"U{m}")] for m in range(core.dim() - 1)]


def mode_letters(n: int) -> tuple[str, str]:
    """(size letters, rank letters) for n modes, disjoint from the fixed letters k, l, n, s, S, u."""
    big = [c for c in string.ascii_uppercase if c != "S"][:n]
    small = [c for c in string.ascii_lowercase if c not in "klnsuv"][:n]
    return "".join(big), "".join(small)


@functools.lru_cache(maxsize=4096)
def expression(eq: str, *shapes: tuple[int, ...]):
    """A cached opt_einsum contraction (path found once per equation and shapes)."""
    return opt_einsum.contract_expression(eq, *shapes, optimize="auto")


def contract(eq: str, *ops: torch.Tensor) -> torch.Tensor:
    return expression(eq, *(tuple(o.shape) for o in ops))(*ops, backend="torch")


def dense(f: Factors, side: str, s: Selected) -> Float[torch.Tensor, "k *shape"]:
    """Subnetworks of one weight as full tensors [K, *selected shape]."""
    core, us = factors_of(f, side, s)
    big, small = mode_letters(len(us))
    eq = "k" + small + "," + ",".join(f"k{b}{r}" for b, r in zip(big, small)) + "->k" + big
    return contract(eq, core, *us)


def sq_norms(f: Factors, selected: Sequence[Selected], side: str) -> Float[torch.Tensor, " k"]:
    """||V_k||^2 summed over every decomposed weight."""
    return sum(_inner(f, s, side, side, diagonal=True) for s in selected)


def gram(f: Factors, selected: Sequence[Selected], side_a: str = "out", side_b: str = "out") -> Float[torch.Tensor, "k l"]:
    """<V_a[k], V_b[l]> summed over every decomposed weight."""
    return sum(_inner(f, s, side_a, side_b, diagonal=False) for s in selected)


def _inner(f: Factors, s: Selected, side_a: str, side_b: str, diagonal: bool) -> torch.Tensor:
    core_a, us_a = factors_of(f, side_a, s)
    core_b, us_b = factors_of(f, side_b, s)
    big, small = mode_letters(len(us_a))
    pool = [c for c in string.ascii_lowercase if c not in "klnsuv" and c not in small]
    other = "".join(pool[: len(small)])
    kb = "k" if diagonal else "l"
    out = "k" if diagonal else "kl"
    terms = ["k" + small, kb + other]
    terms += [f"k{b}{r}" for b, r in zip(big, small)] + [f"{kb}{b}{r}" for b, r in zip(big, other)]
    return contract(",".join(terms) + "->" + out, core_a, core_b, *us_a, *us_b)


@torch.no_grad()
def normalize_(f: Factors, selected: Sequence[Selected], side: str = "out") -> None:
    """Scale every subnetwork of one side to unit norm over all its weights, the rescaling
    spread evenly over each weight's core and factors."""
    norm = sq_norms(f, selected, side).clamp_min(1e-30).sqrt()
    for s in selected:
        core, us = factors_of(f, side, s)
        scale = norm.pow(-1.0 / (len(us) + 1))
        core.mul_(scale.view(-1, *([1] * (core.dim() - 1))))
        for u in us:
            u.mul_(scale.view(-1, 1, 1))
