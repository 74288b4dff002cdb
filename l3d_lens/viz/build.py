"""Assemble the report: an overview of the decomposition, one section per live subnetwork
(where it lives, where it acts, what it does to the outputs) and, when given, the
activation-patching comparison. Every number is computed here from the Decomposition's
public API; rendering goes through ``html``, ``charts`` and ``tables``."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..checks import as_index, is_int, is_number
from . import charts, tables
from .attention import head_patterns
from .html import SURROGATE, Views, circuitsvis_bundle, esc, fragment, lookalike_note, page

ToStr = Callable[[torch.Tensor], list[str]]

DELTAS = (-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0)
N_REFERENCES = 4  # random references per impact when the report computes the impacts


@dataclasses.dataclass(frozen=True)
class Options:
    """The report's options, checked when made (before any analysis runs).

    n_references: random references per impact. None (the default) means ``N_REFERENCES`` (4)
    when the report computes the impacts; with precomputed ``impacts=`` the report cannot know
    how many they averaged, so its caption states a number only when n_references is given.
    title: a str with no lone surrogate (it could not be written as UTF-8).
    attention_window: the attention views show at most this many positions (queries and keys),
    the window ending at the top sample's peak: a view holds heads x window^2 numbers, so a
    whole long sequence would make the page tens of MB. 0 or None: no attention views.
    subnetworks: an int or a non-empty sequence of distinct ints (kept as a tuple); whether
    they are in range is checked against the decomposition when the report is built."""

    max_sequences: int = 128
    n_references: Optional[int] = None
    n_top: int = 4
    n_heads: int = 4
    n_logits: int = 10
    n_neurons: int = 16
    subnetworks: Optional[Union[int, Sequence[int]]] = None
    deltas: Sequence[float] = DELTAS
    title: Optional[str] = None
    attention_window: Optional[int] = 128

    def __post_init__(self):
        for name in ("max_sequences", "n_references", "n_top", "n_heads", "n_logits", "n_neurons"):
            value = getattr(self, name)
            if name == "n_references" and value is None:
                continue
            if not is_int(value) or value < 1:
                raise ValueError(f"report option {name} must be an int >= 1, got {value!r}")
        deltas = self.deltas
        if (isinstance(deltas, (str, bytes)) or not isinstance(deltas, Sequence) or not deltas
                or not all(is_number(d) and math.isfinite(d) for d in deltas)):
            raise ValueError(f"report option deltas must be a non-empty sequence of finite numbers (the intervention "
                             f"curve's steps along each subnetwork), got {deltas!r}")
        window = self.attention_window
        if window is not None and (not is_int(window) or window < 0):
            raise ValueError(f"report option attention_window must be an int >= 0 (positions per attention view) or "
                             f"None (0 or None: no attention views), got {window!r}")
        if self.subnetworks is not None:
            object.__setattr__(self, "subnetworks", subnetwork_option(self.subnetworks))
        if self.title is not None and not isinstance(self.title, str):
            raise TypeError(f"report option title must be a str or None, got {type(self.title).__name__}")
        bad = SURROGATE.search(self.title or "")
        if bad:
            raise ValueError(f"report option title has a lone surrogate {bad.group()!r} at index {bad.start()} "
                             f"(it cannot be written as UTF-8): {self.title!r}")


def subnetwork_option(value: Any) -> tuple[int, ...]:
    """The subnetworks option as a tuple of distinct ints: one int (an int, numpy integer or
    integer tensor, as ``intervene`` takes) or a non-empty iterable of them."""
    one = as_index(value)
    try:
        ks = [one] if one is not None else [as_index(k) for k in value]
    except TypeError:  # not an index and not iterable (a float, a bool)
        ks = []
    if not ks or None in ks:
        raise ValueError(f"report option subnetworks must be an int or a non-empty sequence of ints (subnetwork "
                         f"indices) or None (all live subnetworks), got {value!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"report option subnetworks {ks} repeats an index")
    return tuple(ks)


def html_path(path) -> Path:
    """``path`` as a Path if it names an .html (.htm) file; ValueError otherwise."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"report path must end in .html, got {str(path)!r}")
    return path


def writable_html_path(path) -> Path:
    """``path`` as for ``html_path``, checked as a place to write the report before any analysis:
    not a folder, its nearest existing ancestor a folder (the missing ones are made) in which a
    file can be made (one is made and deleted: ``os.access`` misses read-only mounts and says
    yes to root). An OSError subclass naming the path and the problem otherwise."""
    path = html_path(path)
    path = Path(os.path.realpath(path)) if path.is_symlink() else path  # written where the link points
    dangling_link(path)
    if path.is_dir():
        raise IsADirectoryError(f"report path {str(path)!r} is a folder; name the .html file to write")
    if path.is_file() and not os.access(path, os.W_OK):
        raise PermissionError(f"report path {str(path)!r} is read-only; make it writable or name another file")
    base = next((p for p in path.parents if p.exists()), Path("."))
    if not base.is_dir():
        raise NotADirectoryError(f"report path {str(path)!r}: {str(base)!r} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".l3d-lens-check-", dir=base)
    except OSError as e:
        raise PermissionError(f"report path {str(path)!r} is not writable: cannot create a file in {str(base)!r} "
                              f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)
    return path


def dangling_link(path: Path) -> None:
    """FileNotFoundError if ``path`` or a folder above it is a symlink to nothing (a missing
    target, or a loop): the check of the nearest existing folder would pass over it, and
    making the missing folders would fail only after the analyses."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise FileNotFoundError(f"report path {str(path)!r}: {str(p)!r} is a symlink to {os.readlink(p)!r}, "
                                    f"which does not exist; create the target or name another path")


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a new file in the same folder,
    flushed to the disk, then renamed onto ``path``. A failed write (disk full, a file size
    limit, an interrupt) leaves an earlier file as it was and removes the new one. A new file
    gets the umask's mode, as ``open`` would give; one that replaces a report keeps that
    report's mode, and a read-only report is refused, as a plain write would. A symlink at
    ``path`` stays one: its target is replaced (a hard link to the old file keeps the old text)."""
    path = Path(os.path.realpath(path))
    old = path.stat() if path.is_file() else None
    if old is not None and not os.access(path, os.W_OK):
        raise PermissionError(f"report path {str(path)!r} is read-only; make it writable or name another file")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None:  # the report it replaces keeps its mode (a private one stays private)
                os.chmod(f.fileno() if os.chmod in os.supports_fd else tmp, stat.S_IMODE(old.st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def attention_window(n: int, end: int, width: int) -> range:
    """The positions an attention view shows: all ``n`` where ``n <= width``, else ``width``
    consecutive ones ending at ``end`` (the peak: later positions cannot affect it), or the
    first ``width`` where ``end`` is earlier than that."""
    if n <= width:
        return range(n)
    start = min(max(end - width + 1, 0), n - width)
    return range(start, start + width)


def model_tokenizer(model: torch.nn.Module) -> Any:
    """The model's tokenizer if it has one that decodes, else None."""
    tokenizer = getattr(model, "tokenizer", None)
    return tokenizer if tokenizer is not None and hasattr(tokenizer, "decode") else None


def default_to_str(model: torch.nn.Module) -> ToStr:
    """Decode one token at a time with the model's tokenizer, or print the ids, each after a
    space (ids shown in a row would run together: "0", "17" as "017")."""
    tokenizer = model_tokenizer(model)
    if tokenizer is not None:
        return lambda ids: [tokenizer.decode([int(i)]) for i in ids.reshape(-1).tolist()]
    return lambda ids: [f" {int(i)}" for i in ids.reshape(-1).tolist()]


def checked_to_str(to_str: ToStr) -> ToStr:
    """``to_str`` made to return a list of one str per token id (any iterable of them is taken).
    A lone surrogate in a token (not valid UTF-8: the report could not be written) becomes
    U+FFFD, as a decoder shows bytes it cannot read: a token only labels a view, and one odd
    token of a tokenizer the caller may not control should not stop the report."""
    def wrapped(ids: torch.Tensor) -> list[str]:
        out = to_str(ids)
        kind = type(out).__name__
        if not isinstance(out, str) and hasattr(out, "__iter__"):
            out = list(out)
        if not isinstance(out, list) or len(out) != ids.numel():
            size = f" of length {len(out)}" if hasattr(out, "__len__") else ""
            raise ValueError(f"to_str must return one string per token id: got {kind}{size} for {ids.numel()} ids")
        return [SURROGATE.sub("\ufffd", str(t)) for t in out]

    return wrapped


def decomposed_heads(dec) -> torch.Tensor:
    """[n_layers, n_heads] bool: the heads with a decomposed weight of their own (W_Q, W_K,
    W_V, W_O or a head bias; inside the head slice where the selection has one, as
    ``Decomposition.effects`` reads it)."""
    a = dec.adapter
    out = torch.zeros(a.n_layers, a.n_heads, dtype=torch.bool)
    for s in dec._task.selected:
        site = s.site
        if site.layer is None or "head" not in site.modes:
            continue
        heads = s.indices if s.axis is not None else range(site.shape[site.modes.index("head")])
        out[site.layer, [h for h in heads if h < a.n_heads]] = True
    return out


def head_maps(dec) -> tuple[torch.Tensor, torch.Tensor]:
    """The [n_subnetworks, n_layers, n_heads] maps of the report: share of squared norm per head
    and share of effect through each head's output. A head the decomposition leaves out is NaN
    (drawn "–", not as a real 0): one with no decomposed weight in the first, one whose output
    (W_O or W_V) is not decomposed in the second."""
    from ..analysis.effects import shares

    norm = dec.head_attribution(as_tensor=True).masked_fill(~decomposed_heads(dec), math.nan)
    effects = dec.head_effects(as_tensor=True)
    return norm, shares(effects).masked_fill(effects.isnan(), math.nan)


def given_impacts(impacts: Any) -> torch.Tensor:
    """The report's ``impacts=`` checked as ``dec.impact(data)`` gives them: a real tensor with
    no negative entry (an impact is a mean of absolute values). Non-finite entries are left to
    the analyses' ``check_impacts``."""
    if not isinstance(impacts, torch.Tensor) or impacts.is_complex() or impacts.dtype == torch.bool:
        what = f"dtype {impacts.dtype}" if isinstance(impacts, torch.Tensor) else type(impacts).__name__
        raise TypeError(f"impacts must be a real tensor (dec.impact(data) of the same data), got {what}")
    negative = int((torch.isfinite(impacts) & (impacts < 0)).sum())
    if negative:
        raise ValueError(f"impacts has {negative} negative entries; impacts are never negative (pass dec.impact(data) "
                         f"of the same data)")
    return impacts


def report_data(dec, data: Any, max_sequences: int) -> torch.Tensor:
    """The report's samples: the first ``max_sequences`` of a tensor or of concatenated batches."""
    if not isinstance(max_sequences, int) or max_sequences < 1:
        raise ValueError(f"max_sequences must be an int >= 1, got {max_sequences!r}")
    if isinstance(data, torch.Tensor):
        x = data[:max_sequences]
    else:
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise TypeError(f"data must be a tensor or an iterable of tensor batches, got {type(data).__name__}")
        parts, n = [], 0
        for batch in data:
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f"data batches must be tensors, got {type(batch).__name__}")
            parts.append(batch[: max_sequences - n])
            n += parts[-1].shape[0]
            if n >= max_sequences:
                break
        if not parts:
            raise ValueError("data is empty (the iterable yields no batch)")
        x = torch.cat(parts)
    from ..data import check_batch

    return check_batch(dec.adapter, x).cpu()


class Builder:
    """Computes and renders the sections for one (decomposition, data) pair."""

    def __init__(self, dec, data: Any, *, comparison: Any = None, to_str: Optional[ToStr] = None,
                 impacts: Optional[torch.Tensor] = None, reference: Any = None, options: Options = Options(),
                 progress: bool = False, prefix: str = "l3d-cv-"):
        from ..decomposition import Decomposition

        if not isinstance(dec, Decomposition):
            raise TypeError(f"dec must be an l3d_lens.Decomposition, got {type(dec).__name__}")
        if comparison is not None and not hasattr(comparison, "heads"):
            raise TypeError(f"comparison must have a .heads DataFrame (from l3d_lens.patching.compare_with_patching), "
                            f"got {type(comparison).__name__}")
        self.dec = dec
        self.opt = options
        self.lm = dec.adapter.is_language_model
        self.token_mode = dec.cfg.sample == "token"
        self.x = report_data(dec, data, options.max_sequences)
        if dec.cfg.reference == "paired" and reference is None:
            raise ValueError("this decomposition uses paired references: pass reference= (data like data)")
        self.reference = report_data(dec, reference, options.max_sequences) if reference is not None else None
        if self.reference is not None and self.reference.shape != self.x.shape:
            raise ValueError(f"reference has shape {tuple(self.reference.shape)} after taking max_sequences, data "
                             f"has {tuple(self.x.shape)}; they must match")
        self.to_str = checked_to_str(to_str if to_str is not None else default_to_str(dec.model))
        # tokens that are only their ids (no to_str, no tokenizer): tables need no token column
        self.ids_only = to_str is None and model_tokenizer(dec.model) is None
        self.comparison = comparison
        self.progress = progress
        self.views = Views(prefix)
        n, K = self.x.shape[0], dec.n_subnetworks
        if options.subnetworks is not None:
            from ..interventions import check_subnetworks

            chosen = check_subnetworks(list(options.subnetworks), K)
        if self.lm:
            self.to_str(self.x[0])  # one string per token, before the analyses
        # None: supplied impacts whose number of references the caller did not state
        self.n_references = options.n_references
        if impacts is None:
            self.n_references = options.n_references or N_REFERENCES
            impacts = dec.impact(self.x, n_references=self.n_references, reference=self.reference)
        else:
            impacts = given_impacts(impacts)[:n]
        want = (n, self.x.shape[1], K) if self.token_mode else (n, K)
        if tuple(impacts.shape) != want:
            raise ValueError(f"impacts has shape {tuple(impacts.shape)}; for these data it must be {want}")
        self.impacts = impacts.detach().to("cpu", torch.float64)
        self.order_impacts = torch.nan_to_num(self.impacts, nan=0.0, posinf=1e30, neginf=0.0)
        self.p_act = dec.fraction_active.double()
        attribution = dec.attribution()
        self.attribution = attribution
        self.heads, self.head_effects = head_maps(dec) if dec.adapter.n_heads else (None, None)
        self.neurons = dec.neuron_attribution() if attribution["neuron"].notna().any() else None
        live = [k for k in range(K) if self.p_act[k] > 0]
        self.all_dead = not live and options.subnetworks is None
        live = live or list(range(K))
        if options.subnetworks is not None:
            live = chosen
        self.shown = sorted(live, key=lambda k: (-float(self.p_act[k]), k))
        self.summary: dict[int, dict[str, Any]] = {}

    @property
    def title(self) -> str:
        return self.opt.title or f"L3D report: {type(self.dec.model).__name__}, {self.dec.n_subnetworks} subnetworks"

    # --- helpers -----------------------------------------------------------------------------
    def head_label(self, layer: int, head: int) -> str:
        return f"L{layer}H{head}"

    def top_heads(self, k: int, n: int, min_share: float = 0.02) -> list[tuple[int, int, float]]:
        if self.heads is None:
            return []
        flat = torch.nan_to_num(self.heads[k].flatten(), nan=0.0)
        order = torch.argsort(flat, descending=True, stable=True)[:n].tolist()
        H = self.heads.shape[2]
        out = [(i // H, i % H, float(flat[i])) for i in order if float(flat[i]) >= min_share]
        return out

    def top_sequences(self, k: int) -> list[tuple[int, Optional[int], float]]:
        """(sequence, peak position or None, peak impact) of the n_top sequences."""
        imp = self.order_impacts[..., k]
        if imp.dim() == 2:
            peak, pos = imp.max(1)
            order = torch.argsort(peak, descending=True, stable=True)[: self.opt.n_top].tolist()
            return [(i, int(pos[i]), float(self.impacts[i, int(pos[i]), k])) for i in order]
        order = torch.argsort(imp, descending=True, stable=True)[: self.opt.n_top].tolist()
        return [(i, None, float(self.impacts[i, k])) for i in order]

    def sample_position(self) -> Optional[int]:
        pos = self.dec.cfg.position
        return pos % self.x.shape[1] if isinstance(pos, int) else None

    # --- sections ----------------------------------------------------------------------------
    def subnet_section(self, k: int) -> str:
        dec, opt = self.dec, self.opt
        info: dict[str, Any] = {"subnetwork": k, "P_act": float(self.p_act[k])}
        out = [f'<section class="subnet" id="subnet-{k}">',
               f"<h2>Subnetwork {k} <span class=\"muted\">P_act {float(self.p_act[k]):.4f}</span></h2>"]

        # where it lives
        out.append('<div class="row">')
        if self.heads is not None and self.heads[k].nansum() > 0:
            L, H = self.heads.shape[1:]
            out.append("<div><h3>Share of squared norm per head</h3>" + charts.heatmap(
                self.heads[k].tolist(), [f"L{i}" for i in range(L)], [f"H{j}" for j in range(H)]) + "</div>")
        if self.head_effects is not None and self.head_effects[k].nansum() > 0:
            L, H = self.head_effects.shape[1:]
            out.append("<div><h3>Share of effect through each head's output</h3>" + charts.heatmap(
                self.head_effects[k].tolist(), [f"L{i}" for i in range(L)], [f"H{j}" for j in range(H)]) + "</div>")
            flat = torch.nan_to_num(self.head_effects[k].flatten(), nan=0.0)
            i = int(torch.argmax(flat))
            info["top head by output effect"] = f"{self.head_label(i // H, i % H)} {float(flat[i]):.2f}"
        if self.neurons is not None:
            nk = self.neurons[self.neurons["subnetwork"] == k].sort_values(["share", "layer", "neuron"],
                                                                          ascending=[False, True, True], kind="stable")
            nk = nk.head(opt.n_neurons)
            if len(nk) and nk["share"].max() > 0:
                labels = [f"L{int(r.layer)} N{int(r.neuron)}" for r in nk.itertuples()]
                out.append(f"<div><h3>Top {len(nk)} MLP neurons (share)</h3>"
                           + charts.bar_chart(labels, nk["share"].tolist(), width=360) + "</div>")
                top = nk.iloc[0]
                info["top neuron"] = f"L{int(top.layer)} N{int(top.neuron)} {float(top.share):.2f}"
        per_weight = (self.attribution[self.attribution["subnetwork"] == k].groupby("weight", sort=False)["share"]
                      .sum().sort_values(ascending=False, kind="stable"))
        per_weight = per_weight[per_weight > 1e-4].head(12)
        out.append("<div><h3>Share per weight</h3>" + tables.table(
            ["weight", "share"], [[w, float(s)] for w, s in per_weight.items()]) + "</div>")
        out.append("</div>")
        heads = self.top_heads(k, 3)
        info["top heads"] = ", ".join(f"{self.head_label(l_, h)} {s:.2f}" for l_, h, s in heads)

        # where it acts
        top = self.top_sequences(k)
        info["peak impact"] = top[0][2] if top else float("nan")
        if dec.cfg.reference == "random" and self.n_references is None:
            how = "mean |V_in &middot; g| over random references, as supplied (impacts=)"
        elif dec.cfg.reference == "random":
            how = f"mean |V_in &middot; g| over {self.n_references} random references"
        else:
            how = f"|V_in &middot; g| against the {esc(dec.cfg.reference)} reference"
        unit = "per token" if self.token_mode else "per sequence"
        top_toks = [self.to_str(self.x[seq]) for seq, _, _ in top] if self.lm else []
        note = lookalike_note((t for toks in top_toks for t in toks), "the coloured tokens")
        out.append(f'<h3>Top samples <span class="muted">(impact {unit}: {how}; colour scale 0 to the '
                   f"subnetwork's largest impact here)</span>{note}</h3>")
        if self.lm:
            vmax = float(self.order_impacts[..., k].clamp(max=1e30).max()) if self.impacts.numel() else 1.0
            for (seq, pos, value), toks in zip(top, top_toks):
                if pos is not None:
                    values = self.impacts[seq, :, k].tolist()
                    where = f"peak at position {pos} (token {esc(repr(toks[pos]))})"
                else:
                    p = self.sample_position()
                    values = [value if (p is None or i == p) else 0.0 for i in range(len(toks))]
                    where = "divergence at " + (f"position {p}" if p is not None else "all positions")
                out.append(f'<div class="sample"><div class="muted">sequence {seq}: {where}, impact {value:.4g}</div>'
                           + self.views.colored_tokens(toks, values, 0.0, vmax) + "</div>")
            ctx = dec.top_samples(self.x, k, 10, impacts=self.impacts.to(torch.float32), to_str=self.to_str)
            out.append(tables.dataframe(ctx, caption="top (sequence, position) samples with the tokens up to them"))
        else:
            out.append(tables.table(["sample", "impact"], [[s, v] for s, _, v in top]))

        # attention of its top heads on its top sample
        if self.lm and top and opt.attention_window:
            out.append(self.attention_html(k, top[0]))

        # what it does to the outputs
        out.append(self.logits_html(k, top))
        out.append(self.curve_html(k, info))
        out.append("</section>\n")
        self.summary[k] = info
        return "\n".join(out)

    def attention_html(self, k: int, top: tuple[int, Optional[int], float]) -> str:
        """The attention patterns of subnetwork k's top heads on its top sequence, cropped to
        ``attention_window`` positions (queries and keys) ending at the peak, with a note
        naming the positions shown where the sequence is longer."""
        seq, pos, _ = top
        heads_a = self.top_heads(k, self.opt.n_heads)
        patterns = head_patterns(self.dec, self.x[seq], [(l_, h) for l_, h, _ in heads_a]) if heads_a else None
        if patterns is None:
            return ""
        names = [f"{self.head_label(l_, h)} (share {s:.2f})" for l_, h, s in heads_a]
        toks = self.to_str(self.x[seq])
        n, width = len(toks), self.opt.attention_window
        p = self.sample_position()
        end, peak = ((pos, f"the peak at position {pos}") if pos is not None
                     else (p, f"the decomposed position {p}") if p is not None else (n - 1, "the last position"))
        shown = attention_window(n, end, width)
        a, b = shown.start, shown.stop
        patterns, toks = patterns[:, a:b, a:b], toks[a:b]
        note = lookalike_note(toks)
        where = ""
        if len(shown) < n:
            which = (f"the first {width}, which hold {peak}" if a == 0 else
                     f"the {width} ending at {peak}; attention to positions 0&ndash;{a - 1} is not drawn")
            where = (f'<p class="muted">positions {a}&ndash;{b - 1} of {n} (0-based), {which} '
                     f"(attention_window={width})</p>")
        return (f"<h3>Attention patterns of its top heads on sequence {seq}{note}</h3>{where}"
                + self.views.attention_heads(patterns, toks, names))

    def curve_html(self, k: int, info: dict[str, Any]) -> str:
        """The intervention curve of subnetwork k (selectivity at delta = 1 goes into ``info``);
        a note instead where the data have a single sample, as it compares top samples with the rest."""
        from ..analysis.impact import curve_samples

        dec, opt = self.dec, self.opt
        head = ('<h3>Intervention curve <span class="muted">(output change when the weights move to W0 + delta '
                "v_k: its top 10% impact samples vs the rest)</span></h3>")
        if curve_samples(dec, self.x) < 2:
            info["selectivity (delta=1)"] = float("nan")
            return head + '<p class="muted">Not drawn: it compares top-impact samples with the rest, and these data ' \
                          "have a single sample.</p>"
        curve = dec.intervention_curve(self.x, k, list(opt.deltas), impacts=self.impacts.to(torch.float32))
        one = curve[curve["delta"] == 1.0]
        info["selectivity (delta=1)"] = float(one["selectivity"].iloc[0]) if len(one) else float("nan")
        ylab = "mean KL(before || after)" if self.lm else "mean squared change"
        return head + '<div class="row"><div>' + charts.line_chart(
            curve["delta"].tolist(), {"top samples": curve["change_top"].tolist(),
                                      "other samples": curve["change_rest"].tolist()},
            x_label="delta", y_label=ylab) + "</div><div>" + tables.dataframe(curve) + "</div></div>"

    def logits_html(self, k: int, top: list[tuple[int, Optional[int], float]]) -> str:
        """Most affected outputs at the top samples: d output / d delta along v_k (forward mode)."""
        from ..analysis.impact import output_derivative

        if not top:
            return ""
        seqs = [s for s, _, _ in top]
        d = output_derivative(self.dec, self.x[seqs], k).detach().to("cpu", torch.float64)
        if d.dim() == 3:
            if top[0][1] is not None:
                d = torch.stack([d[i, pos] for i, (_, pos, _) in enumerate(top)])
            else:  # sequence mode: at the decomposed position, or over every position (as ``top_logits``)
                p = self.sample_position()
                d = d[:, p] if p is not None else d.flatten(0, 1)
        d = torch.nan_to_num(d, nan=0.0)
        mean_abs, mean = d.abs().mean(0), d.mean(0)
        order = torch.argsort(mean_abs, descending=True, stable=True)[: self.opt.n_logits]
        what = "logits" if self.lm else "outputs"
        columns = ["id", "mean |d/d delta|", "mean d/d delta"]
        rows = [[int(i), float(mean_abs[i]), float(mean[i])] for i in order.tolist()]
        if self.lm and not self.ids_only:  # a token column, unless it would repeat the id
            columns.insert(1, "token")
            rows = [[r[0], name, *r[1:]] for r, name in zip(rows, self.to_str(order))]
        self.summary.setdefault(k, {})
        return (f"<h3>Most affected {what} at its top samples <span class=\"muted\">(d {what[:-1]} / d delta at "
                f"delta = 0, forward mode; the sign is relative: v and -v are equivalent)</span></h3>"
                + tables.table(columns, rows))

    def overview_html(self) -> str:
        dec = self.dec
        last = dec.history[-1] if dec.history else {}
        error = dec.reconstruction_error(self.x, self.reference)
        try:
            tl = metadata.version("transformer-lens")
        except metadata.PackageNotFoundError:
            tl = "unknown"
        n_dead = last.get("n_dead", int((self.p_act == 0).sum()))
        cards = [("reconstruction error (report data)", f"{error:.4f}"),
                 ("final training loss", f"{last['loss']:.4f}" if "loss" in last else "&ndash;"),
                 ("subnetworks", str(dec.n_subnetworks)), ("dead", str(n_dead)),
                 ("samples in report", f"{self.x.shape[0]}" + (f" &times; {self.x.shape[1]}" if self.token_mode else ""))]
        out = ['<section id="overview"><h2>Overview</h2>',
               f"<p>{esc(type(dec.model).__name__)} (transformer-lens {esc(tl)}); decomposed weights: "
               f"<code>{esc(', '.join(dec.weight_names[:24]))}{' ...' if len(dec.weight_names) > 24 else ''}</code></p>",
               '<div class="cards">' + "".join(f'<div class="card"><span class="muted">{esc(a)}</span><strong>{b}</strong></div>'
                                               for a, b in cards) + "</div>",
               '<div class="row">']
        if dec.history:
            epochs = [h.get("epoch", i) for i, h in enumerate(dec.history)]
            out.append("<div>" + charts.line_chart(epochs, {"loss": [h["loss"] for h in dec.history]},
                                                   x_label="epoch", y_label="reconstruction loss",
                                                   title="Training loss") + "</div>")
        colors = ["#0969da" if p > 0 else "#afb8c1" for p in self.p_act.tolist()]
        out.append("<div>" + charts.bar_chart([f"subnet {k}" for k in range(dec.n_subnetworks)], self.p_act.tolist(),
                                              colors=colors, title="P_act per subnetwork (grey: dead)") + "</div>")
        out.append("</div>")
        cfg = {k: v for k, v in dec.cfg.to_dict().items()}
        out.append("<details><summary>Configuration and training history</summary>"
                   + tables.table(["setting", "value"], [[k, str(v)] for k, v in cfg.items()])
                   + tables.table(["epoch", "loss", "lr", "dead"],
                                  [[h.get("epoch"), h.get("loss"), h.get("lr"), h.get("n_dead")] for h in dec.history])
                   + "</details>")
        rows = []
        for k in self.shown:
            s = self.summary.get(k, {})
            rows.append([f"{k}", s.get("P_act", float(self.p_act[k])), s.get("top heads", ""), s.get("top neuron", ""),
                         s.get("peak impact", float("nan")), s.get("selectivity (delta=1)", float("nan"))])
        cols = ["subnetwork", "P_act", "top heads (share)", "top neuron (share)", "peak impact", "selectivity (delta=1)"]
        keep = [i for i, c in enumerate(cols) if any(r[i] not in ("", None) for r in rows)]
        body = tables.table([cols[i] for i in keep], [[r[i] for i in keep] for r in rows])
        links = " ".join(f'<a href="#subnet-{k}">{k}</a>' for k in self.shown)
        out.append(f"<h3>Subnetworks shown, by P_act</h3>{body}<p>Jump to: {links}</p></section>")
        return "\n".join(out)

    def comparison_html(self) -> str:
        """Any comparison object: its DataFrames as tables (``heads`` first, with a [layer x
        head] heat map per score column when it has layer and head columns), its scalar and
        dict-of-scalar attributes as a small table. Nothing else about it is assumed."""
        import pandas as pd

        c = self.comparison
        if dataclasses.is_dataclass(c):
            names = [f.name for f in dataclasses.fields(c)]
        else:
            names = sorted(vars(c)) if hasattr(c, "__dict__") else []
        names = ["heads"] + [n for n in names if n != "heads" and not n.startswith("_")]
        out = ['<section id="comparison"><h2>Comparison with activation patching</h2>',
               f'<p class="muted">{esc(type(c).__name__)}</p>']
        scalars = []
        for name in names:
            value = getattr(c, name, None)
            if isinstance(value, (bool, int, float, str)):
                scalars.append([name, value])
            elif isinstance(value, dict) and value and all(isinstance(v, (bool, int, float, str)) for v in value.values()):
                scalars.extend([f"{name}: {k}", v] for k, v in value.items())
        if scalars:
            out.append(tables.table(["property", "value"], scalars))
        for name in names:
            value = getattr(c, name, None)
            if not isinstance(value, pd.DataFrame):
                continue
            out.append(f"<h3>{esc(name)}</h3>")
            if name == "heads":
                out.append(self.head_maps(value))
            out.append(tables.dataframe(value))
        out.append("</section>")
        return "\n".join(out)

    def head_maps(self, df) -> str:
        """A heat map per numeric score column of a (layer, head) table (colour: |value|); a
        head with no row (not patched) is NaN, drawn as "–"."""
        import pandas as pd

        if not {"layer", "head"} <= set(df.columns) or not len(df):
            return ""
        try:
            layers = df["layer"].astype(int)
            heads = df["head"].astype(int)
        except (TypeError, ValueError):
            return ""
        L, H = int(layers.max()) + 1, int(heads.max()) + 1
        if L * H > 4096 or layers.min() < 0 or heads.min() < 0:
            return ""
        maps = []
        for col in df.columns:
            if col in ("layer", "head") or str(col).startswith("rank_") or not pd.api.types.is_float_dtype(df[col]):
                continue
            grid = [[math.nan] * H for _ in range(L)]
            for lay, h, v in zip(layers, heads, df[col]):
                grid[lay][h] = float(v)
            maps.append("<div>" + charts.heatmap(grid, [f"L{i}" for i in range(L)], [f"H{j}" for j in range(H)],
                                                 title=str(col), signed=True) + "</div>")
        return '<div class="row">' + "".join(maps) + "</div>" if maps else ""

    def body(self) -> str:
        """Sections in reading order (subnetwork sections are computed first: the overview
        summarises them)."""
        sections = []
        items = self.shown
        if self.progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="report", unit="subnetwork")
        for k in items:
            sections.append(self.subnet_section(k))
        dead = [k for k in range(self.dec.n_subnetworks) if k not in self.shown]
        head = [f"<h1>{esc(self.title)}</h1>",
                '<p class="muted">Local Loss Landscape Decomposition (Chrisman, Bushnaq &amp; Sharkey, arXiv:2504.00194): '
                "each subnetwork is a low-rank direction in parameter space; a few of them reconstruct each sample's "
                "gradient of divergence from a reference output.</p>", self.overview_html()]
        if self.comparison is not None:
            head.append(self.comparison_html())
        if dead:
            head.append(f"<p class=\"muted\">Not shown (dead or not selected): {esc(', '.join(map(str, dead)))}</p>")
        if self.all_dead:
            head.append(f"<p><strong>{esc('Every subnetwork is dead (P_act 0): all of them are shown.')}</strong></p>")
        return '<div class="l3d-report">\n' + "\n".join(head + sections) + "\n</div>\n"


class Report:
    """A built report: ``html`` is the full self-contained page, ``save(path)`` writes it,
    and ``_repr_html_`` gives the same views for inline display in Jupyter (the bundle
    inlined, nothing fetched: CircuitsVis' own ``_repr_html_`` probes the internet).

    ``body`` numbers its CircuitsVis mount points after ``prefix``, a random string no token or
    title can contain: the page numbers them ``l3d-cv-0, 1, ...`` (same inputs, same file), and
    every inline display gets a fresh prefix, so reports shown in one notebook page (also from
    before a kernel restart) never share an id."""

    def __init__(self, body: str, title: str, summary: list[dict[str, Any]], prefix: str = "l3d-cv-"):
        self.body = body
        self.title = title
        self.summary = summary
        self.prefix = prefix

    def _body(self, prefix: str) -> str:
        return self.body.replace(self.prefix, prefix)

    @property
    def html(self) -> str:
        return page(self.title, self._body("l3d-cv-"))

    def save(self, path) -> Path:
        """Write the page to ``path`` (an .html file; missing folders are made) and return it. The
        file is replaced whole (``replace_file``): a failed write leaves an earlier report intact."""
        path = writable_html_path(path)
        html = self.html  # the page (and the bundle) before any folder is made
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, html.encode("utf-8"))
        return path

    def _repr_html_(self) -> str:
        """Without the CircuitsVis bundle the report is still shown, a note in place of each view."""
        return fragment(self._body(f"l3d-{uuid.uuid4().hex[:12]}-cv-"))

    def __repr__(self) -> str:
        return f"<l3d_lens report {self.title!r}: {len(self.summary)} subnetworks shown>"


def build(dec, data, *, comparison=None, to_str: Optional[ToStr] = None, impacts: Optional[torch.Tensor] = None,
          reference: Any = None, progress: bool = False, inline: bool = False, **options: Any) -> Report:
    """Compute every view of the report; see ``l3d_lens.report`` for the arguments. Every
    option is checked before any analysis runs, and so is the CircuitsVis bundle a saved page
    needs, unless ``inline`` (``show``: its display notes each view it cannot draw)."""
    valid = sorted(f.name for f in dataclasses.fields(Options))
    unknown = set(options) - set(valid)
    if unknown:
        raise TypeError(f"unknown report option(s) {sorted(unknown)}; valid: {valid}")
    opt = Options(**options)
    if not inline:
        circuitsvis_bundle()  # a missing bundle is reported now, not after the analyses
    prefix = f"l3d-{uuid.uuid4().hex}-cv-"
    b = Builder(dec, data, comparison=comparison, to_str=to_str, impacts=impacts, reference=reference, options=opt,
                progress=progress, prefix=prefix)
    body = b.body()
    summary = [b.summary[k] for k in b.shown if k in b.summary]
    return Report(body, b.title, summary, prefix)
