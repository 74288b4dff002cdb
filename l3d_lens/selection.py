"""Component selection: TransformerLens-style selectors -> the weights (or head/neuron slices)
to decompose.

Grammar: a glob over TransformerLens weight names, matching a weight or any weight under a
prefix (``blocks.3`` = the whole block, ``blocks.*.mlp``, ``blocks.3.attn.W_Q``, ``embed``,
``unembed``), optionally followed by ``[i,j,a:b]``: heads of attention weights, or neurons
(d_mlp) of MLP weights, never both from one list. Weights without that axis (b_O, b_out) drop
out of a sliced selection. A [..] after a '.' is a glob segment (``blocks.[0-1]``); right after
a name a dash range, or right after a number a list of indices, could be either
('blocks.1[0-1]', 'blocks.1[01]': units of block 1, or blocks 10-11) and is refused where both
readings select weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from typing import Optional

import torch

from .adapters import Adapter, Site

_SUBSET = re.compile(r"^(?P<pattern>.*?)\[(?P<items>[-0-9,:\s]*)\]$")
_TRAILING = re.compile(r"^(?P<pattern>.*?)\[(?P<items>[^\[\]]*)\]$")  # any last [..], index list or glob
_SYNTAX = "write [i,j,a:b] of indices >= 0 right after the name, e.g. 'blocks.0.attn[0,2]', 'blocks.1.mlp[3:9,20]'"
_LAYER = re.compile(r"^blocks\.(\d+)(\.|$)")
_DASH = re.compile(r"\d\s*-")  # a dash range: a glob class ([0-1]); an index range is a:b
_DASH_RANGE = re.compile(r"(\d+)\s*-\s*(\d+)")
_LEADING_ZERO = re.compile(r"(?<![\d:])0\d+(?![\d:])")  # '01', a glob class (0 or 1), not a range bound
_BIAS_KINDS = ("bias", "ln_b")


@dataclasses.dataclass(frozen=True)
class Selected:
    """A decomposed weight: the whole tensor, or its slice along one mode (heads or neurons)."""

    site: Site
    axis: Optional[int] = None
    indices: Optional[tuple[int, ...]] = None

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.site.shape)
        if self.axis is not None:
            shape[self.axis] = len(self.indices)
        return tuple(shape)

    @property
    def mode_slice(self) -> Optional[tuple[str, torch.Tensor]]:
        if self.axis is None:
            return None
        return self.site.modes[self.axis], torch.tensor(self.indices, dtype=torch.long)

    def take(self, full: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The selected part of a full TL-shaped tensor (``offset`` leading batch axes)."""
        if self.axis is None:
            return full
        idx = torch.tensor(self.indices, dtype=torch.long, device=full.device)
        return full.index_select(offset + self.axis, idx)

    def scatter(self, part: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """A full TL-shaped tensor, zero outside the selection."""
        if self.axis is None:
            return part
        shape = list(part.shape)
        shape[offset + self.axis] = self.site.shape[self.axis]
        out = part.new_zeros(shape)
        idx = torch.tensor(self.indices, dtype=torch.long, device=part.device)
        return out.index_copy(offset + self.axis, idx, part)


def _is_bias(site: Site) -> bool:
    return site.kind.startswith("b_") or site.kind in _BIAS_KINDS


def _parse_items(text: str, selector: str, saved: bool = False) -> list[range]:
    """The entries of an index list, each a range (i is i:i+1), not expanded: their bounds are
    checked against the axis before any is (``blocks.0.attn[0:30000000]``). A number with a
    leading zero is refused (``[01]`` reads as "0 or 1" where a glob may stand), except in a
    selection ``saved`` by an earlier l3d_lens, which read it as the number."""
    if not text.strip():
        raise ValueError(f"selector {selector!r}: empty index list []; {_SYNTAX}")
    out: list[range] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"selector {selector!r}: empty entry in [{text}]; {_SYNTAX}")
        if "-" in item:
            raise ValueError(f"selector {selector!r}: negative index {item!r}; {_SYNTAX}")
        if ":" in item:
            a, _, b = item.partition(":")
            if not a.strip().isdigit() or not b.strip().isdigit() or int(b) <= int(a):
                raise ValueError(f"selector {selector!r}: bad range {item!r}; write start:stop with stop > start")
            out.append(range(int(a), int(b)))
        elif item.isdigit():
            out.append(range(int(item), int(item) + 1))
        else:
            raise ValueError(f"selector {selector!r}: bad index {item!r} in [{text}]; {_SYNTAX}")
        zero = next((n for n in item.split(":") if len(n.strip()) > 1 and n.strip().startswith("0")), None)
        if zero is not None and not saved:
            raise ValueError(f"selector {selector!r}: index {zero.strip()!r} has a leading zero, which a glob reads "
                             f"as a set of digits ([01]: 0 or 1); write several indices as 0,1 or a range as 0:2, "
                             f"and each number without leading zeros (an earlier l3d_lens read {zero.strip()!r} as "
                             f"{int(zero)}: write {int(zero)} to resume a run of it)")
    return out


def _first_out_of_range(items: list[range], size: int) -> Optional[int]:
    """The first index of ``items`` (in the order written) that is >= ``size``, or None."""
    return next((max(r.start, size) for r in items if r.stop > size), None)


def _index_position(pattern: str) -> bool:
    """Whether a [..] after ``pattern`` can be an index list: right after a name, not after a
    '.' or at the start, where it is a glob segment (``blocks.[01]``)."""
    return pattern[-1:] not in ("", ".")


def _index_list(adapter: Adapter, selector: str, sel: str, saved: bool = False) -> Optional[re.Match]:
    """The index list ``sel`` ends with, or None where its last [..] is a glob. A dash range
    right after a name, or a list of single indices right after a number, that also selects
    weights as a glob ('blocks.1[0-1]' or 'blocks.1[01]': units of block 1, or blocks 10 and 11)
    is refused, naming both spellings, except in a selection ``saved`` by an earlier l3d_lens,
    which read a dash range as the glob (taken, with a warning) and any other list as indices; a
    dash range that selects nothing as a glob is reported as a bad index list."""
    m = _SUBSET.match(sel)
    if m is None or not _index_position(m.group("pattern")):
        return None
    dash = bool(_DASH.search(m.group("items")))
    digits = m.group("pattern")[-1].isdigit() and ":" not in m.group("items")  # 'blocks.1[01]': blocks.10?
    if not dash and (saved or not digits):  # an earlier l3d_lens read every list without a dash as indices
        return m
    globbed = _matching(adapter, sel)
    if not dash and not globbed:
        return m
    heads, neurons = _units(_matching(adapter, m.group("pattern")))
    if globbed and (heads or neurons):
        items = m.group("items").strip()
        ranges = _colon_ranges(items)
        modules = _listed(list(dict.fromkeys(_glob_prefix(s.name, sel) for s in globbed)))
        units = " or ".join(unit for sites, unit in ((heads, "heads"), (neurons, "neurons")) if sites)
        forms = (f"write {_unit_forms(heads, neurons, ranges)} (an index range is start:stop with stop left out), "
                 f"or '{sel}.*' for the glob")
        if not saved:
            raise ValueError(f"selector {selector!r} is ambiguous: [{items}] right after a name reads as {units} "
                             f"[{items}] of {m.group('pattern')}, or as a glob over {modules}; {forms}")
        warnings.warn(f"selector {selector!r} (saved by an earlier l3d_lens) is read as the glob over {modules} it "
                      f"was computed on, but a new run refuses it as ambiguous: {forms}", stacklevel=5)
    return None


def _colon_ranges(text: str) -> str:
    """``text`` with each glob class written as index list: a dash range as an index range
    ('0-1' -> '0:2'), digits with a leading zero as single indices ('01' -> '0,1')."""
    text = _DASH_RANGE.sub(lambda d: f"{d[1]}:{int(d[2]) + 1}", text)
    return _LEADING_ZERO.sub(lambda d: ",".join(dict.fromkeys(d[0])), text)


def _glob_prefix(name: str, pattern: str) -> str:
    """The shortest leading part of a weight name that the glob matches ('blocks.10')."""
    parts = name.split(".")
    return next(".".join(parts[:k]) for k in range(1, len(parts) + 1)
                if fnmatch.fnmatchcase(".".join(parts[:k]), pattern))


def available(adapter: Adapter) -> str:
    """Compact list of decomposable weight names, layers folded to a range."""
    seen: dict[str, None] = {}
    n = adapter.n_layers
    for name in adapter.sites:
        folded = _LAYER.sub(lambda m: f"blocks.{{0..{n - 1}}}" + m.group(2), name) if n else name
        seen[folded] = None
    return ", ".join(seen)


#: how many left-out weights a message names before "and N more"
MAX_LISTED = 8


def _left_out(adapter: Adapter, selector: str, pattern: str, matched_any: bool, include_biases: bool) -> None:
    """Weights the selector covers that the adapter cannot decompose (``adapter.unsupported``):
    an error that says why when nothing else matched, else a warning that they are left out."""
    covered = [n for n in adapter.unsupported
               if (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*"))
               and (include_biases or n == pattern or not _bias_name(n))]
    if not covered:
        return
    by_reason: dict[str, list[str]] = {}
    for n in covered:
        by_reason.setdefault(adapter.unsupported[n], []).append(n)
    if not matched_any:
        raise ValueError(f"selector {selector!r}: " + "; and ".join(f"{_listed(names)} cannot be decomposed: {why}"
                                                                     for why, names in by_reason.items()))
    for why, names in by_reason.items():  # one warning per reason, each naming its own weights
        warnings.warn(f"selector {selector!r} leaves out {_listed(names)}: {why}", stacklevel=4)


def _listed(names: list[str]) -> str:
    """The first ``MAX_LISTED`` names, then how many more."""
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _bias_name(name: str) -> bool:
    """A bias by its last segment: TransformerLens's b_Q ... b_U, a LayerNorm's b, a module's bias."""
    last = name.rpartition(".")[2]
    return last.startswith("b_") or last in ("b", "bias")


def _matching(adapter: Adapter, pattern: str) -> list[Site]:
    """Sites whose name matches the glob, or lies under a module the glob names."""
    return [s for s in adapter.sites.values()
            if fnmatch.fnmatchcase(s.name, pattern) or fnmatch.fnmatchcase(s.name, pattern + ".*")]


def _bad_item(text: str) -> Optional[str]:
    """The first entry of ``[text]`` that is neither an index >= 0 nor an a:b range, or None."""
    for item in text.split(","):
        a, colon, b = item.strip().partition(":")
        if not (a.strip().isdigit() and (not colon or b.strip().isdigit())):
            return item.strip()
    return None


def _no_match(adapter: Adapter, selector: str, sel: str, biases: list[Site]) -> ValueError:
    """Why a selector selects nothing: only biases that include_biases=False leaves out, a
    malformed index list after a name that does match, or no weight of that name."""
    if biases:
        shown = ", ".join(s.name for s in biases[:4]) + (", ..." if len(biases) > 4 else "")
        return ValueError(
            f"selector {selector!r} matches only biases ({shown}), which include_biases=False leaves out; "
            f"name them exactly (e.g. {biases[0].name!r}) or set include_biases=True"
        )
    last = _TRAILING.match(sel)
    if last and not _index_position(last.group("pattern")):
        last = None  # a glob segment (blocks.[5]), not an index list
    bad = _bad_item(last.group("items")) if last else None
    if bad is not None and _matching(adapter, last.group("pattern")):
        dash = _DASH_RANGE.fullmatch(bad)
        hint = f"; a range is start:stop with stop left out, here {_colon_ranges(bad)}" if dash else ""
        return ValueError(f"selector {selector!r}: bad index {bad!r} in [{last.group('items')}]{hint} "
                          f"(an index list: {_SYNTAX})")
    hint = f" (an index list: {_SYNTAX})" if last else ""
    return ValueError(f"selector {selector!r} matches no weight{hint}; available: {available(adapter)}")


def _module_glob(sites: list[Site]) -> str:
    """One glob naming the modules of these weights: 'blocks.1.attn', or 'blocks.*.attn' over layers."""
    modules = list(dict.fromkeys(s.name.rpartition(".")[0] for s in sites))
    folded = list(dict.fromkeys(_LAYER.sub(r"blocks.*\2", m) for m in modules))
    return modules[0] if len(modules) == 1 else folded[0]


def _units(matched: list[Site]) -> tuple[list[Site], list[Site]]:
    """The attention weights (a head axis) and the MLP weights (a neuron axis) among these."""
    heads = [s for s in matched if "head" in s.modes]
    neurons = [s for s in matched if "head" not in s.modes and "d_mlp" in s.modes]
    return heads, neurons


def _unit_forms(heads: list[Site], neurons: list[Site], text: str) -> str:
    """The index lists that slice these heads and these neurons: "'blocks.1.attn[0]' for heads or ..."."""
    forms = [f"'{_module_glob(sites)}[{text}]' for {unit}" for sites, unit in ((heads, "heads"), (neurons, "neurons"))
             if sites]
    return " or ".join(forms)


def _sliceable(selector: str, text: str, matched: list[Site], saved: bool = False) -> list[Site]:
    """The matched weights an index list slices: all attention weights (by head) or all MLP
    weights (by neuron). One list over both would pick head i and neuron i at once: refused,
    except in a selection ``saved`` by an earlier l3d_lens, which took both (with a warning)."""
    heads, neurons = _units(matched)
    if not heads and not neurons:
        raise ValueError(
            f"selector {selector!r}: an index list [..] selects heads of attention weights or neurons of "
            f"MLP weights, and none of the matched weights has either axis"
        )
    if heads and neurons:
        forms = _unit_forms(heads, neurons, text.strip())
        if not saved:
            raise ValueError(f"selector {selector!r}: one index list must address one kind of unit, but it covers "
                             f"attention weights (heads) and MLP weights (neurons); write {forms}")
        warnings.warn(f"selector {selector!r} (saved by an earlier l3d_lens) slices heads and neurons with one index "
                      f"list; loaded as it was computed, but a new run refuses it: write {forms}", stacklevel=5)
        return [s for s in matched if s in heads or s in neurons]
    return heads or neurons


def select(adapter: Adapter, selectors: tuple[str, ...], include_biases: bool = True, *,
           saved: bool = False) -> list[Selected]:
    """Resolve selectors to the list of decomposed weights, in model order. ``saved``: the
    selectors of a saved decomposition, read as the l3d_lens that saved them read them."""
    chosen: dict[str, Optional[set[int]]] = {}
    for selector in selectors:
        sel = selector.strip()
        m = _index_list(adapter, selector, sel, saved)
        pattern, items = (m.group("pattern"), _parse_items(m.group("items"), sel, saved)) if m else (sel, None)
        if pattern != pattern.rstrip():
            raise ValueError(f"selector {selector!r}: space before the index list; {_SYNTAX}")
        layer = _LAYER.match(pattern)
        if layer and adapter.n_layers and int(layer.group(1)) >= adapter.n_layers:
            raise ValueError(
                f"selector {selector!r}: layer {layer.group(1)} out of range; the model has {adapter.n_layers} "
                f"layers (0..{adapter.n_layers - 1})"
            )
        found = _matching(adapter, pattern)
        matched = found if include_biases else [s for s in found if not _is_bias(s) or s.name == pattern]
        _left_out(adapter, selector, pattern, bool(matched), include_biases)
        if not matched:
            raise _no_match(adapter, selector, sel, found)
        if items is not None:
            matched = _sliceable(selector, m.group("items"), matched, saved)
        for s in matched:
            if items is None:
                chosen[s.name] = None
                continue
            mode = "head" if "head" in s.modes else "d_mlp"
            size = s.shape[s.modes.index(mode)]
            bad = _first_out_of_range(items, size)
            if bad is not None:
                what = "head" if mode == "head" else "neuron"
                raise ValueError(f"selector {selector!r}: {what} {bad} out of range for {s.name}; valid: 0..{size - 1}")
            if s.name in chosen and chosen[s.name] is None:
                continue
            chosen[s.name] = (chosen.get(s.name) or set()).union(*items)
    out = []
    for name, site in adapter.sites.items():
        if name not in chosen:
            continue
        idx = chosen[name]
        if idx is None or len(idx) == site.shape[site.modes.index("head" if "head" in site.modes else "d_mlp")]:
            out.append(Selected(site))
        else:
            axis = site.modes.index("head" if "head" in site.modes else "d_mlp")
            out.append(Selected(site, axis, tuple(sorted(idx))))
    return out
