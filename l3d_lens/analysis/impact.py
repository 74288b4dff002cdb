"""What a subnetwork does: on which samples it matters (impact), which logits it moves
(a forward-mode derivative along it), and how selective moving the weights along it is."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Optional, Union

import pandas as pd
import torch
from jaxtyping import Float
from torch.func import jvp

from ..checks import as_index, as_number
from ..data import check_data, check_dtype, check_position
from ..decomposition import analysis_seed, check_autograd
from ..interventions import check_subnetwork, finite_floats, listed, perturbed_forward, weight_changes


def as_samples(data, what: str = "data") -> torch.Tensor:
    """The analyses index samples, so they take one tensor [n, ...]: a list or tuple of
    tensor batches of one sample shape is joined; a stream has no index, so it is refused."""
    if isinstance(data, torch.Tensor) or data is None:
        return data
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, torch.Tensor) for b in data):
        shapes = sorted({tuple(b.shape[1:]) for b in data})
        if len(shapes) > 1:
            raise ValueError(f"{what}: batches of different sample shapes {shapes} cannot be indexed as one tensor; "
                             f"pass batches of one shape, or one tensor")
        return torch.cat(list(data))
    raise TypeError(f"{what} must be a tensor [n, ...] or a list of tensor batches here (samples are indexed), got "
                    f"{type(data).__name__}; for a stream, pass torch.cat(list(stream)) of the part to analyse, and "
                    f"paired reference data as reference=")


def reference_seeds(seed: int, n: int) -> list[int]:
    """The seeds of ``impact``'s ``n`` random references: ``seed`` itself first (so one reference
    gives |coefficients(seed=seed)|), then 63 bits of SHA-256 of (seed, r) for r = 1 .. n - 1.
    Two seeds share no draw (with ``seed + r``, seeds 0 and 1 shared n - 1 of their n; torch
    takes seeds modulo 2**64, so -1 and 2**64 - 1 are one seed to it), and the
    first n of a seed's references are the same for any larger n."""
    def derived(r: int) -> int:
        digest = hashlib.sha256(f"l3d_lens.impact:{seed}:{r}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    return [seed] + [derived(r) for r in range(1, n)]


def impact(dec, data: torch.Tensor, n_references: int = 10, reference: Optional[torch.Tensor] = None,
           seed: Optional[int] = None) -> Float[torch.Tensor, "n *pos k"]:
    """Mean over references of |V_in . g| (the paper's impact), [n, pos, K] in token mode,
    [n, K] otherwise. Paired, mean and uniform references are single, so averaged once. The
    random references come from ``reference_seeds(seed, n_references)`` (seed: an integer,
    default cfg.seed, as for ``coefficients``) and are drawn within each batch (the
    ``cfg.batch_size`` chunks of the samples; a list of batches is joined first), so a sample's
    impact depends on the other samples passed with it."""
    n_refs = as_index(n_references)
    if n_refs is None or n_refs < 1:
        raise ValueError(f"n_references must be an int >= 1, got {n_references!r}")
    n_references = n_refs
    check_autograd()
    seed = analysis_seed(seed, dec.cfg.seed)
    data, reference = as_samples(data), as_samples(reference, "reference")
    repeats = n_references if dec.cfg.reference == "random" and reference is None else 1
    total = sum(dec.coefficients(data, reference, seed=s).abs() for s in reference_seeds(seed, repeats)) / repeats
    if dec._task.token_mode:
        return total.reshape(data.shape[0], data.shape[1], -1)
    return total


def _impacts(dec, data: torch.Tensor, impacts: Optional[torch.Tensor],
             reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``impacts`` if given (it must be ``impact(dec, data)``; ``check_impacts``), else computed
    (against paired ``reference`` data for a contrastive decomposition). The caller has checked
    the data (``check_samples``)."""
    if impacts is None:
        if dec.cfg.reference == "paired" and reference is None:
            raise ValueError("this decomposition is contrastive (reference='paired'): pass its reference=<tensor like "
                             "data>, or impacts=dec.impact(data, reference=...)")
        return impact(dec, data, reference=reference)
    return check_impacts(dec, data, impacts)


def check_samples(dec, data: torch.Tensor, reference: Optional[torch.Tensor]) -> None:
    """The data of ``top_samples`` and ``intervention_curve``, checked up front as ``impact``
    checks them (token ids in the vocabulary, the position in the sequences, a dtype the model
    takes), whether or not impacts are given: precomputed impacts stand in for computing them,
    not for the checks, as the data are still indexed and run (out-of-vocab tokens gave a raw
    IndexError). A paired reference is optional here: given impacts already include it, and
    without them ``_impacts`` asks for it."""
    task = dec._task
    check_data(task.adapter, data, reference, task.cfg.reference == "paired" and reference is not None)
    check_position(task.adapter, data, task.cfg.position)
    check_dtype(task.adapter, data, reference, task.cfg.autocast)


def check_impacts(dec, data: torch.Tensor, impacts) -> torch.Tensor:
    """``impacts`` as ``impact(dec, data)`` gives them: a real tensor of the shape for these data,
    finite (a NaN sorts first, so it was ranked the top sample). Anything else is refused rather
    than converted: a list or array is not what ``impact`` returns, so it is likely not impacts."""
    if not isinstance(impacts, torch.Tensor):
        raise TypeError(f"impacts must be a tensor (dec.impact(data) of the same data), got {type(impacts).__name__}")
    if impacts.is_complex() or impacts.dtype == torch.bool:
        raise TypeError(f"impacts must be a real tensor (dec.impact(data) of the same data), got dtype {impacts.dtype}")
    n, K = data.shape[0], dec.n_subnetworks
    want = (n, data.shape[1], K) if dec._task.token_mode else (n, K)
    if tuple(impacts.shape) != want:
        raise ValueError(f"impacts has shape {tuple(impacts.shape)}; for these data it must be {want} "
                         f"(pass dec.impact(data) of the same data)")
    bad = int((~torch.isfinite(impacts)).sum())
    if bad:
        raise ValueError(f"impacts has {bad} NaN or infinite entries; impacts must be finite (pass dec.impact(data) "
                         f"of the same data)")
    return impacts


def top_samples(dec, data: torch.Tensor, subnetwork: int, k: int = 10, impacts: Optional[torch.Tensor] = None,
                to_str: Optional[Callable[[torch.Tensor], list[str]]] = None, context: int = 8,
                reference: Optional[torch.Tensor] = None) -> pd.DataFrame:
    """The k samples (sequence, position) where ``subnetwork`` has the most impact, with the
    tokens leading up to that position (``context_text``)."""
    subnetwork, k = check_subnetwork(subnetwork, dec.n_subnetworks), check_k(k)
    context = check_context(context)
    data, reference = as_samples(data), as_samples(reference, "reference")
    check_samples(dec, data, reference)
    imp = _impacts(dec, data, impacts, reference)[..., subnetwork].cpu()
    token = imp.dim() == 2
    flat = imp.reshape(-1)
    order = torch.argsort(flat, descending=True)[:k]
    rows = []
    for idx in order.tolist():
        seq, pos = divmod(idx, imp.shape[1]) if token else (idx, None)
        row = {"sequence": seq, "position": pos, "impact": float(flat[idx])}
        if dec.adapter.is_language_model:
            end = (pos if pos is not None else (dec.cfg.position if dec.cfg.position != "all" else -1) % data.shape[1])
            ids = data[seq, max(0, end - context + 1): end + 1]
            row["context"] = context_text(ids, to_str)
        rows.append(row)
    return pd.DataFrame(rows)


def context_text(ids: torch.Tensor, to_str: Optional[Callable[[torch.Tensor], list[str]]]) -> str:
    """The tokens ``ids`` as one string: ``to_str``'s strings joined as they are, since token
    strings carry their own spaces (``model.to_str_tokens``: "Hel", "lo", " world"; a space
    between them split words and doubled the spaces); without ``to_str``, the ids with a space
    between them."""
    return "".join(to_str(ids)) if to_str else " ".join(map(str, ids.tolist()))


def check_positions(dec, data: torch.Tensor, positions) -> Optional[list[int]]:
    """``top_logits``' positions as a non-empty list of ints within the sequences (one int is a
    one-position list); None keeps the default. A plain module's samples [rows, d] have no
    positions to choose (samples [rows, m, d] do: the m axis)."""
    if positions is None:
        return None
    if not dec.adapter.is_language_model and data.dim() < 3:
        raise ValueError(f"positions= picks along the axis after the samples', which these data [n, d] (shape "
                         f"{tuple(data.shape)}) do not have")
    one = as_index(positions)
    picked = [one] if one is not None else [as_index(p) for p in listed(positions) or []]
    seq = data.shape[1]
    if not picked or any(p is None or not -seq <= p < seq for p in picked):
        raise ValueError(f"positions must be an int or a non-empty list of ints in -{seq}..{seq - 1} (the sequences "
                         f"have {seq} positions), got {positions!r}")
    return picked


def check_k(k) -> int:
    """How many rows a top-k table has: an int >= 1 (a negative k would slice off the last |k|
    rows, and 0 give an empty table, both silently)."""
    n = as_index(k)
    if n is None or n < 1:
        raise ValueError(f"k must be an int >= 1 (how many rows to list), got {k!r}")
    return n


def check_context(context) -> int:
    """How many tokens ``top_samples`` shows up to a sample's position: an int >= 1 (0 or a
    negative count gave empty strings, and a float an obscure TypeError)."""
    n = as_index(context)
    if n is None or n < 1:
        raise ValueError(f"context must be an int >= 1 (how many tokens to show, ending at the sample's position), "
                         f"got {context!r}")
    return n


def checked_samples(dec, data) -> torch.Tensor:
    """``data`` as one tensor of samples the model takes (checked as ``coefficients`` checks it)."""
    data = as_samples(data)
    check_data(dec.adapter, data, None, False)
    check_dtype(dec.adapter, data)
    return data


def direction(dec, subnetwork: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The decomposed weights W0 and subnetwork ``subnetwork``'s v_k in their dtype: a JVP's
    primal and tangent."""
    subs = dec.subnetworks()
    base = {n: dec.adapter.weight(n) for n in subs}
    return base, {n: subs[n][subnetwork].to(base[n].dtype) for n in subs}


def derivative(adapter, weights: tuple[dict, dict], data: torch.Tensor,
               select: Callable[[torch.Tensor], torch.Tensor] = lambda out: out) -> torch.Tensor:
    """d/d delta select(f(x; W0 + delta v)) at delta = 0 (forward mode, one JVP) on checked
    ``data``, with ``weights`` = ``direction(...)``; ``select`` cuts the outputs down inside the
    JVP, so only its part is kept."""
    base, tangent = weights
    with adapter.session(), torch.no_grad():
        _, dout = jvp(lambda p: select(adapter.functional_forward(p, data.to(adapter.device))), (base,), (tangent,))
    return dout


def output_derivative(dec, data: torch.Tensor, subnetwork: int) -> torch.Tensor:
    """d/d delta f(x; W0 + delta v_k) at delta = 0, for every output (forward mode, one JVP)."""
    subnetwork = check_subnetwork(subnetwork, dec.n_subnetworks)
    data = checked_samples(dec, data)
    return derivative(dec.adapter, direction(dec, subnetwork), data)


def logit_rows(out: torch.Tensor, positions: Optional[list[int]]) -> torch.Tensor:
    """Outputs [n, pos, V] as rows [n * len(positions), V] of the chosen positions (all if None);
    other outputs as they are, one row per sample."""
    if out.dim() != 3:
        return out
    out = out[:, positions] if positions is not None else out
    return out.reshape(-1, out.shape[-1])


def top_logits(dec, data: torch.Tensor, subnetwork: int, k: int = 10,
               to_str: Optional[Callable[[torch.Tensor], list[str]]] = None,
               positions: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """The k output logits that moving along ``subnetwork`` changes most (mean |d logit / d delta|
    over the samples and ``positions``), with the signed mean; signs are relative (v ~ -v).
    ``positions`` defaults to all of them in token mode and with position="all", else to the
    decomposed ``cfg.position``. The samples go in ``cfg.batch_size`` chunks (as for
    ``impact``), each reduced to its sums (float64) before the next, so that memory does not
    grow with the data."""
    k, data = check_k(k), as_samples(data)
    positions = check_positions(dec, data, positions)
    subnetwork = check_subnetwork(subnetwork, dec.n_subnetworks)
    data = checked_samples(dec, data)
    if positions is None and dec.adapter.is_language_model and not dec._task.token_mode \
            and dec.cfg.position != "all":
        positions = [dec.cfg.position]
    weights = direction(dec, subnetwork)
    total_abs, total, rows = 0.0, 0.0, 0
    for chunk in data.split(dec.cfg.batch_size):
        d = derivative(dec.adapter, weights, chunk, lambda out: logit_rows(out, positions))
        total_abs = total_abs + d.abs().sum(0, dtype=torch.float64).cpu()
        total = total + d.sum(0, dtype=torch.float64).cpu()
        rows += d.shape[0]
    mean_abs, mean = total_abs / rows, total / rows
    order = torch.argsort(mean_abs, descending=True)[:k]
    tokens = to_str(order) if to_str else [str(i) for i in order.tolist()]
    return pd.DataFrame({"token_id": order.tolist(), "token": tokens, "mean_abs_dlogit": mean_abs[order].tolist(),
                         "mean_dlogit": mean[order].tolist()})


def output_change(before: torch.Tensor, after: torch.Tensor, language_model: bool) -> torch.Tensor:
    """Per sample: KL(before || after) of next-token distributions, or squared error, in float64
    (of the outputs as the model gave them): in the model's precision the KL of a small change
    cancels to rounding, negative about as often as positive (bfloat16 at any delta, float32 at
    delta ~1e-4), which made selectivity NaN, negative or far off. A KL is never below 0."""
    before, after = before.double(), after.double()
    if language_model:
        lp0, lp1 = before.log_softmax(-1), after.log_softmax(-1)
        return (lp0.exp() * (lp0 - lp1)).sum(-1).clamp_min(0.0)
    return (after - before).pow(2).sum(-1)


def check_curve_deltas(deltas) -> list[float]:
    """The curve's steps as a non-empty list of finite floats; a single number (as
    ``intervene``'s delta) is a one-step curve. Strings and bools are not numbers here."""
    one = as_number(deltas)
    ds = [one] if one is not None else listed(deltas)
    if not ds:
        raise ValueError(f"deltas must be a non-empty list of finite numbers, got {deltas!r}")
    return finite_floats(ds, lambda d: f"deltas must be a non-empty list of finite numbers, got {d!r} in {deltas!r}")


def check_top_fraction(top_fraction) -> float:
    """The share of samples ``intervention_curve`` ranks top by impact: a number in (0, 1) (an
    int, float, numpy scalar or 0-d tensor; a string or a bool is not one)."""
    fraction = as_number(top_fraction)
    if fraction is None or not 0 < fraction < 1:
        raise ValueError(f"top_fraction must be a number in (0, 1) (the share of samples ranked top by impact), "
                         f"got {top_fraction!r}")
    return fraction


def check_curve_finite(dec, subnetwork: int, deltas: list[float]) -> None:
    """Refuse, before any impact or forward pass, a delta that takes a weight out of its
    dtype's range (``weight_changes`` checks each)."""
    subs = dec.subnetworks()
    for delta in deltas:
        weight_changes(dec.adapter, subs, [subnetwork], [delta])


def curve_samples(dec, data: torch.Tensor) -> int:
    """How many samples ``intervention_curve`` ranks by impact: (sequence, position) pairs in
    token mode, else sequences (or rows of a non-language model)."""
    return data.shape[0] * (data.shape[1] if dec._task.token_mode else 1)


def ratio(on: float, off: float) -> float:
    """Selectivity on / off: inf only where the top samples change and the rest do not; NaN
    where neither changes or a change is NaN (no evidence either way)."""
    if off > 0:
        return on / off
    return float("inf") if on > 0 and off == 0 else float("nan")


def sample_changes(dec, data: torch.Tensor, subnetwork: int, deltas: list[float], sample_dims: int) -> torch.Tensor:
    """[len(deltas), samples] output change of each sample (``output_change``; summed over
    positions for position="all") at W0 + delta v_k, flattened as the impacts are. The data go
    in ``cfg.batch_size`` chunks, each reduced to its changes before the next, so that the
    outputs of all the data are never held at once."""
    adapter = dec.adapter
    view = dec._task.view
    subs = dec.subnetworks()
    out = torch.empty(len(deltas), curve_samples(dec, data), dtype=torch.float64)
    start = 0
    for chunk in data.split(dec.cfg.batch_size):
        end = start + curve_samples(dec, chunk)
        x = chunk.to(adapter.device)
        with adapter.session(), torch.no_grad():
            before = view(adapter.forward(x))
        for i, delta in enumerate(deltas):
            after = perturbed_forward(adapter, weight_changes(adapter, subs, [subnetwork], [delta]), x)
            change = output_change(before, view(after), adapter.is_language_model)
            if change.dim() > sample_dims:
                change = change.sum(-1)
            out[i, start:end] = change.reshape(-1)  # in place: kept small pieces fragmented the heap
        start = end
    return out


def intervention_curve(dec, data: torch.Tensor, subnetwork: int, deltas: Union[float, Sequence[float]],
                       top_fraction: float = 0.1, impacts: Optional[torch.Tensor] = None,
                       reference: Optional[torch.Tensor] = None) -> pd.DataFrame:
    """Selectivity across delta: mean output change on the subnetwork's top-impact samples over
    the mean change on the rest, running the model at W0 + delta v_k (``reference``: the paired
    data a contrastive decomposition's impacts are taken against)."""
    subnetwork = check_subnetwork(subnetwork, dec.n_subnetworks)
    top_fraction = check_top_fraction(top_fraction)
    deltas = check_curve_deltas(deltas)
    check_curve_finite(dec, subnetwork, deltas)
    data, reference = as_samples(data), as_samples(reference, "reference")
    check_samples(dec, data, reference)
    check_dtype(dec.adapter, data, reference)  # the curve runs the model without autocast
    n = curve_samples(dec, data)
    if n < 2:
        raise ValueError(f"intervention_curve compares a subnetwork's top-impact samples with the rest, so it needs "
                         f"at least 2 samples; these data have {n}")
    imp = _impacts(dec, data, impacts, reference)[..., subnetwork].cpu()
    n_top = min(max(1, int(round(top_fraction * n))), n - 1)  # both groups non-empty
    top = torch.zeros(imp.numel(), dtype=torch.bool)
    top[torch.argsort(imp.reshape(-1), descending=True)[:n_top]] = True
    changes = sample_changes(dec, data, subnetwork, deltas, imp.dim())
    rows = []
    for delta, change in zip(deltas, changes):
        on, off = change[top].mean().item(), change[~top].mean().item()
        rows.append({"delta": delta, "change_top": on, "change_rest": off, "selectivity": ratio(on, off)})
    return pd.DataFrame(rows)
