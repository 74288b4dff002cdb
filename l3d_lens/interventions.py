"""Moving the model along subnetworks: W0 + sum_j delta_j v_j, or projecting subnetworks out
of the weights (ablation). ``intervene`` edits the user's model in place for the body of a
``with`` block and restores every touched parameter bit-exactly afterwards, even if the body
raises; ``perturbed_forward`` does the same computation functionally, without editing."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Optional, Union

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


def check_subnetwork(subnetwork: int, n_subnetworks: int) -> int:
    """One subnetwork index as an int in 0..n_subnetworks-1 (an int, numpy integer or 0-d
    integer tensor), for the analyses of a single subnetwork: a list or a one-element tensor
    is refused, as indexing with it would add an axis and mix or misplace the results."""
    k = None if getattr(subnetwork, "ndim", 0) else as_index(subnetwork)
    if k is None:
        raise ValueError(f"subnetwork must be one int in 0..{n_subnetworks - 1} (this analysis takes a single "
                         f"subnetwork), got {subnetwork!r}")
    if not 0 <= k < n_subnetworks:
        raise ValueError(f"subnetwork {k} out of range; valid: 0..{n_subnetworks - 1}")
    return k


def listed(value: object) -> Optional[list]:
    """The items of a list-like ``value`` (a list, tuple, tensor, array ...); None for a string,
    bytes or anything not iterable (a bool, a 0-d bool tensor)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return list(value)
    except TypeError:
        return None


def finite_floats(items: list, error: Callable[[object], str]) -> list[float]:
    """``items`` as floats; ValueError ``error(item)`` for the first that is not a finite real
    number (strings, bools and complex numbers included)."""
    out = [as_number(d) for d in items]
    for d, x in zip(items, out):
        if x is None or not math.isfinite(x):
            raise ValueError(error(d))
    return out


def check_deltas(delta: Deltas, n: int) -> list[float]:
    """One finite float per subnetwork: a single number is used for all n."""
    one = as_number(delta)
    ds = [one] * n if one is not None else listed(delta)
    if ds is None:
        raise ValueError(f"delta must be a finite number or a list of {n} (one per subnetwork), got {delta!r}")
    if len(ds) != n:
        raise ValueError(f"{len(ds)} deltas for {n} subnetworks; give one delta or one per subnetwork")
    return finite_floats(ds, lambda d: f"delta must be a finite number, got {d!r}")


def check_intervention(subnetwork: Subnets, delta: Optional[Deltas], ablate: bool,
                       n_subnetworks: int) -> tuple[list[int], Optional[list[float]]]:
    """The subnetworks and deltas of an intervention (deltas None: ablate). ``delta`` None means
    the default step 1.0, so a delta given with ``ablate=True``, which ablation would silently
    ignore, is told apart and refused."""
    ks = check_subnetworks(subnetwork, n_subnetworks)
    if not ablate:
        return ks, check_deltas(1.0 if delta is None else delta, len(ks))
    if delta is not None:
        raise ValueError(f"delta={delta!r} with ablate=True: ablation projects span{{v_j}} out of the weights and "
                         f"takes no delta; pass either delta or ablate=True")
    return ks, None


def moved(weight: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """``weight + change`` summed in float64 and rounded once to the weight's dtype: rounding
    the change to the dtype and then the sum (twice) missed the nearest bfloat16 to W0 + delta v
    in ~1 entry of 10. ``intervene`` and ``perturbed_forward`` both move weights so, and agree
    bit for bit."""
    return (weight.double() + change.to(weight.device, torch.float64)).to(weight.dtype)


def check_finite(adapter: Adapter, changes: dict[str, torch.Tensor], deltas: list[float]) -> None:
    """Refuse changes that take a finite weight out of its dtype's range (W0 + change inf or NaN,
    e.g. delta=1e40 on a float32 model). Only the weights are checked: a delta that leaves them
    finite can still overflow the forward pass."""
    for name, change in changes.items():
        w = adapter.weight(name)
        if (torch.isfinite(w) & ~torch.isfinite(moved(w, change))).any():
            shown = deltas[0] if len(deltas) == 1 else deltas
            raise ValueError(f"delta {shown} makes {name} non-finite in {w.dtype} (W0 + delta v overflows); "
                             f"use a smaller |delta|")


def weight_changes(adapter: Adapter, subnetworks: dict[str, torch.Tensor], ks: list[int],
                   deltas: list[float] | None) -> dict[str, torch.Tensor]:
    """TL-layout change per weight: sum_j delta_j v_j (refused if it overflows a weight's dtype),
    or (deltas None) minus the projection of the current weights onto span{v_j} (joint over all
    decomposed weights)."""
    names = list(subnetworks)
    if deltas is not None:
        changes = {n: sum(d * subnetworks[n][k].double() for k, d in zip(ks, deltas)) for n in names}
        check_finite(adapter, changes, deltas)
        return changes
    flat_v = torch.cat([subnetworks[n][ks].double().reshape(len(ks), -1) for n in names], 1)
    basis = span_basis(flat_v.T, torch.finfo(subnetworks[names[0]].dtype).eps)
    w = torch.cat([adapter.weight(n).double().reshape(-1).to(basis.device) for n in names])
    change = -(basis @ (basis.T @ w))
    out, i = {}, 0
    for n in names:
        size = subnetworks[n][0].numel()
        out[n] = change[i : i + size].reshape(subnetworks[n].shape[1:])
        i += size
    return out


def span_basis(vectors: torch.Tensor, eps: float) -> torch.Tensor:
    """Orthonormal basis [n, r] of the span of the columns of ``vectors`` [n, m], r = its rank:
    left singular vectors above 64 m eps times the largest, with ``eps`` the machine epsilon of
    the dtype the vectors were computed in (float32 subnetworks: float32's, even when projected
    in float64). So linearly dependent subnetworks (v1 = v0, v1 = 3 v0, v1 = 0), whose rounding
    noise is ~1e-8 of the largest in float32, add no direction outside the span (QR would give
    every column one), while distinct ones are kept however many weights they span: the
    tolerance does not grow with n (n eps would exceed 1 from n ~ 8e6 weights in float32)."""
    u, s, _ = torch.linalg.svd(vectors, full_matrices=False)
    tol = s.max() * 64 * vectors.shape[1] * eps
    return u[:, s > tol]


#: id(Parameter) -> the WeightEdits active on it, in the order they were entered
ACTIVE: dict[int, list["WeightEdit"]] = {}


class WeightEdit:
    """Context manager: TL-layout changes added to the model's parameters for the body, and
    restored exactly after, even if the body raises. ``changes`` may be a function giving
    them, called on each entering of the block (an ablation projects the weights as they are
    then, not when the context was made). Reusable: each entering takes a fresh snapshot; one
    already active cannot be entered again.
    Names can share one Parameter (tied weights, e.g. W_E and W_U): each Parameter is saved
    once before any change, gets the sum of its names' changes (each converted to the native
    layout), and is restored from that snapshot.
    Edits exited out of order (``a`` entered, then ``b``, then ``a`` exited first) warn
    "interventions exited out of order": each exit still restores its own snapshot, and
    hands it on to the edit entered just after it, so the weights from before the first edit
    are what remains once all have exited. One entered by hand (``__enter__``) and never exited
    leaves the weights edited (and stays in ``ACTIVE``): use ``with``."""

    def __init__(self, adapter: Adapter,
                 changes: Union[dict[str, torch.Tensor], Callable[[], dict[str, torch.Tensor]]]):
        self.adapter = adapter
        self.changes = changes
        self.params: dict[int, torch.nn.Parameter] = {}
        self.saved: dict[int, torch.Tensor] = {}

    def __enter__(self) -> None:
        if self.params:
            raise RuntimeError("this intervention is already active: exit it before entering it again")
        changes = self.changes() if callable(self.changes) else self.changes
        names: dict[int, list[str]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for name in changes:
            param = self.adapter.native_parameter(name)
            params[id(param)] = param
            names.setdefault(id(param), []).append(name)
        with torch.no_grad():
            saved = {key: param.detach().clone() for key, param in params.items()}
            self.params, self.saved = params, saved
            for key in params:
                ACTIVE.setdefault(key, []).append(self)
            try:
                for key, param in params.items():
                    total = sum(self.adapter.to_native(n, changes[n].to(param.device, torch.float64))
                                for n in names[key])
                    param.copy_(moved(param, total))
            except BaseException:
                self.__exit__(None, None, None)
                raise

    def __exit__(self, *exc_info: object) -> None:
        late = []
        with torch.no_grad():
            for key, param in self.params.items():
                stack = ACTIVE[key]
                i = stack.index(self)
                param.copy_(self.saved[key])
                if i + 1 < len(stack):  # an edit entered after this one is still active on it
                    stack[i + 1].saved[key] = self.saved[key]
                    late.append(key)
                del stack[i]
                if not stack:
                    del ACTIVE[key]
        self.params, self.saved = {}, {}
        if late:
            warnings.warn("interventions exited out of order: one entered after this one is still active. The "
                          "weights both touch are back as they were before this one (the later one's change is "
                          "gone too), and the later one's exit leaves them so; exit interventions in the reverse "
                          "order of entering them (nest the with blocks)", RuntimeWarning, stacklevel=2)


def edit_weights(adapter: Adapter, changes: Union[dict[str, torch.Tensor], Callable[[], dict[str, torch.Tensor]]]
                 ) -> WeightEdit:
    """A ``WeightEdit``: ``changes`` added to the model's weights for the body of a ``with``."""
    return WeightEdit(adapter, changes)


def perturbed_forward(adapter: Adapter, changes: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Outputs at W0 + changes, computed functionally (the model is not edited)."""
    overrides = {n: moved(adapter.weight(n), c) for n, c in changes.items()}
    with adapter.session(), torch.no_grad():
        return adapter.functional_forward(overrides, inputs)
