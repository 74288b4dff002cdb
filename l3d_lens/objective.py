"""L3D's objective: batch top-k on the coefficients, then the normalised L2 error of
reconstructing each sample's gradient from the kept coefficients,
sum_i ||g_i - V_out c_i||^2 / sum_i ||g_i||^2, expanded so that no g_i is ever needed:
||g||^2 - 2 c.(V_out^T g) + c^T (V_out^T V_out) c. ``loss_terms`` also gives the per-sample
form, mean_i ||g_i - V_out c_i||^2 / ||g_i||^2 (``L3DConfig.loss_norm``).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float

from .config import LOSS_NORMS, _choice


def topk_mask(coef: Float[torch.Tensor, "s k"], top_k: float) -> Bool[torch.Tensor, "s k"]:
    """Keep the top_k fraction of |coefficients| over the whole batch and all subnetworks."""
    numel = coef.numel()
    keep = numel if top_k >= 1 else max(1, int(round(top_k * numel)))
    if keep >= numel:
        return torch.ones_like(coef, dtype=torch.bool)
    idx = coef.detach().abs().flatten().topk(keep).indices
    return torch.zeros(numel, dtype=torch.bool, device=coef.device).index_fill_(0, idx, True).view_as(coef)


def sample_errors(A: Float[torch.Tensor, "s k"], B: Float[torch.Tensor, "s k"], gsq: Float[torch.Tensor, " s"],
                  G: Float[torch.Tensor, "k k"], mask: Bool[torch.Tensor, "s k"]) -> Float[torch.Tensor, " s"]:
    """||g_i - V_out c_i||^2 per sample, with c = A masked."""
    c = A * mask
    return gsq - 2 * (c * B).sum(-1) + ((c @ G) * c).sum(-1)


def loss_terms(errors: Float[torch.Tensor, " s"], gsq: Float[torch.Tensor, " s"],
               loss_norm: str = "batch") -> tuple[torch.Tensor, float]:
    """(numerator, denominator) of the loss over a batch, kept apart so that they can be summed
    over steps and processes: "batch": (sum_i e_i, sum_i ||g_i||^2); "sample": (sum_i
    e_i / ||g_i||^2, number of samples with g_i != 0); a zero gradient has nothing to
    reconstruct, so it counts in neither."""
    _choice("loss_norm", loss_norm, LOSS_NORMS)
    g = gsq.detach()
    if loss_norm == "batch":
        return errors.sum(), g.sum().item()
    nonzero = g > 0
    return (errors * (1 / torch.where(nonzero, g, torch.inf))).sum(), float(nonzero.sum().item())


def l3d_loss(A, B, gsq, G, top_k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised reconstruction loss, top-k mask)."""
    mask = topk_mask(A, top_k)
    return sample_errors(A, B, gsq, G, mask).sum() / gsq.sum(), mask



def aux_errors(A: Float[torch.Tensor, "s k"], B: Float[torch.Tensor, "s k"], errors: Float[torch.Tensor, " s"],
               G_frozen: Float[torch.Tensor, "k k"], G: Float[torch.Tensor, "k k"], mask: Bool[torch.Tensor, "s k"],
               aux_mask: Bool[torch.Tensor, "s k"]) -> Float[torch.Tensor, " s"]:
    """AuxK: ||e_i - V_out c_aux_i||^2 per sample, where e_i = g_i - V_out c_i is the main
    residual (held fixed) and c_aux keeps the top coefficients of the dead subnetworks.
    V_out^T e = B - c G_frozen, with G_frozen[l, j] = <V_l (fixed), V_j>."""
    c = (A * mask).detach()
    c_aux = A * aux_mask
    v_dot_e = B - c @ G_frozen
    return errors.detach() - 2 * (c_aux * v_dot_e).sum(-1) + ((c_aux @ G) * c_aux).sum(-1)
