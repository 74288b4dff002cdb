"""L3D head to head with activation patching and attribution patching.

``compare_with_patching(model, clean, corrupted, metric)`` runs three attributions of the
same behaviour on the same (clean, corrupted) token pairs and puts them side by side:

- **activation patching** (``transformer_lens.patching``): the metric after replacing one
  head's output ``hook_z`` (all positions) -- or one MLP's output ``hook_mlp_out``, or one
  neuron's ``mlp.hook_post`` -- by its value on the other input of the pair;
- **attribution patching**: its first-order estimate, ``sum grad(metric) * (act_other -
  act_base)`` over batch, positions and the unit's activation, with the gradient taken at the
  base run (computed here: TransformerLens has no built-in; works on HookedTransformer and
  TransformerBridge alike, through the same hook names);
- **contrastive L3D**: ``decompose(model, base, cfg, reference=other)`` with
  ``reference="paired"`` (the other input's output is each sample's reference; no top-k, a
  few subnetworks), reduced to one score per head: the subnetworks' effect through the head's
  output (see ``l3d_scores`` and ``analysis.effects``).

Direction. ``direction="noise"`` (default) patches the *corrupted* activation into the
*clean* run, takes the attribution gradient at the clean run, and decomposes the clean inputs
with the corrupted outputs as references: all three methods then look at the same point (the
clean run) and ask which component, changed toward the corrupted input, changes the
behaviour. ``direction="denoise"`` is the mirror image (TransformerLens's usual use: clean
activations into the corrupted run; L3D on the corrupted inputs with the clean outputs as
references). Effects are ``metric(patched base run) - metric(base run)``; methods are ranked
by ``|effect|``, ``|estimate|`` and the (non-negative) L3D score, rank 1 = most important.
An effect or estimate within ``noise_floor`` of the metric's clean-corrupted gap, or within one
rounding step of the metric at the model's precision (eps x |metric|: the larger in bfloat16),
counts as none: effects that small are treated as negligible (a head that does nothing scores
float round-off in float32, and in float64 a real but tiny effect, which attribution reproduces),
so that they do not decide the ranks, the agreement and the AUROC; the rounding step is there
for what low precision (bfloat16, float16) cannot resolve at all.

The model is left exactly as it was: same weights, train/eval mode restored, every hook this
module adds removed (even on error); bad input fails before any expensive work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from .adapters import Adapter, make_adapter
from .checks import as_index, as_number
from .config import L3DConfig
from .data import check_batch

Metric = Callable[[torch.Tensor], torch.Tensor]
Units = Union[bool, Iterable]
METHODS = ("patching", "attribution", "l3d")
DIRECTIONS = ("noise", "denoise")
MLP_KINDS = ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out")
#: |effect| at most this fraction of |metric_clean - metric_corrupted| ranks as no effect
NOISE_FLOOR = 1e-4


# --- statistics (no scipy / sklearn) ---------------------------------------------------------


def _vector(x: Any) -> torch.Tensor:
    """A flat float64 CPU copy of a tensor, array or sequence."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).flatten().clone()
    return torch.tensor(np.array(x, dtype=np.float64)).flatten()


def rankdata(x: Sequence[float]) -> torch.Tensor:
    """Ascending ranks 1..n, ties sharing their average rank (like scipy's 'average')."""
    x = _vector(x)
    if torch.isnan(x).any():
        raise ValueError("cannot rank NaN scores")
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, len(xs)
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1
        i = j + 1
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for recovering ``labels`` (True = positive):
    the probability that a random positive scores above a random negative, ties counting
    one half (Mann-Whitney U from average ranks). Labels are bools or 0/1; anything else (a
    class index 2, a NaN) is refused rather than read as True."""
    s = _vector(scores)
    y = _vector(labels)
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.numel()} scores but {y.numel()} labels")
    odd = y[(y != 0) & (y != 1)]
    if odd.numel():
        raise ValueError(f"auroc: labels must be bools or 0/1 (1 = positive), got {odd[0].item():g}")
    y = y.bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs at least one positive and one negative, got {n_pos} and {n_neg}")
    r = rankdata(s)
    u = r[y].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if ra.shape != rb.shape:
        raise ValueError(f"spearman: {ra.numel()} vs {rb.numel()} values")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    return float("nan") if den == 0 else (ra * rb).sum().item() / den.item()


def top_k_indices(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k largest scores; ties broken by position (the earlier unit first)."""
    s = _vector(scores)
    order = sorted(range(len(s)), key=lambda i: (-s[i].item(), i))
    return order[:k]


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """|top-k(a) & top-k(b)| / k, for two score vectors of the same units (same length n) and
    1 <= k <= n. A k above n is refused, not capped: the k - n missing units would count as
    misses, so identical rankings would score below 1."""
    n_a, n_b = len(_vector(a)), len(_vector(b))
    if n_a != n_b:
        raise ValueError(f"top_k_overlap: {n_a} vs {n_b} scores; both must score the same units")
    if as_index(k) is None or not 1 <= k <= n_a:
        raise ValueError(f"top_k_overlap: k must be an int in 1..{n_a} (the number of scores), got {k!r}")
    return len(set(top_k_indices(a, k)) & set(top_k_indices(b, k))) / k


# --- the result -----------------------------------------------------------------------------


@dataclasses.dataclass
class PatchingComparison:
    """Per-unit scores of the three methods and how much they agree.

    heads / mlp / neurons: DataFrames with the unit's index columns (layer, head | layer |
    layer, neuron), ``patching`` (signed effect of patching it), ``attribution`` (signed
    first-order estimate of that effect), ``l3d`` (L3D score, >= 0: the subnetworks' effect
    through the unit's output, see ``l3d_scores``), ``l3d_share`` (their squared-norm share on
    the unit, for reference; not ranked), ``rank_<method>`` (1 = most important, ties averaged)
    and, with a ground truth, ``ground_truth`` (bool).
    agreement: one row per (level, method pair): Spearman correlation, top-k overlap, and
    ``top_k_chance`` = k / units, the overlap two random top-k sets have on average (1 when k
    covers every unit of the level: the overlap then says nothing). k is at most the number of
    units either method scores above the noise floor (0: the overlap is NaN).
    auroc: method -> AUROC of head recovery, plus ``l3d_share`` (None without ``ground_truth``).
    noise_floor: the |effect| (and |estimate|) at or below which a unit ranks as no effect, in
    metric units (``compare_with_patching``'s relative ``noise_floor`` times the gap, or one
    rounding step of the metric in the model's dtype if larger).
    """

    heads: Optional[pd.DataFrame]
    mlp: Optional[pd.DataFrame]
    neurons: Optional[pd.DataFrame]
    agreement: pd.DataFrame
    auroc: Optional[dict[str, float]]
    metric_clean: float
    metric_corrupted: float
    direction: str
    top_k: int
    noise_floor: float = 0.0
    decomposition: Any = dataclasses.field(repr=False, default=None)
    cfg: Optional[L3DConfig] = dataclasses.field(repr=False, default=None)

    def __repr__(self) -> str:
        """One line: the direction, the metric on both inputs, how many units of each level
        were scored, and each method's agreement with activation patching (the whole tables
        are in the fields and ``summary()``)."""
        sizes = [f"{len(df)} {name}" for name, df in (("heads", self.heads), ("MLP layers", self.mlp),
                                                       ("neurons", self.neurons)) if df is not None]
        parts = [f"direction={self.direction!r}", f"metric clean {self.metric_clean:.4g}, "
                 f"corrupted {self.metric_corrupted:.4g}", " + ".join(sizes) or "no units", f"top_k={self.top_k}"]
        versus = self._versus_patching()
        if versus:
            parts.append("vs patching: " + " | ".join(versus))
        if self.auroc:
            parts.append("AUROC " + ", ".join(f"{m} {v:.3f}" for m, v in self.auroc.items()))
        return f"PatchingComparison({'; '.join(parts)})"

    def _versus_patching(self) -> list[str]:
        """The agreement of activation patching with each other method, per level: "level
        method rho <Spearman>, top-k overlap <overlap> (chance <its chance level>)"."""
        if not isinstance(self.agreement, pd.DataFrame):
            return []
        return [f"{r.get('level')} {r.get('method_b')} rho {r.get('spearman', float('nan')):.3f}, "
                f"top-{r.get('top_k')} overlap {r.get('top_k_overlap', float('nan')):.3f} "
                f"(chance {r.get('top_k_chance', float('nan')):.3f})"
                for r in self.agreement.to_dict("records") if r.get("method_a") == "patching"]

    def summary(self) -> str:
        lines = [f"metric clean {self.metric_clean:.4f}, corrupted {self.metric_corrupted:.4f} "
                 f"(direction={self.direction!r}; |effect| <= {self.noise_floor:.3g} ranks as none)"]
        if self.auroc:
            lines.append("AUROC: " + ", ".join(f"{m} {v:.3f}" for m, v in self.auroc.items()))
        lines.append(self.agreement.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for level, df in (("heads", self.heads), ("MLP layers", self.mlp), ("neurons", self.neurons)):
            if df is not None:
                lines.append(f"top {min(self.top_k, len(df))} {level} by activation patching:")
                lines.append(df.sort_values("rank_patching").head(self.top_k).to_string(
                    index=False, float_format=lambda v: f"{v:.4g}"))
        return "\n".join(lines)


# --- validation -----------------------------------------------------------------------------


def _pair(item: Any) -> Optional[tuple[int, int]]:
    """``item`` as two ints if it is a length-2 sequence or 1-d array of integers (Python,
    numpy or torch; a row of ``np.argwhere`` or ``tensor.nonzero()``), else None (also for
    bools, floats and strings)."""
    if isinstance(item, (torch.Tensor, np.ndarray)):
        if item.ndim != 1 or item.shape[0] != 2:
            return None
        item = item.tolist()  # ints from an integer array; bools and floats, refused below, from others
    elif isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
        return None
    pair = tuple(as_index(i) for i in item)
    return None if None in pair else pair


def _pairs(value: Units, name: str, sizes: tuple[int, int], what: tuple[str, str]) -> list[tuple[int, int]]:
    """True -> every (a, b); False/None -> []; an iterable of (a, b) pairs or a [k, 2] integer
    array (e.g. ``np.argwhere(mask)``) -> validated list in the order given (the public helpers
    return their values so; ``compare_with_patching`` sorts them and drops repeats). A tuple of two index arrays
    (``np.nonzero(mask)``, ``torch.where(mask)``) is refused: with two hits it would read as two
    pairs of other units."""
    n_a, n_b = sizes
    if value is True:
        return list(itertools.product(range(n_a), range(n_b)))
    if value is False or value is None:
        return []
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim != 2:
        raise TypeError(f"{name}: an array must be [k, 2] ({what[0]}, {what[1]}) pairs of ints (e.g. "
                        f"np.argwhere(mask)), got shape {tuple(value.shape)}")
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be True/False or an iterable of ({what[0]}, {what[1]}) pairs, "
                        f"got {type(value).__name__}")
    if isinstance(value, tuple) and value and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in value):
        raise TypeError(f"{name}: a tuple of index arrays (np.nonzero(mask) or torch.where(mask)) is not a list "
                        f"of ({what[0]}, {what[1]}) pairs; pass np.argwhere(mask) or mask.nonzero()")
    out = []
    for item in value:
        pair = _pair(item)
        if pair is None:
            hint = f" (one pair goes in a list: [({what[0]}, {what[1]})])" if as_index(item) is not None else ""
            raise TypeError(f"{name}: each entry must be a ({what[0]}, {what[1]}) pair of ints, got {item!r}{hint}")
        a, b = pair
        if not (0 <= a < n_a and 0 <= b < n_b):
            raise ValueError(f"{name}: ({what[0]} {a}, {what[1]} {b}) does not exist; the model has {n_a} "
                             f"{what[0]}s of {n_b} {what[1]}s")
        out.append(pair)
    if not out:
        raise ValueError(f"{name} is empty; pass True for all, False for none, or some ({what[0]}, {what[1]}) pairs")
    return out


def _layers(value: Units, n_layers: int, name: str = "mlp") -> list[int]:
    if value is True:
        return list(range(n_layers))
    if value is False or value is None:
        return []
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be True/False or an iterable of layer indices, got {type(value).__name__}")
    out = []
    for layer in value:
        index = as_index(layer)
        if index is None or not 0 <= index < n_layers:
            raise ValueError(f"{name}: layer {layer!r} does not exist; the model has {n_layers} layers")
        out.append(index)
    if not out:
        raise ValueError(f"{name} is empty; pass True for all layers, False for none, or some layer indices")
    return out


def _units(adapter: Adapter, heads: Units, mlp: Units, neurons: Units, mlp_name: str = "mlp",
           what: str = "compare") -> tuple[list[tuple[int, int]], list[int], list[tuple[int, int]]]:
    """The validated (heads, MLP layers, neurons) to score; an error if there are none, or if
    MLP units are asked of an attention-only model."""
    n_layers, n_heads, d_mlp = adapter.n_layers, adapter.n_heads, adapter.d_mlp
    head_list = _pairs(heads, "heads", (n_layers, n_heads), ("layer", "head"))
    if (mlp is not False and mlp is not None) or (neurons is not False and neurons is not None):
        if not d_mlp or not any(s.kind == "W_in" for s in adapter.sites.values()):
            raise ValueError(f"{mlp_name}/neurons were asked for but this model has no MLPs (attention-only)")
    mlp_layers = _layers(mlp, n_layers, mlp_name)
    neuron_list = _pairs(neurons, "neurons", (n_layers, d_mlp), ("layer", "neuron")) if d_mlp else []
    if not (head_list or mlp_layers or neuron_list):
        raise ValueError(f"nothing to {what}: heads, {mlp_name} and neurons are all off; pass True (all) or a "
                         f"list of units for at least one")
    return head_list, mlp_layers, neuron_list


def _none_if_empty(units: Units) -> Units:
    """An empty list or tuple as False: the public helpers' old way to leave a level out."""
    return False if isinstance(units, (list, tuple)) and not units else units


def _patchable(model: Any, what: str) -> Adapter:
    """The adapter of a HookedTransformer or TransformerBridge (or an adapter of one)."""
    adapter = model if isinstance(model, Adapter) else make_adapter(model)
    if adapter.kind not in ("hooked_transformer", "transformer_bridge"):
        raise TypeError(f"{what} needs a HookedTransformer or TransformerBridge (activation patching "
                        f"works on hook points), got {type(adapter.model).__name__}")
    return adapter


#: more patched forward passes than this get a warning before the sweep starts
MANY_FORWARDS = 10_000


def _warn_if_long(heads: list, mlp_layers: list, neurons: list) -> None:
    """Activation patching runs one forward pass per unit; warn before a sweep that long."""
    n = len(heads) + len(mlp_layers) + len(neurons)
    if n > MANY_FORWARDS:
        warnings.warn(f"activation patching will run {n:,} patched forward passes, one per unit ({len(heads)} heads, "
                      f"{len(mlp_layers)} MLP layers, {len(neurons):,} neurons); to reduce it, select neurons "
                      f"(neurons=[(layer, neuron), ...]) rather than neurons=True", stacklevel=3)


def _check_pair(adapter: Adapter, a: Any, b: Any, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids the model takes, of the same shape, on the model's device."""
    a, b = check_batch(adapter, a, names[0]), check_batch(adapter, b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} has shape {tuple(a.shape)} and {names[1]} {tuple(b.shape)}; patching "
                         f"needs pairs of the same shape (same number of sequences and positions)")
    return a.to(adapter.device), b.to(adapter.device)


def _check_tokens(adapter: Adapter, clean: Any, corrupted: Any) -> tuple[torch.Tensor, torch.Tensor]:
    clean, corrupted = _check_pair(adapter, clean, corrupted, ("clean", "corrupted"))
    if torch.equal(clean, corrupted):
        raise ValueError("clean and corrupted are identical: there is nothing to patch")
    return clean, corrupted


def _check_callable(metric: Any) -> None:
    if not callable(metric):
        raise TypeError(f"metric must be a callable logits -> scalar tensor, got {type(metric).__name__}")


def _metric_value(metric: Metric, logits: torch.Tensor, what: str) -> torch.Tensor:
    try:
        value = metric(logits)
    except Exception as e:  # noqa: BLE001 - re-raised as it is, with a note saying where (Python 3.11+)
        if hasattr(e, "add_note"):
            e.add_note(f"(l3d_lens: the metric failed on the model's logits of shape {tuple(logits.shape)}, "
                       f"{what} run)")
        raise
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"metric must return a torch.Tensor (a scalar), got {type(value).__name__}; e.g. "
                        f"lambda logits: logits[:, -1, a].mean() - logits[:, -1, b].mean()")
    if value.dim() != 0:
        raise ValueError(f"metric must return a scalar (0-dim) tensor, averaged over the batch, got shape "
                         f"{tuple(value.shape)}; reduce it, e.g. with .mean()")
    if not value.is_floating_point():
        raise TypeError(f"metric must return a floating-point scalar, got dtype {value.dtype}")
    if not torch.isfinite(value):
        raise ValueError(f"metric returned {value.item()} on the {what} run; it must be finite")
    return value


def _check_metric(adapter: Adapter, metric: Metric, clean: torch.Tensor,
                  corrupted: torch.Tensor) -> tuple[float, float]:
    """Two plain forwards: the metric is a finite scalar on both, and differentiable."""
    _check_callable(metric)
    with torch.no_grad():
        logits_clean = adapter.forward(clean)
        logits_corr = adapter.forward(corrupted)
    m_clean = _metric_value(metric, logits_clean, "clean")
    m_corr = _metric_value(metric, logits_corr, "corrupted")
    with torch.enable_grad():
        probe = logits_clean.detach().clone().requires_grad_(True)
        value = metric(probe)
        if not value.requires_grad:
            raise ValueError("metric is not differentiable in the logits (its result does not require grad); "
                             "attribution patching needs gradients: avoid .item(), argmax or detaching inside it")
        (grad,) = torch.autograd.grad(value, probe, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all():
        raise ValueError("metric's gradient with respect to the logits is missing or not finite")
    return m_clean.item(), m_corr.item()


# --- model hygiene --------------------------------------------------------------------------


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode for the body; afterwards every module's mode restored and every hook added
    meanwhile removed (TransformerLens handles and raw torch hooks), even on error."""
    modes = [(m, m.training) for m in model.modules()]
    hook_points = dict(getattr(model, "hook_dict", {}) or {})
    lens_before = {id(hp): ({id(h) for h in getattr(hp, "fwd_hooks", [])},
                            {id(h) for h in getattr(hp, "bwd_hooks", [])}) for hp in hook_points.values()}
    torch_before = {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks), set(m._backward_hooks))
                    for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for hp in hook_points.values():
            fwd, bwd = lens_before.get(id(hp), (set(), set()))
            for attr, keep in (("fwd_hooks", fwd), ("bwd_hooks", bwd)):
                handles = getattr(hp, attr, None)
                if handles is None:
                    continue
                for h in [h for h in handles if id(h) not in keep]:
                    h.hook.remove()
                setattr(hp, attr, [h for h in handles if id(h) in keep])
        for m in model.modules():
            before = torch_before.get(id(m))
            if before is None:
                continue
            for store, keep in zip((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks), before):
                for key in [k for k in store if k not in keep]:
                    del store[key]
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Silence TransformerLens's per-patch tqdm bars unless progress was asked for (tqdm reads
    its TQDM_* environment at import, so the bar factory of transformer_lens.patching is
    swapped for a pass-through for the duration, and put back even on error)."""
    from transformer_lens import patching

    if progress or not hasattr(patching, "tqdm"):
        yield
        return
    original = patching.tqdm
    patching.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        patching.tqdm = original


# --- activation patching (TransformerLens) ----------------------------------------------------


def _hook_names(heads, mlp_layers, neurons) -> list[str]:
    names = {f"blocks.{layer}.attn.hook_z" for layer, _ in heads}
    names |= {f"blocks.{layer}.hook_mlp_out" for layer in mlp_layers}
    names |= {f"blocks.{layer}.mlp.hook_post" for layer, _ in neurons}
    return sorted(names)


def _whole_activation(corrupted_activation, index, clean_activation):
    return clean_activation.clone()  # a copy: later in-place ops must not reach the cache


def _neuron_setter(corrupted_activation, index, clean_activation):
    n = int(index[1])
    corrupted_activation[..., n] = clean_activation[..., n]
    return corrupted_activation


def activation_patching(model: nn.Module, base: torch.Tensor, source_cache, metric: Metric, heads: Units = False,
                        mlp_layers: Units = False, neurons: Units = False) -> dict[str, torch.Tensor]:
    """metric(base run with one unit's activation taken from ``source_cache``) per unit, with
    transformer_lens.patching: heads via get_act_patch_attn_head_out_all_pos ("z"), MLPs and
    neurons via generic_activation_patch ("mlp_out" / "post", all positions). The values are
    the metric's own, in its dtype (TransformerLens keeps them in a float32 tensor).
    heads / neurons: True (all), False or (layer, head) / (layer, neuron) pairs; mlp_layers:
    True, False or layers; returned in the order given. source_cache: ``model.run_with_cache(source)``
    holding the units' hook points. Runs in eval mode (dropout off); the model is left as it was."""
    adapter = _patchable(model, "activation_patching")
    heads, mlp_layers, neurons = _units(adapter, *map(_none_if_empty, (heads, mlp_layers, neurons)), "mlp_layers",
                                        "patch")
    base = check_batch(adapter, base, "base").to(adapter.device)
    _check_callable(metric)
    names = _hook_names(heads, mlp_layers, neurons)
    if not hasattr(source_cache, "keys"):
        raise TypeError(f"source_cache must be the ActivationCache of model.run_with_cache(source) (or a dict of "
                        f"hook name -> activation), got {type(source_cache).__name__}")
    missing = [n for n in names if n not in set(source_cache.keys())]
    if missing:
        raise ValueError(f"source_cache lacks the hook points {missing}; cache them, e.g. "
                         f"model.run_with_cache(source, names_filter=lambda name: name in {names!r})")
    _warn_if_long(heads, mlp_layers, neurons)
    with _untouched(adapter.model):
        return _activation_patching(adapter.model, base, source_cache, metric, heads, mlp_layers, neurons)


def _activation_patching(model: nn.Module, base: torch.Tensor, source_cache, metric: Metric, heads: list,
                         mlp_layers: list, neurons: list) -> dict[str, torch.Tensor]:
    """``activation_patching`` on checked units, in the caller's model state."""
    from transformer_lens import patching

    def run(patch, *args) -> torch.Tensor:
        values: list[torch.Tensor] = []

        def recorded(logits: torch.Tensor) -> torch.Tensor:
            value = metric(logits)
            values.append(value.detach().reshape(()))
            return value

        stored = patch(model, base, source_cache, recorded, *args)
        return torch.stack(values).reshape(stored.shape) if len(values) == stored.numel() else stored

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if heads:
            index = pd.DataFrame(heads, columns=["layer", "head"])
            out["heads"] = run(lambda *a: patching.get_act_patch_attn_head_out_all_pos(
                *a, index_axis_names=None, index_df=index))
        if mlp_layers:
            index = pd.DataFrame({"layer": mlp_layers})
            out["mlp"] = run(patching.generic_activation_patch, _whole_activation, "mlp_out", None, index)
        if neurons:
            index = pd.DataFrame(neurons, columns=["layer", "neuron"])
            out["neurons"] = run(patching.generic_activation_patch, _neuron_setter, "post", None, index)
    return {k: v.detach().to("cpu", torch.float64).flatten() for k, v in out.items()}


# --- attribution patching (ours) ------------------------------------------------------------


def _run_with_probes(adapter: Adapter, tokens: torch.Tensor, names: Sequence[str], metric: Metric):
    """Forward with a zero probe added at each hook point; returns (metric value, activations
    at the hook points, d metric / d activation). The probes carry the gradient, so nothing is
    accumulated in the model's .grad and frozen parameters do not matter."""
    acts: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(act, hook):
            if name in probes:  # an aliased HookPoint may call us again in one forward: pass through
                return act
            probe = torch.zeros_like(act, requires_grad=True)
            acts[name] = act.detach().clone()
            probes[name] = probe
            return act + probe
        return hook

    with torch.enable_grad(), adapter.model.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        value = metric(adapter.forward(tokens))
        missing = [n for n in names if n not in probes]
        if missing:
            raise RuntimeError(f"hook points {missing} did not fire in the forward pass of this model")
        grads = torch.autograd.grad(value, [probes[n] for n in names], allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(acts[n])).detach() for n, g in zip(names, grads)}
    return value.detach(), acts, grads


def attribution_patching(model: Union[nn.Module, Adapter], base: torch.Tensor, source: torch.Tensor, metric: Metric,
                         heads: Units = False, mlp_layers: Units = False, neurons: Units = False
                         ) -> dict[str, torch.Tensor]:
    """First-order estimate of every activation-patching effect from one forward and backward:
    sum over batch and positions (and the unit's dims) of grad_base(metric) * (act_source - act_base).
    heads / neurons: True (all), False or (layer, head) / (layer, neuron) pairs; mlp_layers:
    True, False or layers; returned in the order given. Runs in eval mode (dropout off, so the same
    call gives the same estimate); the model is left as it was."""
    adapter = _patchable(model, "attribution_patching")
    heads, mlp_layers, neurons = _units(adapter, *map(_none_if_empty, (heads, mlp_layers, neurons)), "mlp_layers",
                                        "patch")
    base, source = _check_pair(adapter, base, source, ("base", "source"))
    _check_callable(metric)
    with _untouched(adapter.model):
        return _attribution_patching(adapter, base, source, metric, heads, mlp_layers, neurons)


def _attribution_patching(adapter: Adapter, base: torch.Tensor, source: torch.Tensor, metric: Metric, heads: list,
                          mlp_layers: list, neurons: list) -> dict[str, torch.Tensor]:
    """``attribution_patching`` on checked units, in the caller's model state."""
    names = _hook_names(heads, mlp_layers, neurons)
    with torch.no_grad():
        source_acts = _capture(adapter, source, names)
    _, base_acts, grads = _run_with_probes(adapter, base, names, metric)
    prod = {n: (grads[n].double() * (source_acts[n].double() - base_acts[n].double())) for n in names}
    out: dict[str, torch.Tensor] = {}
    if heads:  # z: [batch, pos, head, d_head]
        out["heads"] = torch.stack([prod[f"blocks.{layer}.attn.hook_z"][:, :, h].sum() for layer, h in heads])
    if mlp_layers:
        out["mlp"] = torch.stack([prod[f"blocks.{layer}.hook_mlp_out"].sum() for layer in mlp_layers])
    if neurons:
        out["neurons"] = torch.stack([prod[f"blocks.{layer}.mlp.hook_post"][..., n].sum() for layer, n in neurons])
    return {k: v.to("cpu") for k, v in out.items()}


def _capture(adapter: Adapter, tokens: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    acts: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(act, hook):
            acts.setdefault(name, act.detach().clone())
        return hook

    with adapter.model.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        adapter.forward(tokens)
    return acts


# --- contrastive L3D ------------------------------------------------------------------------


def default_l3d_config(model: nn.Module, n_pairs: int, *, mlp: bool = False, **overrides: Any) -> L3DConfig:
    """The contrastive-L3D settings ``compare_with_patching`` uses unless given a cfg: the
    attention weights of every layer (plus every MLP with ``mlp``), no biases, reference =
    the paired input's output, one sample per pair with the KL summed over all positions
    (``position="all"``: the metric may read any position), no top-k (``top_k=1.0``; a
    contrast targets one behaviour), 4 subnetworks of Tucker rank max(4, n_heads) (full rank
    over the head mode for small models), about 150 Adam steps with the learning rate
    decayed x0.8 five times, in the model's dtype."""
    adapter = make_adapter(model)
    batch = max(1, min(32, n_pairs))
    steps_per_epoch = math.ceil(n_pairs / batch)
    epochs = int(min(150, max(10, math.ceil(150 / steps_per_epoch))))
    dtype = "float64" if adapter.model_dtype == torch.float64 else "float32"
    settings = dict(components=["blocks.*.attn"] + (["blocks.*.mlp"] if mlp else []), n_subnetworks=4,
                    rank=max(4, adapter.n_heads), top_k=1.0, sample="sequence", position="all", reference="paired",
                    include_biases=False, epochs=epochs, batch_size=batch, lr=0.01, lr_decay=0.8,
                    lr_step=max(1, epochs // 5), seed=0, dtype=dtype)
    settings.update(overrides)
    return L3DConfig(**settings)


def _check_l3d_coverage(task, heads, mlp_layers, neurons) -> None:
    """Every unit asked for must have its output weights decomposed (a head's W_V or W_O, an
    MLP's W_out), or its L3D score (``analysis.effects``) would be undefined."""
    covered_heads, covered_neurons, covered_mlp = set(), set(), set()
    for s in task.selected:
        site = s.site
        if site.layer is None:
            continue
        if site.kind in ("W_V", "W_O"):
            axis = site.modes.index("head")
            idx = s.indices if s.axis == axis else range(site.shape[axis])
            covered_heads |= {(site.layer, h) for h in idx}
        if site.kind == "W_out":
            covered_mlp.add(site.layer)
            if "d_mlp" in site.modes:
                axis = site.modes.index("d_mlp")
                idx = s.indices if s.axis == axis else range(site.shape[axis])
                covered_neurons |= {(site.layer, n) for n in idx}
    for what, wanted, covered in (("heads", heads, covered_heads), ("MLP layers", mlp_layers, covered_mlp),
                                  ("neurons", neurons, covered_neurons)):
        missing = [u for u in wanted if u not in covered]
        if missing:
            raise ValueError(f"cfg.components {list(task.cfg.components)} do not cover the output weights "
                             f"({'W_V or W_O' if what == 'heads' else 'W_out'}) of the {what} {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}; add them (e.g. 'blocks.*.attn', 'blocks.*.mlp')"
                             f" or leave cfg=None")


def l3d_scores(dec, data: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """One L3D score per head, MLP layer and neuron from a contrastive decomposition: the
    reconstructed gradient's effect through the unit's output (``analysis.effects``),

        score(u) = mean_i | sum_k c_ik e_k(u) |,   e_k(u) = <v_k|u, W0|u>,

    c_ik = V_in[k] . g_i on pair i; for a head, u is its W_O (and W_V, b_V) slice, for a neuron
    its W_out row, for an MLP layer its W_out and b_out. This is the parameter-space analogue
    of attribution patching a zero-ablation, read through the subnetworks. Also returned, as
    ``<unit>_share``: sum_k mean_i |c_ik| * share_k(u), the subnetworks' squared-norm share on
    the unit (``Decomposition.attribution``), which follows gradient size rather than the unit's
    output (BENCHMARKS.md compares the two). Tensors [n_layers, n_heads], [n_layers],
    [n_layers, d_mlp]; NaN / 0 where nothing was decomposed."""
    from .analysis.effects import combined

    coef = dec.coefficients(data, reference).double().cpu()
    coef = coef.reshape(-1, coef.shape[-1])
    effects = dec.effects()
    out = {unit: combined(effects[unit], coef) for unit in ("heads", "mlp", "neurons")}
    weight = coef.abs().mean(0)  # [k]
    df = dec.attribution()
    adapter = dec.adapter
    n_layers, n_heads, d_mlp = adapter.n_layers, adapter.n_heads, adapter.d_mlp
    heads = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    mlp = torch.zeros(n_layers, dtype=torch.float64)
    neurons = torch.zeros(n_layers, max(d_mlp, 1), dtype=torch.float64)
    for row in df.itertuples(index=False):
        if pd.isna(row.layer):
            continue
        w = weight[int(row.subnetwork)].item() * float(row.share)
        if not pd.isna(row.head):
            heads[int(row.layer), int(row.head)] += w
        if row.kind in MLP_KINDS:
            mlp[int(row.layer)] += w
            if not pd.isna(row.neuron):
                neurons[int(row.layer), int(row.neuron)] += w
    out.update(heads_share=heads, mlp_share=mlp, neurons_share=neurons)
    return out


# --- the comparison -------------------------------------------------------------------------


def _check_finite(method: str, scores: dict[str, torch.Tensor], units: dict[str, list]) -> None:
    """A NaN or infinite score (the metric or a gradient broke on a patched run) is an error
    naming the unit, before the L3D run: it would otherwise rank as no effect, under the floor."""
    for level, values in scores.items():
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{method} gave {values[bad[0]].item()} for {level} {units[level][bad[0]]} ({len(bad)} "
                             f"non-finite of {values.numel()}): the metric or its gradient is not finite on that run")


def resolution(dtype: torch.dtype, *metrics: float) -> float:
    """One rounding step of the metric at the model's precision (eps x its largest value): in
    bfloat16 it is far above a fraction of the gap, and an effect below it is rounding."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return eps * max(abs(m) for m in metrics)


def rank_keys(df: pd.DataFrame, floor: float) -> dict[str, np.ndarray]:
    """What each method is ranked by: |effect| and |estimate| with those at or below ``floor``
    set to 0 (tied: no effect), and the L3D score as it is."""
    keys = {}
    for m in METHODS:
        v = df[m].to_numpy(dtype=np.float64)
        keys[m] = v if m == "l3d" else np.where(np.abs(v) > floor, np.abs(v), 0.0)
    return keys


def _frame(index: pd.DataFrame, scores: dict[str, torch.Tensor], truth: Optional[set], floor: float) -> pd.DataFrame:
    df = index.copy()
    for m in METHODS:
        df[m] = scores[m].numpy()
    df["l3d_share"] = scores["l3d_share"].numpy()
    for m, key in rank_keys(df, floor).items():
        df[f"rank_{m}"] = len(df) + 1 - rankdata(key).numpy()
    if truth is not None:
        df["ground_truth"] = [tuple(int(v) for v in row) in truth for row in index.itertuples(index=False)]
    return df


def _agreement(level: str, df: pd.DataFrame, k: int, floor: float) -> list[dict[str, Any]]:
    """Spearman and top-k overlap per method pair, on the floored keys; k shrinks to the units
    both methods score above 0, so units tied at no effect never fill a top-k set by position."""
    rows = []
    keys = rank_keys(df, floor)
    for a, b in itertools.combinations(METHODS, 2):
        k_ab = min(k, int((keys[a] > 0).sum()), int((keys[b] > 0).sum()))
        overlap = top_k_overlap(keys[a], keys[b], k_ab) if k_ab else float("nan")
        rows.append({"level": level, "method_a": a, "method_b": b, "spearman": spearman(keys[a], keys[b]),
                     "top_k": k_ab, "top_k_overlap": overlap, "top_k_chance": k_ab / len(df)})
    return rows


def _build_task_once(model: nn.Module, cfg: L3DConfig):
    """``build_task(model, cfg)`` and the warnings it gave, issued at the line that called
    ``compare_with_patching`` and returned, so that ``_not_again`` keeps ``decompose``, which
    builds the same task again, from repeating them."""
    from .decomposition import build_task

    shown: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            task = build_task(model, cfg)
    finally:  # also when build_task then raised
        for w in shown:
            warnings.warn(w.message, stacklevel=3)
    return task, shown


@contextlib.contextmanager
def _not_again(shown: list[warnings.WarningMessage]) -> Iterator[None]:
    """Silence, for the body, the warnings listed in ``shown`` (and those only)."""
    with warnings.catch_warnings():
        for w in shown:
            warnings.filterwarnings("ignore", message=re.escape(str(w.message)) + "$", category=w.category)
        yield


def compare_with_patching(model: nn.Module, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, *,
                          cfg: Optional[L3DConfig] = None, heads: Units = True, mlp: Units = False,
                          neurons: Units = False, ground_truth: Optional[Iterable] = None, top_k: int = 5,
                          direction: str = "noise", noise_floor: float = NOISE_FLOOR,
                          progress: bool = False) -> PatchingComparison:
    """Activation patching, attribution patching and contrastive L3D on the same (clean,
    corrupted) pairs, per head (and per MLP layer / neuron when asked).

    model: a HookedTransformer or TransformerBridge. clean, corrupted: token ids [n, seq] of
    the same shape. metric: logits [n, seq, d_vocab] -> scalar tensor (averaged over the
    batch; differentiable). cfg: an L3DConfig with reference="paired" (default:
    ``default_l3d_config``). heads / neurons: True, False or a list of (layer, head) /
    (layer, neuron); mlp: True, False or a list of layers. ground_truth: a set of (layer,
    head) the behaviour is known to use; gives each method's AUROC for recovering it.
    top_k: k of the top-k overlaps (at most the number of units of each level). direction:
    "noise" (default) or "denoise" (see the module docstring). noise_floor: an |effect| or
    |estimate| at most this fraction of |metric_clean - metric_corrupted|, or at most one
    rounding step of the metric in the model's dtype, ranks as no effect (tied with the others
    there) in the ranks, the agreement and the AUROC; 0 leaves only the rounding step.

    Under an initialised torch.distributed group its ``decompose`` is collective (every rank
    calls it); on one rank only, call it inside ``with l3d_lens.distributed.local():``.
    """
    adapter = _patchable(model, "compare_with_patching")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose 'noise' (corrupted activations into the clean run) or "
                         f"'denoise' (clean activations into the corrupted run)")
    clean, corrupted = _check_tokens(adapter, clean, corrupted)
    n_layers, n_heads = adapter.n_layers, adapter.n_heads
    head_list, mlp_layers, neuron_list = (sorted(set(units)) for units in _units(adapter, heads, mlp, neurons))
    truth = None
    if ground_truth is not None:
        if not head_list:
            raise ValueError("ground_truth is a set of (layer, head) but heads=False")
        truth = set(_pairs(list(ground_truth), "ground_truth", (n_layers, n_heads), ("layer", "head")))
        outside = truth - set(head_list)
        if outside:
            raise ValueError(f"ground_truth heads {sorted(outside)} are not among the compared heads")
        if len(truth) == len(head_list):
            raise ValueError("ground_truth contains every compared head; AUROC needs at least one negative")
    if as_index(top_k) is None or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    nf = as_number(noise_floor)
    if nf is None or not 0 <= nf < 1:
        raise ValueError(f"noise_floor must be a number in [0, 1) (a fraction of |metric_clean - metric_corrupted|; "
                         f"0 leaves only the rounding step of the model's dtype), got {noise_floor!r}")
    if cfg is None:
        cfg = default_l3d_config(model, clean.shape[0], mlp=bool(mlp_layers or neuron_list))
    if not isinstance(cfg, L3DConfig):
        raise TypeError(f"cfg must be an l3d_lens.L3DConfig, got {type(cfg).__name__}")
    if cfg.reference != "paired":
        raise ValueError(f"cfg.reference={cfg.reference!r}; contrastive L3D needs reference='paired' (the other "
                         f"input of each pair is the reference)")
    from .decomposition import check_run, decompose

    task, shown = _build_task_once(model, cfg)
    _check_l3d_coverage(task, head_list, mlp_layers, neuron_list)
    base, source = (clean, corrupted) if direction == "noise" else (corrupted, clean)
    check_run(task, base, source)  # what decompose would refuse, before the patching sweeps
    _warn_if_long(head_list, mlp_layers, neuron_list)
    with _untouched(model), _quiet(progress):
        m_clean, m_corr = _check_metric(adapter, metric, clean, corrupted)
        m_base = m_clean if direction == "noise" else m_corr
        # (a) activation patching
        names = _hook_names(head_list, mlp_layers, neuron_list)
        with torch.no_grad():
            _, source_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
        patched = _activation_patching(model, base, source_cache, metric, head_list, mlp_layers, neuron_list)
        del source_cache
        effects = {k: v - m_base for k, v in patched.items()}
        # (b) attribution patching
        estimates = _attribution_patching(adapter, base, source, metric, head_list, mlp_layers, neuron_list)
        units = {"heads": head_list, "mlp": mlp_layers, "neurons": neuron_list}
        for method, scores in (("activation patching", effects), ("attribution patching", estimates)):
            _check_finite(method, scores, units)
        # (c) contrastive L3D
        with _not_again(shown):
            dec = decompose(model, base, cfg, reference=source, progress=progress)
        l3d = l3d_scores(dec, base, source)

    floor = max(nf * abs(m_clean - m_corr), resolution(adapter.model_dtype, m_clean, m_corr))
    frames: dict[str, Optional[pd.DataFrame]] = {"heads": None, "mlp": None, "neurons": None}
    rows: list[dict[str, Any]] = []
    for level, unit, listed, columns in (("heads", "head", head_list, ["layer", "head"]),
                                         ("mlp", "mlp", mlp_layers, ["layer"]),
                                         ("neurons", "neuron", neuron_list, ["layer", "neuron"])):
        if not listed:
            continue
        keys = [u if isinstance(u, tuple) else (u,) for u in listed]
        idx = pd.DataFrame(keys, columns=columns)
        sc = torch.stack([l3d[level][key] for key in keys])
        share = torch.stack([l3d[f"{level}_share"][key] for key in keys])
        frames[level] = _frame(idx, {"patching": effects[level], "attribution": estimates[level], "l3d": sc,
                                     "l3d_share": share}, truth if level == "heads" else None, floor)
        rows += _agreement(unit, frames[level], min(top_k, len(listed)), floor)
    aurocs = None
    if truth is not None:
        df = frames["heads"]
        aurocs = {m: auroc(key, df["ground_truth"].to_numpy()) for m, key in rank_keys(df, floor).items()}
        aurocs["l3d_share"] = auroc(df["l3d_share"].to_numpy(), df["ground_truth"].to_numpy())
    return PatchingComparison(heads=frames["heads"], mlp=frames["mlp"], neurons=frames["neurons"],
                              agreement=pd.DataFrame(rows), auroc=aurocs, metric_clean=m_clean,
                              metric_corrupted=m_corr, direction=direction, top_k=top_k, noise_floor=floor,
                              decomposition=dec, cfg=cfg)
