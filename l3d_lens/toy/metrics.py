"""Ground-truth recovery metrics for a ``Decomposition`` of a model whose answer is known.

Every function takes plain tensors or a ``Decomposition`` and knows nothing of how the model
was trained, so any model with a known answer can use them; those that read a
circuit-superposition model's W_in or W_out take the weights' names (``w_in=``, ``w_out=``,
``weight=``; by default ``SuperpositionModel``'s ``encoder.weight`` and ``decoder.weight``):

- ``feature_r2``: how well the model itself computes each feature's output (x^2: a feature
  it never learned has no circuit to find).
- ``reconstruction_error``: L3D's own normalised error on held-out data.
- ``cosine_matrix`` / ``mean_max_cosine``: |cos| between subnetworks and the true per-feature
  parameter directions (subnetwork signs are arbitrary), scored as APD/SPD score TMS.
- ``gradient_directions``: the principal direction of each feature's own gradients, a
  reference for the cosine scores.
- ``assign``: the one-to-one matching of features to subnetworks that maximises a score.
- ``output_effects`` / ``coefficient_r2`` / ``circuit_recovery``: recover TMCS's A from
  subnetworks and score it; ``model_circuit_matrix``: the A the model itself computes, a
  reference for them; ``rank_bound_r2``: the best r^2 a rank-limited matrix can reach.
- ``signed_gradient_directions`` / ``sign_alignment``: does the model serve both signs of a
  feature with one parameter direction?
- ``feature_activity``, ``group_of_subnetworks``, ``live_per_group``, ``dead_fraction``.
- ``perturbed`` (weights at W0 + delta * v, restored bit-identically), ``intervention_change``
  and ``selectivity``: does moving along a subnetwork change only its own outputs?

The metrics that run the model run it in eval mode (``eval_mode``: every module's own mode comes
back after), as L3D does: a model left in train mode would otherwise apply dropout and update its
BatchNorm statistics, so that even delta = 0 changed the outputs.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from jaxtyping import Bool, Float
from torch import nn

from ..adapters.base import eval_mode
from ..checks import as_index
from .data import active_features, check_group_size, single_feature_rows

Directions = Mapping[str, torch.Tensor]  # weight name -> [n, *weight shape]


def _check_inputs(model: Optional[nn.Module], x: torch.Tensor) -> None:
    """ValueError unless ``x`` is a [n, d_in] batch in the model's parameter dtype, on its
    device, that the model takes (one no-grad row in eval mode, every module's mode restored
    after): otherwise a float64 batch, a CPU batch for a GPU model or one of another width fails
    deep inside F.linear."""
    param = None if model is None else next(model.parameters(), None)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [n, d_in] tensor, got {type(x).__name__} "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
    if param is None:
        return
    if x.dtype != param.dtype:
        raise ValueError(f"x is {x.dtype} but the model's parameters are {param.dtype}; pass x.to({param.dtype})")
    if x.device != param.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {param.device}; "
                         f"pass x.to({str(param.device)!r})")
    try:
        with torch.no_grad(), eval_mode(model):
            model(x[:1])
    except RuntimeError as e:
        raise ValueError(f"the model does not take x of shape {tuple(x.shape)}: {e}") from e


def _check_names(names: Any) -> list[str]:
    """``names`` as a non-empty list of weight names (a single string is a common slip)."""
    if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must be a non-empty list of weight names, e.g. ['layers.0.weight'], got {names!r}")
    return list(names)


# --- the model itself -----------------------------------------------------------------------

def feature_r2(model: nn.Module, x: Float[torch.Tensor, "n f"], y: Float[torch.Tensor, "n f"]) -> list[float]:
    """r^2 of output i against target ``y[:, i]`` on the rows where input feature i is active,
    per feature: how well the model computes each feature's own output (x^2: a feature it never
    learned scores <= 0, a constant output for it). NaN for a feature that is never active or
    whose target is constant there."""
    _check_inputs(model, x)
    with torch.no_grad(), eval_mode(model):
        fx = model(x)
    if y.shape != fx.shape:
        raise ValueError(f"y must have the model's output shape {tuple(fx.shape)}, got {tuple(y.shape)}")
    y = y.to(fx.device)
    act = active_features(x)
    out = []
    for i in range(x.shape[1]):
        rows = act[:, i]
        t, f = y[rows, i].double(), fx[rows, i].double()
        total = ((t - t.mean()) ** 2).sum()
        out.append(float(1 - ((f - t) ** 2).sum() / total) if rows.any() and total > 0 else float("nan"))
    return out


# --- reconstruction and activity ------------------------------------------------------------

def reconstruction_error(dec, data: torch.Tensor, seed: Optional[int] = None) -> float:
    """sum_i ||g_i - g_hat_i||^2 / sum_i ||g_i||^2 on ``data`` with the decomposition's top-k
    (random references drawn from ``seed``): the paper's reported "reconstruction error"."""
    return float(dec.reconstruction_error(data, seed=seed))


def dead_fraction(dec) -> float:
    """Fraction of subnetworks never in the top-k set over the last training epoch (P_act = 0)."""
    return float((dec.fraction_active == 0).double().mean())


def feature_activity(dec, x: Float[torch.Tensor, "n f"], group_size: int = 1,
                     seed: Optional[int] = None, signed: bool = False) -> Float[torch.Tensor, "g k"]:
    """Share of each subnetwork in the mean |coefficient| of the rows where exactly one feature
    (or group of ``group_size`` features) is active: row g sums to 1 (NaN if there is no such
    row, or no subnetwork has a coefficient on those rows).
    A clean decomposition has one dominant subnetwork per row. ``signed=True`` (features only)
    splits every feature by the sign of its value: row 2i is feature i > 0, row 2i + 1 is i < 0."""
    if signed and group_size != 1:
        raise ValueError("signed=True needs group_size=1")
    _check_inputs(getattr(dec, "model", None), x)
    check_group_size(group_size, x.shape[1])
    coef = dec.coefficients(x, seed=seed).abs().double().to(x.device)
    n_groups = x.shape[1] // group_size
    masks = ([single_feature_rows(x, feature=f, sign=s) for f in range(n_groups) for s in (1, -1)] if signed
             else [single_feature_rows(x, group_size, feature=f) for f in range(n_groups)])
    nan = torch.full((coef.shape[1],), float("nan"), dtype=coef.dtype, device=coef.device)
    rows = []
    for sel in masks:
        mean = coef[sel].mean(0) if sel.any() else nan
        rows.append(mean / mean.sum())
    return torch.stack(rows)


# --- directions in parameter space ---------------------------------------------------------

def _flat(directions: Directions, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([directions[n].detach().double().reshape(directions[n].shape[0], -1) for n in names], dim=1)


def cosine_matrix(truth: Directions, subnetworks: Directions) -> Float[torch.Tensor, "f k"]:
    """|cos| between every true feature direction and every subnetwork, over the weights named
    in ``truth`` (subnetworks restricted to them). ``truth[name]`` is [n_features, *shape],
    ``subnetworks[name]`` is [n_subnetworks, *shape] (e.g. ``dec.subnetworks()``)."""
    names = list(truth)
    if not names:
        raise ValueError("truth names no weight; pass {weight name: [n_features, *weight shape]}")
    missing = [n for n in names if n not in subnetworks]
    if missing:
        raise KeyError(f"weights {missing} are not in the decomposition (it has {sorted(subnetworks)})")
    for n in names:  # the same layout, not only the same number of entries
        if truth[n].dim() < 2 or truth[n].shape[1:] != subnetworks[n].shape[1:]:
            raise ValueError(f"truth[{n!r}] must be [n_features, *{tuple(subnetworks[n].shape[1:])}] like the "
                             f"subnetworks' [n, *weight shape], got {tuple(truth[n].shape)}")
    for side, dirs in (("truth", truth), ("subnetworks", subnetworks)):
        _one_count(dirs, names, side)
    t = _flat(truth, names)
    s = _flat(subnetworks, names).to(t.device)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (t @ s.T).abs()


def mean_max_cosine(truth: Directions, subnetworks: Directions) -> tuple[float, Float[torch.Tensor, " f"]]:
    """(mean over features of the best |cos| any subnetwork reaches, per-feature best |cos|)."""
    best = cosine_matrix(truth, subnetworks).max(dim=1).values
    return float(best.mean()), best


def masked_weights(model: nn.Module, masks: Mapping[str, Bool[torch.Tensor, "f ..."]]) -> dict[str, torch.Tensor]:
    """Per-feature true directions from the model's own weights W0: ``masks[name]`` is
    [n_features, *shape] and selects which entries of weight ``name`` belong to each feature."""
    params = dict(model.named_parameters())
    return {n: params[n].detach()[None] * m.to(device=params[n].device, dtype=params[n].dtype)
            for n, m in masks.items()}


#: what the weight-name arguments of the circuit-superposition metrics name
_WEIGHT_ROLES = {"w_in": "the [hidden, d_in] weight whose input columns are the features",
                 "w_out": "the [d_out, hidden] weight from the hidden layer to the outputs"}


def _model_weight(model: nn.Module, name: str, arg: str) -> torch.Tensor:
    """The model's weight matrix ``name``, given as ``arg=``; a KeyError naming the argument and
    the model's parameters if it has none of that name (a model whose weights are not called
    ``encoder.weight`` / ``decoder.weight`` as in ``SuperpositionModel``)."""
    try:
        weight = model.get_parameter(name)
    except AttributeError:
        raise KeyError(f"the model has no weight {name!r} ({arg}=); its parameters are "
                       f"{[n for n, _ in model.named_parameters()]}: pass {arg}= {_WEIGHT_ROLES[arg]}") from None
    if weight.dim() != 2:
        raise ValueError(f"{arg}={name!r} must name {_WEIGHT_ROLES[arg]}, got a weight of shape {tuple(weight.shape)}")
    return weight


def superposition_directions(model: nn.Module, group_size: int = 1, decoder_rows: bool = False, *,
                             w_in: str = "encoder.weight", w_out: str = "decoder.weight") -> dict[str, torch.Tensor]:
    """True per-feature directions of a ``SuperpositionModel``, or of any model of its shape whose
    weights named ``w_in`` and ``w_out`` are W_in and W_out: feature i's columns of W_in
    (``encoder.weight[:, i]``, or a group's columns) and, with ``decoder_rows`` (TMS, where output
    i decodes feature i), row i of W_out. The bias is left out: its share of a feature's
    gradient depends on the feature's value, so it has no fixed true direction."""
    enc = _model_weight(model, w_in, "w_in")
    n_in = enc.shape[1]
    check_group_size(group_size, n_in)
    n_feat = n_in // group_size
    cols = torch.zeros(n_feat, *enc.shape, dtype=torch.bool, device=enc.device)
    for f in range(n_feat):
        cols[f, :, f * group_size:(f + 1) * group_size] = True
    masks = {w_in: cols}
    if decoder_rows:
        dec = _model_weight(model, w_out, "w_out")
        if dec.shape[0] != n_feat:
            raise ValueError(f"decoder_rows needs one output per feature; W_out has {dec.shape[0]} rows, {n_feat} features")
        rows = torch.zeros(n_feat, *dec.shape, dtype=torch.bool, device=dec.device)
        for f in range(n_feat):
            rows[f, f] = True
        masks[w_out] = rows
    return masked_weights(model, masks)


def gradient_directions(model: nn.Module, x: Float[torch.Tensor, "n f"], names: Sequence[str],
                        group_size: int = 1, sign: Optional[int] = None,
                        reference: str = "zero") -> dict[str, torch.Tensor]:
    """Per feature (or group), the principal direction of the per-sample gradients of the MSE
    divergence over the rows where only that feature is active (with ``sign``: only where its
    value has that sign), restricted to the weights ``names`` (NaN for a feature with no such
    row). ``reference``: "zero" (g = J^T f(x)) or "mean" (g = J^T (f(x) - mean f), the mean
    output over all of ``x``). Comparing it with ``superposition_directions`` says how far the
    model's own gradients are from the idealised per-feature directions (an empirical
    reference for ``mean_max_cosine``, not a bound: L3D also sees rows with several features);
    comparing it with the subnetworks says how closely L3D follows the gradients."""
    from torch.func import functional_call, grad, vmap

    if reference not in ("zero", "mean"):
        raise ValueError(f"reference must be 'zero' or 'mean', got {reference!r}")
    names = _check_names(names)
    _check_inputs(model, x)
    check_group_size(group_size, x.shape[1])
    params = {n: p.detach() for n, p in model.named_parameters()}
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"weights {missing} are not in the model (it has {sorted(params)})")
    with torch.no_grad(), eval_mode(model):
        ref = model(x).mean(0) if reference == "mean" else 0.0
    single = single_feature_rows(x, group_size, sign=sign)
    xs = x[single]
    n_groups, width = x.shape[1] // group_size, sum(params[n].numel() for n in names)
    u = torch.full((n_groups, width), float("nan"), dtype=torch.double, device=x.device)
    if len(xs):
        def divergence(p, xi):
            return 0.5 * (functional_call(model, p, (xi[None],)) - ref).pow(2).sum()

        with eval_mode(model):
            g = vmap(grad(divergence), in_dims=(None, 0))(params, xs)
        flat = torch.cat([g[n].reshape(xs.shape[0], -1) for n in names], 1).double()
        act = active_features(xs, group_size)
        for f in range(n_groups):
            if act[:, f].any():
                u[f] = torch.linalg.svd(flat[act[:, f]], full_matrices=False).Vh[0]
    out, start = {}, 0
    for n in names:
        size = params[n].numel()
        out[n] = u[:, start:start + size].reshape(n_groups, *params[n].shape)
        start += size
    return out


def signed_gradient_directions(model: nn.Module, x: Float[torch.Tensor, "n f"], names: Sequence[str],
                               reference: str = "zero") -> dict[str, torch.Tensor]:
    """``gradient_directions`` per (feature, sign) circuit: row 2i from the rows where feature i
    alone is active and positive, row 2i + 1 from those where it is negative."""
    pos = gradient_directions(model, x, names, sign=1, reference=reference)
    neg = gradient_directions(model, x, names, sign=-1, reference=reference)
    return {n: torch.stack([pos[n], neg[n]], 1).flatten(0, 1) for n in names}


def sign_alignment(signed_directions: Directions) -> Float[torch.Tensor, " f"]:
    """Per feature, |cos| between its x > 0 and x < 0 gradient directions (rows 2i and 2i + 1
    of ``signed_gradient_directions``). Near 1: the model serves both signs with one parameter
    direction; near 0: with two (e.g. different GeLU units), which one subnetwork (one
    coefficient) can reconstruct only at a cost."""
    odd = {n: d.shape[0] for n, d in signed_directions.items() if d.shape[0] % 2}
    if odd:
        raise ValueError(f"signed directions come in (x > 0, x < 0) pairs of rows; {odd} have an odd number")
    return cosine_matrix({n: d[0::2] for n, d in signed_directions.items()},
                         {n: d[1::2] for n, d in signed_directions.items()}).diagonal()


def assign(score: Float[torch.Tensor, "f k"]) -> list[int]:
    """The one-to-one assignment feature -> subnetwork maximising the total score (exact
    dynamic programme over feature subsets for up to 16 features, greedy beyond). Needs k >= f."""
    if score.dim() != 2:
        raise ValueError(f"score must be a [features, subnetworks] matrix, got shape {tuple(score.shape)}")
    f, k = score.shape
    if k < f:
        raise ValueError(f"cannot assign {f} features to {k} subnetworks one-to-one")
    s = score.double().nan_to_num(-1e300).tolist()
    if f > 16:
        taken, out = set(), [-1] * f
        for v, i, j in sorted(((s[i][j], i, j) for i in range(f) for j in range(k)), reverse=True):
            if out[i] < 0 and j not in taken:
                out[i] = j
                taken.add(j)
        return out
    # best[mask] after deciding the first j subnetworks: max score with features in mask assigned
    neg = -math.inf
    best = {0: (0.0, ())}
    for j in range(k):
        nxt = dict(best)
        for mask, (val, pairs) in best.items():
            for i in range(f):
                if not mask >> i & 1:
                    m2, v2 = mask | 1 << i, val + s[i][j]
                    if v2 > nxt.get(m2, (neg,))[0]:
                        nxt[m2] = (v2, pairs + ((i, j),))
        best = nxt
    out = [-1] * f
    for i, j in best[(1 << f) - 1][1]:
        out[i] = j
    return out


# --- recovering coefficients (TMCS) --------------------------------------------------------

def output_effects(model: nn.Module, subnetworks: Directions, x: Float[torch.Tensor, "n d_in"],
                   which: Optional[Sequence[int]] = None) -> Float[torch.Tensor, "k n d_out"]:
    """First-order change of the outputs along each subnetwork, d/d delta f(x; W0 + delta v_k)
    at delta = 0 (a forward-mode JVP; the model's weights are not touched). The subnetworks may
    leave weights of the model out (they do not move) but not name weights it lacks: their
    effect would be silently left out."""
    from torch.func import functional_call, jvp

    _check_inputs(model, x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n in subnetworks if n in params]
    if not names:
        raise ValueError(f"the subnetworks name no weight of the model (they have {sorted(subnetworks)}, "
                         f"the model {sorted(params)})")
    unknown = [n for n in subnetworks if n not in params]
    if unknown:
        raise ValueError(f"the subnetworks name weights {unknown} that the model does not have (it has "
                         f"{sorted(params)}); pass subnetworks of this model, e.g. dec.subnetworks()")
    _check_subnetwork_shapes(subnetworks, params)
    ks = range(subnetworks[names[0]].shape[0]) if which is None else which

    def f(*ws):
        return functional_call(model, {**params, **dict(zip(names, ws))}, (x,))

    out = []
    with eval_mode(model):
        for k in ks:
            tangent = tuple(subnetworks[n][k].to(device=params[n].device, dtype=params[n].dtype) for n in names)
            out.append(jvp(f, tuple(params[n] for n in names), tangent)[1])
    return torch.stack(out)


def _check_subnetwork_shapes(subnetworks: Directions, params: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless every ``subnetworks[name]`` is [n, *weight shape], with one n for all."""
    for n, v in subnetworks.items():
        if v.dim() < 1 or tuple(v.shape[1:]) != tuple(params[n].shape):
            raise ValueError(f"subnetworks[{n!r}] must be [n_subnetworks, *{tuple(params[n].shape)}] (the weight's "
                             f"shape), got {tuple(v.shape)}")
    _one_count(subnetworks, list(subnetworks), "subnetworks")


def _one_count(dirs: Directions, names: list[str], side: str) -> None:
    """ValueError unless ``dirs[name]`` has one leading size (directions) for every name."""
    counts = {n: dirs[n].shape[0] for n in names}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{side} has different leading sizes across weights: {counts}")


def coefficient_r2(true: Float[torch.Tensor, "f d"], recovered: Float[torch.Tensor, "f d"]) -> float:
    """r^2 of recovered coefficient vectors against the true ones, after giving each recovered
    vector its least-squares scale (subnetworks have unit norm and no sign): 1 - SS_res / SS_tot
    over all entries, SS_tot about the mean of the true entries (NaN when they are constant)."""
    if true.shape != recovered.shape:
        raise ValueError(f"shapes differ: {tuple(true.shape)} vs {tuple(recovered.shape)}")
    t, r = true.double(), recovered.double().to(true.device)
    scale = (t * r).sum(1, keepdim=True) / (r * r).sum(1, keepdim=True).clamp_min(1e-300)
    res = (t - scale * r).pow(2).sum()
    tot = (t - t.mean()).pow(2).sum()
    return float(1 - res / tot) if tot > 0 else float("nan")


def model_circuit_matrix(model: nn.Module, *, w_in: str = "encoder.weight") -> Float[torch.Tensor, "d_out d_in"]:
    """The matrix a trained circuit-superposition model actually computes, column i =
    f(e_i) - f(0) (``w_in`` names W_in, whose columns are the inputs): a reference for
    ``circuit_recovery``, what following the model's own computation gives back of A. Not an
    upper bound: ``r2_decoder`` applies each feature's own subnetwork's W_out part to its hidden
    embedding, neither the model's one W_out nor its ReLU, and can give back more of A (all of
    it, for hand-made subnetworks that map each W_in column to its column of A)."""
    enc = _model_weight(model, w_in, "w_in")
    n_in, like = enc.shape[1], dict(dtype=enc.dtype, device=enc.device)
    with torch.no_grad(), eval_mode(model):
        return (model(torch.eye(n_in, **like)) - model(torch.zeros(1, n_in, **like))).T


def rank_bound_r2(A: Float[torch.Tensor, "d_out d_in"], rank: int) -> float:
    """The largest ``coefficient_r2`` against A that any matrix of rank <= ``rank`` reaches
    (its best rank-``rank`` approximation, Eckart-Young): the bound for the linear part W_out W_in
    of a circuit-superposition model, of ``rank`` = n_hidden, before its ReLU. It bounds neither
    the model with its ReLU nor a decomposition's scores (``circuit_recovery`` takes every
    feature's column from its own subnetwork, not from one shared W_out)."""
    given, rank = rank, as_index(rank)
    if rank is None or rank < 1:
        raise ValueError(f"rank must be a positive integer (e.g. n_hidden), got {given!r}")
    u, s, vh = torch.linalg.svd(A.double(), full_matrices=False)
    approx = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return coefficient_r2(A.T, approx.T)


def circuit_recovery(model: nn.Module, subnetworks: Directions, A: Float[torch.Tensor, "d_out d_in"],
                     group_size: int = 1, *, w_in: str = "encoder.weight", w_out: str = "decoder.weight"
                     ) -> dict[str, Any]:
    """Match each input feature of a circuit-superposition model to a subnetwork (one-to-one,
    by |cos| with the feature's W_in columns) and score how well the matched subnetworks give
    back A (y = A x): ``r2`` uses each subnetwork's first-order effect on the outputs of the
    input with only that feature at 1 (``output_effects``); ``r2_decoder`` uses its W_out part
    applied to the feature's hidden embedding, V_k[W_out] @ W_in[:, i]. ``pearson_r`` is the
    paper's statistic: the correlation (np.corrcoef, not squared, no per-subnetwork scale; its
    figure labels it r^2) between the entries of A and those of the subnetworks' own products
    V_k[W_out] @ V_k[W_in][:, i] (sign-free: -v gives the same product). With ``group_size`` > 1
    (the higher-rank model) subnetworks are matched to groups of inputs, and every input of a
    group is scored on its group's subnetwork; ``match`` then lists one subnetwork per group.
    ``w_in`` and ``w_out`` name W_in and W_out, in the model and in ``subnetworks``."""
    enc = _model_weight(model, w_in, "w_in").detach()
    n_out = _model_weight(model, w_out, "w_out").shape[0]
    if tuple(A.shape) != (n_out, enc.shape[1]):
        raise ValueError(f"A must be [d_out, d_in] = {(n_out, enc.shape[1])} for this model, got {tuple(A.shape)}")
    missing = [n for n in (w_in, w_out) if n not in subnetworks]
    if missing:
        raise KeyError(f"the subnetworks hold no {missing} (w_in={w_in!r}, w_out={w_out!r}); they have "
                       f"{sorted(subnetworks)}: circuit_recovery reads each subnetwork's W_in and W_out parts "
                       "(decompose with components='*')")
    truth = superposition_directions(model, group_size, w_in=w_in)
    cos = cosine_matrix(truth, subnetworks)
    match = assign(cos)
    n_in = A.shape[1]
    eye = torch.eye(n_in, dtype=enc.dtype, device=enc.device)
    jvp_cols, dec_cols, own_cols = [], [], []
    for i in range(n_in):
        k = match[i // group_size]
        jvp_cols.append(output_effects(model, subnetworks, eye[i:i + 1], [k])[0, 0])
        v_out = subnetworks[w_out][k].to(enc)
        dec_cols.append(v_out @ enc[:, i])
        own_cols.append(v_out @ subnetworks[w_in][k].to(enc)[:, i])
    true = A.T  # [features, outputs]
    return {"match": match, "match_cos": cos[torch.arange(len(match), device=cos.device), match],
            "r2": coefficient_r2(true, torch.stack(jvp_cols)),
            "r2_decoder": coefficient_r2(true, torch.stack(dec_cols)),
            "pearson_r": pearson_r(true, torch.stack(own_cols))}


def pearson_r(true: torch.Tensor, recovered: torch.Tensor) -> float:
    """Pearson correlation between all entries of ``true`` and of ``recovered`` (same shape),
    pooled, with no per-row scale: the paper's TMCS statistic (np.corrcoef). NaN when either is
    constant."""
    if true.shape != recovered.shape:
        raise ValueError(f"shapes differ: {tuple(true.shape)} vs {tuple(recovered.shape)}")
    pair = [true.double().flatten(), recovered.double().flatten().to(true.device)]
    return float(torch.corrcoef(torch.stack(pair))[0, 1])


# --- higher-rank circuits -------------------------------------------------------------------

#: a live subnetwork counts for its group only if at least this share of its squared norm in
#: the grouped weight lies in that group's columns (``live_per_group``); in every run of record
#: that met the higher-rank target the live subnetworks hold 0.996 or more there
PURE_GROUP = 0.9


def group_of_subnetworks(subnetworks: Directions, group_size: int, weight: str = "encoder.weight"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, purity) per subnetwork: the group of input columns of ``weight`` holding most of
    the subnetwork's squared norm there, and that group's share of it; group -1 and purity 0
    for a subnetwork with nothing in ``weight`` (it belongs to no group)."""
    w = subnetworks[weight].detach().double()  # [k, hidden, in]
    if w.dim() != 3:
        raise ValueError(f"{weight!r} must be a matrix whose input columns are grouped; its subnetworks are "
                         f"{tuple(w.shape)}")
    check_group_size(group_size, w.shape[-1])
    mass = w.pow(2).sum(1).view(w.shape[0], -1, group_size).sum(-1)  # [k, groups]
    total = mass.sum(1, keepdim=True)
    purity, group = (mass / total.clamp_min(1e-300)).max(1)
    none = total.squeeze(1) == 0
    return group.masked_fill(none, -1), purity.masked_fill(none, 0.0)


def live_per_group(dec, group_size: int, weight: str = "encoder.weight") -> dict[str, Any]:
    """Live (P_act > 0) subnetworks per input group, which group each live one belongs to and
    how purely: the higher-rank target is exactly one live subnetwork per group, rest dead
    (``one_per_group``). A live subnetwork with less than ``PURE_GROUP`` of its ``weight`` mass
    in its group (mixed, or with none there) fails that target (``n_live_impure``) but is still
    counted for the group holding most of it (``live_per_group``, one count for each of the
    ``n_groups`` groups; one with none, for none)."""
    subs = dec.subnetworks()
    if weight not in subs:
        raise KeyError(f"{weight!r} is not in the decomposition (it has {sorted(subs)}); pass weight= the "
                       "weight whose input columns are grouped")
    group, purity = (t.cpu() for t in group_of_subnetworks(subs, group_size, weight))  # P_act is on the CPU
    live = dec.fraction_active > 0
    n_groups = subs[weight].shape[-1] // group_size
    owned = group[live]
    counts = torch.bincount(owned[owned >= 0], minlength=n_groups)
    n_impure = int((live & (purity < PURE_GROUP)).sum())
    # a weaker, descriptive check: are the n_groups most active subnetworks live, one per group?
    order = torch.argsort(dec.fraction_active, descending=True, stable=True)
    top, rest = order[:n_groups], order[n_groups:]
    top_groups = sorted(group[top].tolist()) if bool(live[top].all()) else []
    return {"live_per_group": counts.tolist(), "n_groups": n_groups,
            "n_live": int(live.sum()), "n_dead": int((~live).sum()),
            "group": group.tolist(), "purity": purity.tolist(), "p_act": dec.fraction_active.tolist(),
            "n_live_impure": n_impure, "one_per_group": bool((counts == 1).all()) and n_impure == 0,
            "most_active_one_per_group": top_groups == list(range(n_groups)),
            "most_active_min_purity": float(purity[top].min()),
            "others_max_p_act": float(dec.fraction_active[rest].max()) if len(rest) else 0.0}


# --- interventions --------------------------------------------------------------------------

@contextlib.contextmanager
def perturbed(model: nn.Module, direction: Mapping[str, torch.Tensor], delta: float) -> Iterator[nn.Module]:
    """Run the body with the model's weights at W0 + delta * direction (``direction[name]`` has
    the weight's shape); every touched weight is restored bit-identically afterwards, also when
    the body (or the perturbation itself) raises."""
    params = dict(model.named_parameters())
    unknown = [n for n in direction if n not in params]
    if unknown:
        raise KeyError(f"direction names weights {unknown} that the model does not have")
    for n, d in direction.items():
        if tuple(d.shape) != tuple(params[n].shape):
            raise ValueError(f"direction for {n} has shape {tuple(d.shape)}, the weight {tuple(params[n].shape)}")
    saved = {n: params[n].detach().clone() for n in direction}
    try:
        with torch.no_grad():
            for n, d in direction.items():
                params[n].add_(d.to(device=params[n].device, dtype=params[n].dtype), alpha=delta)
        yield model
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def _larger(value: float, than: float) -> bool:
    """Whether a later chunk's largest change replaces the largest so far, so that the chunks
    end where ``torch.argmax`` over the whole grid does: a NaN beats any number, and once a NaN
    is kept nothing replaces it (argmax returns the first NaN)."""
    return not math.isnan(than) and (math.isnan(value) or value > than)


def _ratio(c: dict[str, Any]) -> float:
    return c["relevant_change"] / max(c["other_change"], 1e-300)


def _tied_less_selective(c: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether ``c`` replaces ``than`` on a tie of relevant change: it is less selective."""
    return c["relevant_change"] == than["relevant_change"] and _ratio(c) < _ratio(than)


def _sooner(c: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether the hit ``c`` (one sign) replaces ``than`` (the other): a smaller |delta|, or at
    the same |delta| a larger relevant change, or at that too a smaller selectivity. Neither
    rule looks at the sign, which v does not have."""
    if abs(c["delta"]) != abs(than["delta"]):
        return abs(c["delta"]) < abs(than["delta"])
    return c["relevant_change"] > than["relevant_change"] or _tied_less_selective(c, than)


#: deltas per forward batch of ``selectivity``'s sweep, which stops after the chunk of its first hit
SWEEP_CHUNK = 16


def subnetwork(subnetworks: Directions, k: int) -> dict[str, torch.Tensor]:
    """Subnetwork ``k`` as {weight name: tensor of the weight's shape}."""
    n = next(iter(subnetworks.values())).shape[0] if subnetworks else 0
    index = as_index(k)
    if index is None or not -n <= index < n:
        raise IndexError(f"subnetwork index must be an integer in 0..{n - 1} (or -{n}..-1 from the end), got {k!r}")
    return {name: v[index] for name, v in subnetworks.items()}


@torch.no_grad()
def intervention_change(model: nn.Module, direction: Mapping[str, torch.Tensor], x: torch.Tensor,
                        deltas: Sequence[float]) -> Float[torch.Tensor, "delta n d_out"]:
    """|f(x; W0 + delta * v) - f(x; W0)| for every delta."""
    deltas = list(deltas)
    if not deltas:
        raise ValueError("deltas is empty; pass at least one step size")
    _check_inputs(model, x)
    return _changes(model, direction, x, deltas)


@torch.no_grad()
def _changes(model: nn.Module, direction: Mapping[str, torch.Tensor], x: torch.Tensor,
             deltas: list[float]) -> torch.Tensor:
    """``intervention_change`` on inputs already checked (``selectivity`` calls it per chunk)."""
    out = []
    with eval_mode(model):
        base = model(x)
        for d in deltas:
            with perturbed(model, direction, d):
                out.append((model(x) - base).abs())
    return torch.stack(out)


def _check_mask(name: str, mask: Any, shape: torch.Size) -> None:
    """ValueError unless ``mask`` is a bool tensor of the model output's ``shape``; ``selectivity``
    checks ``relevant`` before inverting it for the default ``other``."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool mask of the output's shape {tuple(shape)}; got {got}")


def selectivity(model: nn.Module, direction: Mapping[str, torch.Tensor], x: Float[torch.Tensor, "n d_in"],
                relevant: Bool[torch.Tensor, "n d_out"], fraction: float = 0.5,
                deltas: Optional[Sequence[float]] = None,
                other: Optional[Bool[torch.Tensor, "n d_out"]] = None) -> dict[str, Any]:
    """Mean change of the relevant (sample, output) entries over mean change of the ``other``
    entries (default: every entry that is not relevant) when running the model at
    W0 + delta * v, at the smallest |delta| (either sign: v has none) where the relevant
    entries have changed by ``fraction`` of their mean |value|. When both signs first get there
    at the same |delta| of the grid, the one with the larger relevant change is read (it crossed
    the threshold first between grid points), then the less selective: the answer is the same
    for v and -v, up to the sign of ``delta``. If no delta on the grid gets there, the largest
    relevant change found is used (ties likewise) and ``reached`` is False.

    The grid is walked up from the smallest |delta| in chunks of ``SWEEP_CHUNK`` for both signs
    and stops after the chunk of the first hit: no larger delta can be the answer, and each
    delta's forward is the same computation as in a full sweep, so the result is too (the x²
    circuits reach their half change about 90 steps into the default 251)."""
    if isinstance(fraction, (bool, str)) or not isinstance(fraction, (numbers.Real, torch.Tensor)) \
            or not 0 < float(fraction) < math.inf:
        raise ValueError(f"fraction must be a positive finite number (of the relevant outputs' mean |value|), "
                         f"got {fraction!r}")
    fraction = float(fraction)
    deltas = (torch.logspace(-3, 2, 251, dtype=torch.float32, device="cpu").tolist() if deltas is None
              else [float(d) for d in deltas])
    if not deltas or not all(math.isfinite(d) for d in deltas):
        raise ValueError(f"deltas must be a non-empty list of finite step sizes, got {deltas!r}")
    _check_inputs(model, x)
    with torch.no_grad(), eval_mode(model):
        base = model(x)
    _check_mask("relevant", relevant, base.shape)
    other = ~relevant if other is None else other
    _check_mask("other", other, base.shape)
    relevant, other = relevant.to(base.device), other.to(base.device)
    if (other & relevant).any():
        raise ValueError("an entry cannot be both relevant and other")
    for name, mask in (("relevant", relevant), ("other", other)):
        if not mask.any():
            raise ValueError(f"{name} selects no (sample, output) entry; the ratio needs both")
    grid = sorted(abs(d) for d in deltas)
    target = fraction * base[relevant].abs().mean().item()
    best: Optional[dict[str, Any]] = None
    fallback: dict[float, dict[str, Any]] = {}  # per sign: the largest relevant change so far (first on ties)
    for start in range(0, len(grid), SWEEP_CHUNK):
        chunk = grid[start:start + SWEEP_CHUNK]
        for sign in (1.0, -1.0):
            change = _changes(model, direction, x, [sign * d for d in chunk])
            rel = change[:, relevant].mean(1)
            other_change = change[:, other].mean(1)
            hit = (rel >= target).nonzero()
            if len(hit):
                i = int(hit[0])
                cand = {"delta": sign * chunk[i], "relevant_change": float(rel[i]),
                        "other_change": float(other_change[i]), "reached": True}
                if best is None or _sooner(cand, best):
                    best = cand
            i = int(rel.argmax())  # the first maximum; the first NaN if there is one, as over the whole grid
            if sign not in fallback or _larger(float(rel[i]), fallback[sign]["relevant_change"]):
                fallback[sign] = {"delta": sign * chunk[i], "relevant_change": float(rel[i]),
                                  "other_change": float(other_change[i]), "reached": False}
        if best is not None:
            break
    if best is None:
        plus, minus = fallback[1.0], fallback[-1.0]
        if math.isnan(plus["relevant_change"]) and math.isnan(minus["relevant_change"]):  # the first NaN of either
            best = minus if abs(minus["delta"]) < abs(plus["delta"]) else plus
        elif _larger(minus["relevant_change"], plus["relevant_change"]) or _tied_less_selective(minus, plus):
            best = minus
        else:
            best = plus
    out = best
    out["selectivity"] = _ratio(out)
    out["target_change"] = target
    return out
