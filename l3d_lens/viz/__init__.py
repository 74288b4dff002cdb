"""The L3D report: one self-contained HTML file (or an inline Jupyter view) with an overview
of a decomposition and, per live subnetwork, where it lives (heads, neurons, weights), where
it acts (top samples as CircuitsVis coloured tokens, attention of its top heads), what it
does to the outputs (most affected logits, intervention curve), and an optional comparison
with activation patching. Works with no network: the CircuitsVis bundle is inlined once.

    l3d_lens.report(dec, tokens, "report.html", to_str=model.to_str_tokens)
    l3d_lens.show(dec, tokens)          # in Jupyter
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .build import DELTAS, Options, Report, ToStr, build, writable_html_path

__all__ = ["report", "show", "build", "Report", "Options", "DELTAS"]


def report(dec, data, path="l3d_report.html", *, comparison: Any = None, to_str: Optional[ToStr] = None,
           impacts: Optional[torch.Tensor] = None, reference: Any = None, progress: bool = False,
           **options: Any) -> Path:
    """Write the report of ``dec`` on ``data`` to ``path`` (one HTML file, no network needed)
    and return the path.

    data: token ids [n, seq] (or floats for a plain module, or an iterable of batches); the
        first ``max_sequences`` (default 128) are used.
    comparison: the result of ``l3d_lens.patching.compare_with_patching`` (any object with a
        ``.heads`` DataFrame; its other DataFrame attributes are shown too).
    to_str: token ids (1-D tensor) -> list of strings, e.g. ``model.to_str_tokens``; default:
        the model's tokenizer one token at a time, or the ids.
    impacts: precomputed ``dec.impact(data)`` to reuse (else computed with ``n_references``);
        pass the ``n_references`` they used too, or the caption says only "as supplied".
    reference: the paired reference data, for a decomposition with ``reference="paired"``.
    options: max_sequences=128, n_references=None (4 when the report computes the impacts; with
        ``impacts``, how many references those averaged, for the caption), n_top=4 (samples per
        subnetwork), n_heads=4 (attention patterns shown), n_logits=10, n_neurons=16,
        subnetworks=None (default: all live, by P_act), deltas (intervention curve), title (no
        lone surrogate), attention_window=128 (positions per attention view, ending at the top
        sample's peak; a longer sequence is cropped, with a note; 0 or None: no attention views).
    Same inputs give a byte-identical file, replaced whole: a failed write leaves an earlier one
    intact. The path (an .html file, not a folder, in a folder where a file can be made) and the
    CircuitsVis bundle are checked before any analysis.
    """
    path = writable_html_path(path)  # before any analysis
    return build(dec, data, comparison=comparison, to_str=to_str, impacts=impacts, reference=reference,
                 progress=progress, **options).save(path)


def show(dec, data, *, comparison: Any = None, to_str: Optional[ToStr] = None,
         impacts: Optional[torch.Tensor] = None, reference: Any = None, **options: Any) -> Optional[Report]:
    """The report's views inline in Jupyter, offline. In a Jupyter kernel this displays the
    report once and returns None; elsewhere (a script, a terminal IPython, which cannot draw
    HTML) it returns the ``Report`` (``.html``, ``.save(path)``, ``_repr_html_``), so the
    computed report is kept. Arguments as for ``report``."""
    rep = build(dec, data, comparison=comparison, to_str=to_str, impacts=impacts, reference=reference,
                inline=in_kernel(), **options)
    if not in_kernel():
        return rep
    from IPython.display import display

    display(rep)
    return None


def in_kernel() -> bool:
    """Whether this runs in an IPython kernel (Jupyter, VS Code, Colab: a front end that draws
    HTML), told by the shell's ``kernel`` attribute, which a terminal IPython lacks."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None
