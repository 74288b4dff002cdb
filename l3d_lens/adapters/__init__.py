"""Model adapters: one interface over HookedTransformer, TransformerBridge and nn.Module."""

from __future__ import annotations

from torch import nn

from .base import POSITIONS, TOKENS, Adapter, Site
from .bridge import BridgeAdapter
from .hooked import HookedAdapter
from .module import ModuleAdapter

__all__ = ["Adapter", "Site", "TOKENS", "POSITIONS", "make_adapter"]


def _class_names(model: nn.Module) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def make_adapter(model: nn.Module) -> Adapter:
    """Pick the adapter for a model by its class (no TransformerLens import needed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a HookedTransformer, a TransformerBridge or a torch.nn.Module, got {type(model).__name__}"
        )
    names = _class_names(model)
    if "HookedTransformer" in names:
        return HookedAdapter(model)
    if "TransformerBridge" in names:
        return BridgeAdapter(model)
    if "HookedEncoder" in names or "HookedEncoderDecoder" in names:
        raise TypeError(f"{type(model).__name__} is not supported; use a decoder-only HookedTransformer or TransformerBridge")
    return ModuleAdapter(model)
