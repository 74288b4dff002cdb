"""Attention patterns of chosen heads on one sequence, read from the TransformerLens hook
points ``blocks.{l}.attn.hook_pattern`` that HookedTransformer and TransformerBridge both
expose. ``run_with_cache`` adds its hooks for the one forward pass only; the model's
train/eval mode is restored by the adapter session."""

from __future__ import annotations

from typing import Optional

import torch


def pattern_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def can_read_patterns(model: torch.nn.Module, layers: list[int]) -> bool:
    hook_dict = getattr(model, "hook_dict", None)
    return (isinstance(hook_dict, dict) and hasattr(model, "run_with_cache")
            and all(pattern_hook_name(layer) in hook_dict for layer in layers))


def head_patterns(dec, tokens: torch.Tensor, heads: list[tuple[int, int]]) -> Optional[torch.Tensor]:
    """[len(heads), seq, seq] attention patterns (destination x source) of ``heads`` (layer,
    head) on the 1-D token sequence ``tokens``; None if the model exposes no pattern hooks."""
    model = dec.model
    layers = sorted({layer for layer, _ in heads})
    if not heads or not can_read_patterns(model, layers):
        return None
    names = [pattern_hook_name(layer) for layer in layers]
    with dec.adapter.session(), torch.no_grad():
        _, cache = model.run_with_cache(tokens[None].to(dec.adapter.device), names_filter=lambda n: n in names)
        patterns = {layer: cache[pattern_hook_name(layer)][0].detach().to("cpu", torch.float64) for layer in layers}
    del cache
    return torch.stack([patterns[layer][head] for layer, head in heads])
