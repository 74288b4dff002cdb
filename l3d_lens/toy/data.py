"""Seeded data for the toy models, as in the paper: every feature is active with probability
``p_active`` (0.05) and then takes a value uniform in [0, 1] (in [-1, 1] for the x^2 model);
rows where nothing is active carry no signal and are dropped, and sampling continues until
``n`` rows are left. Everything random comes from one ``torch.Generator`` seeded by ``seed``,
drawn in float32 whatever ``torch.get_default_dtype()`` says (a float64 draw would give other
values, not only other precision): ``Toy.to(torch.float64)`` is the way to float64.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Bool, Float

from ..checks import as_index


def _check_n(n: Any) -> int:
    """``n`` as an int (numpy integers and 0-d integer tensors too, ``checks.as_index``), or
    ValueError: a row count is an integer >= 1, never a float or a bool (True would draw one row)."""
    count = as_index(n)
    if count is None or count < 1:
        raise ValueError(f"n must be an integer >= 1 (rows to draw), got {n!r}")
    return count


def _keep_nonzero(draw, n: int, gen: torch.Generator) -> torch.Tensor:
    """Call ``draw(m, gen)`` for chunks of rows and keep the rows that are not all zero, until
    there are ``n`` of them (the paper drops all-zero rows and tops the data set up again)."""
    n = _check_n(n)
    kept, total = [], 0
    while total < n:
        x = draw(max(n, 64), gen)
        x = x[(x != 0).any(-1)]
        kept.append(x)
        total += x.shape[0]
    return torch.cat(kept)[:n]


#: the rarest share of rows with something active that sampling accepts: rarer, and dropping
#: the all-zero rows would draw more than 10,000 rows per row kept
MIN_NONZERO = 1e-4


def _check(p_active: float, n_features: int, n_units: Optional[int] = None) -> None:
    """Valid sizes, and ``p_active`` not so small that a row with any of ``n_units``
    independent features (or groups) active is too rare to sample."""
    if not 0 < p_active <= 1:
        raise ValueError(f"p_active must be in (0, 1], got {p_active}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    nonzero = 1 - (1 - p_active) ** (n_features if n_units is None else n_units)
    if nonzero < MIN_NONZERO:
        raise ValueError(f"p_active={p_active} leaves only {nonzero:.2g} of rows with anything active; keeping n "
                         f"non-zero rows would draw about n / {nonzero:.2g} rows (the smallest share accepted is "
                         f"{MIN_NONZERO})")


def sparse_features(n: int, n_features: int, p_active: float = 0.05, seed: int = 0,
                    signed: bool = False) -> Float[torch.Tensor, "n n_features"]:
    """TMS / TMCS inputs: each feature independently active with probability ``p_active``,
    value uniform in [0, 1] (``signed=True``: in [-1, 1], the x^2 model); no all-zero rows."""
    _check(p_active, n_features)

    def draw(m: int, gen: torch.Generator) -> torch.Tensor:
        value = torch.rand(m, n_features, generator=gen, dtype=torch.float32, device="cpu")
        if signed:
            value = 2 * value - 1
        return value * (torch.rand(m, n_features, generator=gen, dtype=torch.float32, device="cpu") < p_active)

    return _keep_nonzero(draw, n, torch.Generator().manual_seed(seed))


def grouped_features(n: int, n_features: int = 25, group_size: int = 5, p_active: float = 0.05,
                     seed: int = 0) -> Float[torch.Tensor, "n n_features"]:
    """Higher-rank circuits inputs: features come in consecutive groups of ``group_size`` whose
    activity is tied (a group is active with probability ``p_active``; then each of its
    features takes its own value uniform in [0, 1]); no all-zero rows."""
    if group_size < 1 or n_features % group_size:
        raise ValueError(f"n_features={n_features} must be a multiple of group_size={group_size}")
    _check(p_active, n_features, n_features // group_size)
    n_groups = n_features // group_size

    def draw(m: int, gen: torch.Generator) -> torch.Tensor:
        value = torch.rand(m, n_features, generator=gen, dtype=torch.float32, device="cpu")
        active = torch.rand(m, n_groups, generator=gen, dtype=torch.float32, device="cpu") < p_active
        return value * active.repeat_interleave(group_size, dim=1)

    return _keep_nonzero(draw, n, torch.Generator().manual_seed(seed))


def circuit_matrix(n_in: int, n_out: int, max_coefficient: float = 3.0,
                   seed: int = 0) -> Float[torch.Tensor, "n_out n_in"]:
    """TMCS's ground truth A (y = A x): entries uniform in [0, max_coefficient]."""
    return torch.rand(n_out, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float32,
                      device="cpu") * max_coefficient


def check_group_size(group_size: Any, width: int) -> None:
    """ValueError unless ``group_size`` is a positive integer dividing ``width`` features."""
    size = as_index(group_size)
    if size is None or size < 1 or width % size:
        raise ValueError(f"group_size must be a positive integer dividing the {width} features, got {group_size!r}")


def active_features(x: Float[torch.Tensor, "n f"], group_size: int = 1) -> Bool[torch.Tensor, "n g"]:
    """Which features (or groups of ``group_size`` consecutive features) are active per row."""
    if group_size != 1:
        check_group_size(group_size, x.shape[-1])
    nz = x != 0
    if group_size == 1:
        return nz
    return nz.view(x.shape[0], -1, group_size).any(-1)


def single_feature_rows(x: Float[torch.Tensor, "n f"], group_size: int = 1, feature: Optional[int] = None,
                        sign: Optional[int] = None) -> Bool[torch.Tensor, " n"]:
    """Rows in which exactly one feature (group) is active, optionally only that ``feature``
    and (features only) only where its value has ``sign`` (+1 or -1)."""
    act = active_features(x, group_size)
    one = act.sum(-1) == 1
    if feature is not None:
        one = one & act[:, feature]
    if sign is not None:
        if sign not in (1, -1) or group_size != 1:
            raise ValueError(f"sign must be +1 or -1 and needs group_size=1, got sign={sign}, group_size={group_size}")
        one = one & (x * sign > 0).any(-1)
    return one
