"""Moving the model along subnetworks: W0 + sum_j delta_j v_j, or projecting subnetworks out
of the weights (ablation). ``intervene`` edits the user's model in place for the body of a
``with`` block and restores every touched parameter bit-exactly afterwards, even if the body
raises; ``perturbed_forward`` does the same computation functionally, without editing."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Union

import torch

from .adapters import Adapter
from .checks import as_index, as_number

Subnets = Union[int, Sequence[int]]
Deltas = Union[float, Sequence[float]]


def check_subnetworks(subnetwork: Subnets, n_subnetworks: int) -> list[int]:
    """The subnetwork indices as a list of distinct ints in 0..n_subnetworks-1."""
    choices = f"an int or a non-empty list of ints in 0..{n_subnetworks - 1}"
    one = as_index(subnetwork)
    try:
        ks = [one] if one is not None else [as_index(k) for k in subnetwork]
    except TypeError:  # not an index and not iterable (a bool, a float, a 0-d float tensor)
        ks = []
    if not ks or None in ks:
        raise ValueError(f"subnetwork must be {choices}, got {subnetwork!r}")
    bad = [k for k in ks if not 0 <= k < n_subnetworks]
    if bad:
        raise ValueError(f"subnetwork {bad[0]} out of range; valid: 0..{n_subnetworks - 1}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"subnetwork list {ks} repeats an index")
    return ks


def check_deltas(delta: Deltas, n: int) -> list[float]:
    """One finite float per subnetwork: a single number is used for all n."""
    one = as_number(delta)
    try:
        ds = [one] * n if one is not None else list(delta)
    except TypeError:  # not a number and not iterable (a bool, a 0-d bool tensor)
        ds = None
    if ds is None or isinstance(delta, (str, bytes)):
        raise ValueError(f"delta must be a finite number or a list of {n} (one per subnetwork), got {delta!r}")
    if len(ds) != n:
        raise ValueError(f"{len(ds)} deltas for {n} subnetworks; give one delta or one per subnetwork")
    out = [as_number(d) for d in ds]
    for d, x in zip(ds, out):
        if x is None or not math.isfinite(x):
            raise ValueError(f"delta must be a finite number, got {d!r}")
    return out


def weight_changes(adapter: Adapter, subnetworks: dict[str, torch.Tensor], ks: list[int],
                   deltas: list[float] | None) -> dict[str, torch.Tensor]:
    """TL-layout change per weight: sum_j delta_j v_j, or (deltas None) minus the projection of
    the current weights onto span{v_j} (joint over all decomposed weights)."""
    names = list(subnetworks)
    if deltas is not None:
        return {n: sum(d * subnetworks[n][k].double() for k, d in zip(ks, deltas)) for n in names}
    flat_v = torch.cat([subnetworks[n][ks].double().reshape(len(ks), -1) for n in names], 1)
    basis = torch.linalg.qr(flat_v.T).Q  # orthonormal basis of the span, [n_params, len(ks)]
    w = torch.cat([adapter.weight(n).double().reshape(-1).to(basis.device) for n in names])
    change = -(basis @ (basis.T @ w))
    out, i = {}, 0
    for n in names:
        size = subnetworks[n][0].numel()
        out[n] = change[i : i + size].reshape(subnetworks[n].shape[1:])
        i += size
    return out


@contextlib.contextmanager
def edit_weights(adapter: Adapter, changes: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add TL-layout changes to the model's parameters for the body; restore exactly after,
    even if the body raises. Names can share one Parameter (tied weights, e.g. W_E and W_U):
    each Parameter is saved once before any change, gets the sum of its names' changes (each
    converted to the native layout), and is restored from that first snapshot."""
    params: dict[int, torch.nn.Parameter] = {}
    names: dict[int, list[str]] = {}
    for name in changes:
        param = adapter.native_parameter(name)
        params[id(param)] = param
        names.setdefault(id(param), []).append(name)
    saved = {}
    try:
        with torch.no_grad():
            for key, param in params.items():
                saved[key] = param.detach().clone()
            for key, param in params.items():
                total = sum(adapter.to_native(n, changes[n].to(param.device)) for n in names[key])
                param.add_(total.to(param.dtype))
        yield
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                params[key].copy_(value)


def perturbed_forward(adapter: Adapter, changes: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Outputs at W0 + changes, computed functionally (the model is not edited)."""
    overrides = {n: adapter.weight(n) + c.to(adapter.weight(n).dtype) for n, c in changes.items()}
    with adapter.session(), torch.no_grad():
        return adapter.functional_forward(overrides, inputs)
