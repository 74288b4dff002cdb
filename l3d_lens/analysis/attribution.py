"""Where a subnetwork lives: its squared norm split over attention heads (per Q/K/V/O and
bias), MLP neurons and every other decomposed weight. Shares sum to 1 per subnetwork over
everything decomposed, and are computed in TransformerLens layout, so they are the same
whichever TransformerLens generation or weight layout the model uses, with one exception: a
gated MLP's b_in, which HookedTransformer adds after the product, act(x W_gate) * (x W_in) + b_in,
and the bridge inside it (up_proj's bias), act(x W_gate) * (x W_in + b_in): a different weight
with different gradients, so its shares differ."""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float

COLUMNS = ["subnetwork", "weight", "kind", "layer", "head", "neuron", "share"]


def _frames(subnetworks: dict[str, torch.Tensor], sites) -> list[pd.DataFrame]:
    """One frame per weight: a row per (subnetwork, head or neuron, or the whole weight). The
    squares and their total are taken in float64, so that the shares sum to 1 to float64
    rounding whatever the factors' dtype (a float32 total left errors of ~1e-7)."""
    squares = {k: v.detach().cpu().double().pow(2) for k, v in subnetworks.items()}  # a GPU model's: for numpy
    total = sum(sq.reshape(sq.shape[0], -1).sum(1) for sq in squares.values())
    frames = []
    for name, sq in squares.items():
        site = sites[name]
        k = sq.shape[0]
        unit = "head" if "head" in site.modes else "neuron" if "d_mlp" in site.modes else None
        if unit:
            axis = 1 + site.modes.index("head" if unit == "head" else "d_mlp")
            per = sq.movedim(axis, 1).reshape(k, sq.shape[axis], -1).sum(-1) / total[:, None]
        else:
            per = (sq.reshape(k, -1).sum(-1) / total)[:, None]
        n = per.shape[1]
        index = torch.arange(n).repeat(k).numpy()
        frames.append(pd.DataFrame({
            "subnetwork": torch.arange(k).repeat_interleave(n).numpy(), "weight": name, "kind": site.kind,
            "layer": site.layer if site.layer is not None else pd.NA,
            "head": index if unit == "head" else pd.NA, "neuron": index if unit == "neuron" else pd.NA,
            "share": per.reshape(-1).numpy()}))
    return frames


def attribution(subnetworks: dict[str, torch.Tensor], sites) -> pd.DataFrame:
    """Every piece of every subnetwork: columns subnetwork, weight, kind, layer, head, neuron, share."""
    df = pd.concat(_frames(subnetworks, sites), ignore_index=True)[COLUMNS]
    for col in ("layer", "head", "neuron"):
        df[col] = df[col].astype("Int64")
    return df


def head_attribution(df: pd.DataFrame) -> pd.DataFrame:
    """Rows on attention heads: subnetwork, layer, head, kind (W_Q/W_K/W_V/W_O/b_Q/...), share."""
    heads = df[df["head"].notna()]
    return heads[["subnetwork", "layer", "head", "kind", "share"]].reset_index(drop=True)


def neuron_attribution(df: pd.DataFrame) -> pd.DataFrame:
    """Rows on MLP neurons, summed over every decomposed weight with a neuron axis (W_in, b_in,
    W_out, and a gated MLP's W_gate and, in the bridge, b_gate): subnetwork, layer, neuron,
    share. A gated MLP's b_in is HookedTransformer's (added after act(x W_gate) * (x W_in)) or
    the bridge's (up_proj's bias, inside the product), so the two generations' sums differ by it."""
    neurons = df[df["neuron"].notna()]
    return neurons.groupby(["subnetwork", "layer", "neuron"], as_index=False)["share"].sum()


def head_tensor(df: pd.DataFrame, n_subnetworks: int, n_layers: int, n_heads: int) -> Float[torch.Tensor, "k layer head"]:
    """[n_subnetworks, n_layers, n_heads] share per head (every decomposed Q/K/V/O weight and
    head bias: under grouped-query attention with fewer key/value heads than query heads K and V
    are not decomposed, so only Q, O and b_Q),
    laid out like TransformerLens patching results; float64, as the shares are."""
    out = torch.zeros(n_subnetworks, n_layers, n_heads, dtype=torch.float64)
    heads = head_attribution(df).groupby(["subnetwork", "layer", "head"], as_index=False)["share"].sum()
    for row in heads.itertuples(index=False):
        out[int(row.subnetwork), int(row.layer), int(row.head)] = row.share
    return out
