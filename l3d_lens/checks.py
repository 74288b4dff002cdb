"""How l3d_lens reads an index or a number a user gives: Python, numpy or 0-d tensor values
alike, never a bool (True is an int to Python, not a subnetwork, a seed or a delta)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch


def is_int(value: object) -> bool:
    """A Python int and not a bool (True is an int to Python, not a count or a seed to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A Python int or float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_index(value: object) -> Optional[int]:
    """``value`` as an int if ``operator.index`` takes it (int, numpy integer, one-element
    integer tensor such as ``fraction_active.argmax()``), else None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_number(value: object) -> Optional[float]:
    """``float(value)`` for a real number (int, float, numpy scalar, 0-d tensor or numpy array),
    else None. A number beyond float's range (``10**400``) is +-inf, so a finiteness check
    refuses it as it refuses ``1e400``, rather than an OverflowError escaping."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        try:
            t = torch.as_tensor(value)
        except (TypeError, RuntimeError):
            return None
        if t.dim() == 0 and t.dtype != torch.bool and not t.dtype.is_complex:
            return float(t)
    return None
