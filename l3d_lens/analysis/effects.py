"""What a subnetwork does *through* each head and neuron: the first-order change of the
divergence when that unit's output is scaled, along the subnetwork.

Where a subnetwork's norm lies (``attribution``) depends on the parameterisation: weights that
see large activations carry large gradients whether or not the unit matters. This readout asks
instead how the subnetwork changes what the unit writes. Scaling head h's output by (1 + a) is
the same as scaling its W_O[h] (or its W_V[h] and b_V[h]) by (1 + a), so the derivative of the
divergence along it is <g|W_O[h], W_O[h]>: attribution patching of zero-ablating the head, in
parameter space. For subnetwork k the per-unit effect is e_k(u) = <v_k|u, W0|u>, and sample i
gets c_ik * e_k(u) of it (c_ik = V_in[k] . g_i); summed over k this is the reconstructed
gradient's own effect through u. Neurons use their W_out row, an MLP layer its W_out and b_out.
W_Q and W_K are left out: scaling them changes the attention temperature, not the output.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from jaxtyping import Float

HEAD_ROUTES = {"O": ("W_O",), "V": ("W_V", "b_V")}


def _by_kind(subnetworks: Mapping[str, torch.Tensor], sites) -> dict[tuple[int, str], str]:
    return {(sites[n].layer, sites[n].kind): n for n in subnetworks if sites[n].layer is not None}


def _inner(v: torch.Tensor, w: torch.Tensor, unit_axis: int) -> torch.Tensor:
    """[k, n_units] inner products of each subnetwork slice with the weight slice along
    ``unit_axis`` of the weight."""
    prod = v.detach().double() * w.detach().double().to(v.device)[None]
    return prod.movedim(1 + unit_axis, 1).reshape(v.shape[0], w.shape[unit_axis], -1).sum(-1)


def _decomposed(n_units: int, indices: Optional[Sequence[int]]) -> torch.Tensor:
    """[n_units] bool: the units of a weight that are decomposed (``indices`` of a head or neuron
    slice; None: all)."""
    if indices is None:
        return torch.ones(n_units, dtype=torch.bool)
    mask = torch.zeros(n_units, dtype=torch.bool)
    mask[list(indices)] = True
    return mask


def scaling_effects(subnetworks: Mapping[str, Float[torch.Tensor, "k ..."]], weights: Mapping[str, torch.Tensor],
                    sites, n_layers: int, n_heads: int, d_mlp: int,
                    slices: Optional[Mapping[str, Optional[Sequence[int]]]] = None) -> dict[str, torch.Tensor]:
    """Signed e_k(u) for every head, MLP layer and neuron: ``heads`` [k, n_layers, n_heads],
    ``mlp`` [k, n_layers], ``neurons`` [k, n_layers, d_mlp] (float64). A head's effect is the
    mean of its W_O route and its W_V (+ b_V) route, whichever decompose that head; NaN for a
    head no route covers (only W_Q decomposed, or outside a head slice), a neuron outside the
    decomposed W_out (slice), and an MLP whose W_out is not decomposed. ``slices``: the head or
    neuron indices each weight's selection kept (None or missing: the whole weight)."""
    slices = slices or {}
    k = next(iter(subnetworks.values())).shape[0]
    nan = float("nan")
    heads = torch.full((k, n_layers, n_heads), nan, dtype=torch.float64)
    mlp = torch.full((k, n_layers), nan, dtype=torch.float64)
    neurons = torch.full((k, n_layers, max(d_mlp, 1)), nan, dtype=torch.float64)
    names = _by_kind(subnetworks, sites)
    for layer in range(n_layers):
        total, count = torch.zeros(k, n_heads, dtype=torch.float64), torch.zeros(n_heads, dtype=torch.float64)
        for kinds in HEAD_ROUTES.values():
            if (layer, kinds[0]) not in names:  # a route needs its weight, not just a bias
                continue
            present = [names[(layer, kind)] for kind in kinds if (layer, kind) in names]
            mask = _decomposed(n_heads, slices.get(present[0])).double()
            total += mask * sum(_inner(subnetworks[n].cpu(), weights[n], sites[n].modes.index("head"))
                                for n in present)
            count += mask
        heads[:, layer] = torch.where(count > 0, total / count.clamp_min(1), nan)
        if (layer, "W_out") in names:
            n = names[(layer, "W_out")]
            axis = sites[n].modes.index("d_mlp")
            per = _inner(subnetworks[n].cpu(), weights[n], axis)
            mask = _decomposed(per.shape[1], slices.get(n))
            neurons[:, layer, : per.shape[1]] = torch.where(mask, per, nan)
            total = per.sum(1)
            if (layer, "b_out") in names:
                b = names[(layer, "b_out")]
                total = total + _inner(subnetworks[b].cpu()[:, None], weights[b][None], 0)[:, 0]
            mlp[:, layer] = total
    return {"heads": heads, "mlp": mlp, "neurons": neurons}


def shares(effects: torch.Tensor) -> torch.Tensor:
    """|e_k(u)| as a share of subnetwork k's total over all units of ``effects`` [k, ...]
    (each row sums to 1; NaN units count as 0; a subnetwork with no effect stays all 0)."""
    e = torch.nan_to_num(effects.abs(), nan=0.0)
    return e / e.flatten(1).sum(1).clamp_min(1e-300).view(-1, *([1] * (e.dim() - 1)))


def weighted(effects: torch.Tensor, coefficients: Float[torch.Tensor, "n k"]) -> torch.Tensor:
    """Per subnetwork: mean_i |c_ik| * |e_k(u)|, the typical size of subnetwork k's effect
    through each unit on these samples. ``effects`` is [k, ...]."""
    scale = coefficients.abs().double().mean(0).cpu()
    return effects.abs() * scale.view(-1, *([1] * (effects.dim() - 1)))


def combined(effects: torch.Tensor, coefficients: Float[torch.Tensor, "n k"]) -> torch.Tensor:
    """One score per unit: mean_i |sum_k c_ik e_k(u)|, the reconstructed gradient's effect
    through the unit, averaged over samples (NaN stays NaN)."""
    flat = effects.reshape(effects.shape[0], -1)
    per_sample = coefficients.double().cpu() @ torch.nan_to_num(flat, nan=0.0)
    out = per_sample.abs().mean(0)
    out[torch.isnan(flat).all(0)] = math.nan
    return out.reshape(effects.shape[1:])
