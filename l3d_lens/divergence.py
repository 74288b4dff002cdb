"""Divergences D(f(x_i), y_r) between a sample's output and its reference, per sample.

KL is D = KL(reference || model) over the next-token distribution, as in the paper's code;
MSE is D = 1/2 ||f(x) - y_r||^2, whose gradient is J^T (f(x) - y_r). The overall scale of D
does not matter to L3D (its loss is normalised). A user callable takes (output, target)
and returns one value per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from jaxtyping import Float

Divergence = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs in float32 for a divergence: a bfloat16 log-softmax rounds to
    about 0.03 at typical logits, which swamps the small differences a divergence measures;
    float32 and float64 pass through as they are (the same tensor)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def target_space(outputs: torch.Tensor, divergence: Divergence) -> torch.Tensor:
    """Map raw outputs (logits) to the space references live in: log-probs for KL."""
    if divergence == "kl":
        return wide(outputs).log_softmax(-1)
    return outputs


def divergence_fn(divergence: Divergence) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if divergence == "kl":
        return kl
    if divergence == "mse":
        return mse
    if callable(divergence):
        return divergence
    raise ValueError(f"unknown divergence {divergence!r}; choose 'kl', 'mse' or a callable")


def kl(logits: Float[torch.Tensor, "*b v"], ref_logprobs: Float[torch.Tensor, "*b v"]) -> Float[torch.Tensor, "*b"]:
    """KL(reference || model) from model logits and reference log-probabilities (in float32
    at least: ``wide``)."""
    ref_logprobs = wide(ref_logprobs)
    return (ref_logprobs.exp() * (ref_logprobs - wide(logits).log_softmax(-1))).sum(-1)


def mse(output: Float[torch.Tensor, "*b d"], target: Float[torch.Tensor, "*b d"]) -> Float[torch.Tensor, "*b"]:
    return 0.5 * (wide(output) - wide(target)).pow(2).sum(-1)
