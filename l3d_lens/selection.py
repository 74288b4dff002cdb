"""Component selection: TransformerLens-style selectors -> the weights (or head/neuron slices)
to decompose.

Grammar: a glob over TransformerLens weight names, matching a weight or any weight under a
prefix (``blocks.3`` = the whole block, ``blocks.*.mlp``, ``blocks.3.attn.W_Q``, ``embed``,
``unembed``), optionally followed by ``[i,j,a:b]``: heads of attention weights, or neurons
(d_mlp) of MLP weights, never both from one list. Weights without that axis (b_O, b_out) drop
out of a sliced selection.
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


def _parse_items(text: str, selector: str) -> list[int]:
    if not text.strip():
        raise ValueError(f"selector {selector!r}: empty index list []; {_SYNTAX}")
    out: list[int] = []
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
            out.extend(range(int(a), int(b)))
        elif item.isdigit():
            out.append(int(item))
        else:
            raise ValueError(f"selector {selector!r}: bad index {item!r} in [{text}]; {_SYNTAX}")
    return out


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
    bad = _bad_item(last.group("items")) if last else None
    if bad is not None and _matching(adapter, last.group("pattern")):
        dash = re.fullmatch(r"(\d+)\s*-\s*(\d+)", bad)
        hint = f"; a range is start:stop with stop left out, here {dash[1]}:{int(dash[2]) + 1}" if dash else ""
        return ValueError(f"selector {selector!r}: bad index {bad!r} in [{last.group('items')}]{hint} "
                          f"(an index list: {_SYNTAX})")
    hint = f" (an index list: {_SYNTAX})" if sel.endswith("]") else ""
    return ValueError(f"selector {selector!r} matches no weight{hint}; available: {available(adapter)}")


def _module_glob(sites: list[Site]) -> str:
    """One glob naming the modules of these weights: 'blocks.1.attn', or 'blocks.*.attn' over layers."""
    modules = list(dict.fromkeys(s.name.rpartition(".")[0] for s in sites))
    folded = list(dict.fromkeys(_LAYER.sub(r"blocks.*\2", m) for m in modules))
    return modules[0] if len(modules) == 1 else folded[0]


def _sliceable(selector: str, text: str, matched: list[Site], saved: bool = False) -> list[Site]:
    """The matched weights an index list slices: all attention weights (by head) or all MLP
    weights (by neuron). One list over both would pick head i and neuron i at once: refused,
    except in a selection ``saved`` by an earlier l3d_lens, which took both (with a warning)."""
    heads = [s for s in matched if "head" in s.modes]
    neurons = [s for s in matched if "head" not in s.modes and "d_mlp" in s.modes]
    if not heads and not neurons:
        raise ValueError(
            f"selector {selector!r}: an index list [..] selects heads of attention weights or neurons of "
            f"MLP weights, and none of the matched weights has either axis"
        )
    if heads and neurons:
        forms = f"'{_module_glob(heads)}[{text.strip()}]' for heads or '{_module_glob(neurons)}[{text.strip()}]' for neurons"
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
        m = _SUBSET.match(sel)
        if m and re.search(r"\d\s*-", m.group("items")):  # a glob range (blocks.[0-1]), not an index list
            m = None
        pattern, items = (m.group("pattern"), _parse_items(m.group("items"), sel)) if m else (sel, None)
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
            bad = [i for i in items if i >= size]
            if bad:
                what = "head" if mode == "head" else "neuron"
                raise ValueError(f"selector {selector!r}: {what} {bad[0]} out of range for {s.name}; valid: 0..{size - 1}")
            if s.name in chosen and chosen[s.name] is None:
                continue
            chosen[s.name] = (chosen.get(s.name) or set()) | set(items)
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
