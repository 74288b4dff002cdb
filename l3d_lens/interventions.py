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

Subnets = Union[int, Sequence[int]]
Deltas = Union[float, Sequence[float]]


def check_subnetworks(subnetwork: Subnets, n_subnetworks: int) -> list[int]:
    ks = [subnetwork] if isinstance(subnetwork, int) else list(subnetwork)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ValueError(f"subnetwork must be an int or a non-empty list of ints, got {subnetwork!r}")
    bad = [k for k in ks if not 0 <= k < n_subnetworks]
    if bad:
        raise ValueError(f"subnetwork {bad[0]} out of range; valid: 0..{n_subnetworks - 1}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"subnetwork list {ks} repeats an index")
    return ks


def check_deltas(delta: Deltas, n: int) -> list[float]:
    ds = [delta] * n if isinstance(delta, (int, float)) and not isinstance(delta, bool) else list(delta)
    if len(ds) != n:
        raise ValueError(f"{len(ds)} deltas for {n} subnetworks; give one delta or one per subnetwork")
    for d in ds:
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d):
            raise ValueError(f"delta must be a finite number, got {d!r}")
    return [float(d) for d in ds]


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
    """Add TL-layout changes to the model's parameters for the body; restore exactly after."""
    saved = {}
    try:
        with torch.no_grad():
            for name, change in changes.items():
                param = adapter.native_parameter(name)
                saved[name] = param.detach().clone()
                param.add_(adapter.to_native(name, change.to(device=param.device, dtype=param.dtype)))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                adapter.native_parameter(name).copy_(value)


def perturbed_forward(adapter: Adapter, changes: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Outputs at W0 + changes, computed functionally (the model is not edited)."""
    overrides = {n: adapter.weight(n) + c.to(adapter.weight(n).dtype) for n, c in changes.items()}
    with adapter.session(), torch.no_grad():
        return adapter.functional_forward(overrides, inputs)
