"""Safe, deterministic HTML: escaping, JSON props for CircuitsVis, the inlined bundle and the
page shell.

Rules kept here (see CIRCUITSVIS_NOTES): the CircuitsVis bundle is inlined once as a classic
script (``CircuitsVis`` becomes a global) in a page that has a view, and every view is a
closed ``<div>``, a note shown while it is empty (``NOTE``) and a small module script calling
``CircuitsVis.render``; ids are numbered, never random; every string from a tokenizer or a
user is HTML-escaped (a token in a view also has look-alikes for ``<``, ``>`` and ``&``:
``token_inert``), and JSON props escape ``<``, ``>`` and ``&`` so nothing inside them can
close a script element. Non-finite numbers never reach a view.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from collections.abc import Iterable
from importlib import resources
from typing import Any

import torch

# The report page may load nothing from anywhere: no network, no other file.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "font-src data:; connect-src 'none'; worker-src 'none'")

# A lone surrogate cannot be written as UTF-8: any string that becomes HTML shows it as U+FFFD.
SURROGATE = re.compile("[\ud800-\udfff]")

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def esc(text: Any) -> str:
    """Text for HTML element content or a quoted attribute value (a lone surrogate, which
    could not be written as UTF-8, becomes U+FFFD)."""
    return html.escape(SURROGATE.sub("\ufffd", str(text)), quote=True)


_LOOKALIKE = str.maketrans({"<": "\u2039", ">": "\u203a", "&": "\uff06"})


def token_inert(token: Any) -> str:
    """A token as the CircuitsVis views show it: they draw it both as HTML and as plain text
    (the tooltip of a coloured token, the canvas of attention heads), where an entity would
    show literally. So it keeps no character HTML reads differently from text: ``<``, ``>``
    and ``&`` become look-alikes (single guillemets, a fullwidth ampersand), inert in both;
    quotes are plain text in element content."""
    return SURROGATE.sub("\ufffd", str(token)).translate(_LOOKALIKE)


def token_html(token: Any) -> str:
    """A token for ColoredTokens, which inserts it as HTML: ``token_inert``, escaped for
    element content all the same, so that no markup can form whatever the look-alikes are."""
    return html.escape(token_inert(token), quote=False)


def lookalike_note(tokens: Iterable[str], where: str = "this view") -> str:
    """A heading's note where ``tokens`` hold a character that ``token_inert`` replaces."""
    if not any(c in t for t in tokens for c in "<>&"):
        return ""
    return (f' <span class="muted">(&lt;, &gt; and &amp; in tokens are drawn as &#x2039;, &#x203a; and &#xff06; '
            f"in {esc(where)})</span>")


_BIG = 1e30


def clean(values: Any, fill: float = 0.0, lo: float | None = None, hi: float | None = None, digits: int = 5) -> Any:
    """Nested lists of finite floats, rounded to ``digits`` significant digits (deterministic,
    compact JSON); NaN becomes ``fill``, inf the nearest bound (or +-1e30); optional clipping."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).tolist()
    elif hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        return [clean(v, fill, lo, hi, digits) for v in values]
    v = float(values)
    if math.isnan(v):
        v = fill
    elif math.isinf(v):
        v = (hi if hi is not None else _BIG) if v > 0 else (lo if lo is not None else -_BIG)
    if lo is not None:
        v = max(v, lo)
    if hi is not None:
        v = min(v, hi)
    return float(f"{v:.{digits}g}")


def json_props(props: dict[str, Any]) -> str:
    """JSON for a script element: sorted keys, no NaN (raises), ``<``/``>``/``&`` escaped, a
    lone surrogate as U+FFFD."""
    text = json.dumps(props, allow_nan=False, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    text = SURROGATE.sub("\ufffd", text)
    for ch, rep in _JSON_ESCAPES.items():
        text = text.replace(ch, rep)
    return text


class BundleError(RuntimeError):
    """The CircuitsVis bundle cannot be inlined (missing, or with markup that would break the page)."""


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """The CircuitsVis browser bundle (``circuitsvis/dist/cdn/iife.js``), made safe to inline
    in a classic script element: its one ``</script`` (inside a string literal) is written
    ``<\\/script`` and the source-map comment (a request when dev tools open) is dropped."""
    try:
        path = resources.files("circuitsvis") / "dist" / "cdn" / "iife.js"
        text = path.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise BundleError(f"the CircuitsVis JavaScript bundle is missing ({e}); pip install circuitsvis") from None
    lines = [line for line in text.splitlines() if not line.startswith("//# sourceMappingURL=")]
    text = "\n".join(lines)
    for variant in ("</script", "</SCRIPT", "</Script"):
        text = text.replace(variant, "<\\/script")
    if "</script" in text.lower() or "<!--" in text:
        raise BundleError("the CircuitsVis bundle contains markup that cannot be inlined safely")
    return text


# Shown after each view until CircuitsVis draws into it (STYLE hides it then): where scripts do
# not run (an untrusted notebook, a viewer without JavaScript) the reader sees why it is blank.
NOTE = ('<div class="l3d-cv-note muted">interactive view: needs JavaScript (in Jupyter: a trusted '
        "notebook)</div>")
RENDER = re.compile(r'<script type="module">CircuitsVis\.render\(.*?\);</script>\n')


class Views:
    """Numbered CircuitsVis mount points: ``<div id="{prefix}{i}" class="l3d-cv"></div>``, the
    ``NOTE`` and a module script rendering into it. Same calls in the same order give the same HTML."""

    def __init__(self, prefix: str = "l3d-cv-"):
        self.prefix = prefix
        self.count = 0

    def render(self, component: str, props: dict[str, Any]) -> str:
        if not component.isidentifier():
            raise ValueError(f"not a CircuitsVis component name: {component!r}")
        mount = f"{self.prefix}{self.count}"
        self.count += 1
        return (f'<div id="{mount}" class="l3d-cv" data-component="{component}"></div>{NOTE}\n'
                f'<script type="module">CircuitsVis.render("{mount}", CircuitsVis.{component}, '
                f"{json_props(props)});</script>\n")

    def colored_tokens(self, tokens: Iterable[Any], values: Iterable[float], min_value: float, max_value: float) -> str:
        """Tokens coloured by value with explicit, finite bounds (one NaN with default bounds
        hides the whole row in CircuitsVis)."""
        lo, hi = clean(min_value, 0.0), clean(max_value, 1.0)
        if not hi > lo:
            hi = lo + 1.0
        return self.render("ColoredTokens", {"tokens": [token_html(t) for t in tokens],
                                             "values": clean(list(values), 0.0, lo, hi),
                                             "minValue": lo, "maxValue": hi})

    def attention_heads(self, attention: Any, tokens: Iterable[Any], names: list[str]) -> str:
        """[heads, dest, src] attention patterns (values clipped to [0, 1]) with head names."""
        return self.render("AttentionHeads", {"attention": clean(attention, 0.0, 0.0, 1.0, 4),
                                              "tokens": [token_inert(t) for t in tokens],
                                              "attentionHeadNames": [str(n) for n in names],
                                              "minValue": 0.0, "maxValue": 1.0, "maskUpperTri": True})


PAGE_STYLE = "body{margin:0;background:#fff}"
STYLE = """
.l3d-report{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2328;
max-width:1100px;margin:0 auto;padding:16px 24px;font-size:14px;line-height:1.45}
.l3d-report h1{font-size:24px;margin:8px 0 4px}.l3d-report h2{font-size:19px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
.l3d-report h3{font-size:15px;margin:16px 0 6px}.l3d-report .muted{color:#656d76}
.l3d-report table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
.l3d-report th,.l3d-report td{border:1px solid #d0d7de;padding:3px 8px;text-align:right;white-space:nowrap}
.l3d-report th{background:#f6f8fa}.l3d-report td.t,.l3d-report th.t{text-align:left;white-space:pre-wrap;font-family:ui-monospace,monospace}
.l3d-report .cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.l3d-report .card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:120px}
.l3d-report .card strong{display:block;font-size:20px}
.l3d-report .row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.l3d-report .sample{margin:4px 0 10px}.l3d-report .l3d-cv{margin:4px 0}
.l3d-report .l3d-cv:not(:empty)+.l3d-cv-note{display:none}.l3d-report .l3d-cv-missing{color:#cf222e}
.l3d-report svg text{font-family:inherit;font-size:11px;fill:#1f2328}
.l3d-report section.subnet{border-top:3px solid #0969da;margin-top:28px}
"""


def bundle_script(body: str) -> str:
    """The bundle as a classic script element where ``body`` has a view, else nothing (1.3 MB
    that a page of tables and charts would never run)."""
    return f"<script>{circuitsvis_bundle()}</script>\n" if RENDER.search(body) else ""


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document: the bundle once in the head (where the body
    has a view), then the body."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{PAGE_STYLE}{STYLE}</style>\n"
            f"{bundle_script(body)}</head>\n<body>\n{body}</body>\n</html>\n")


def fragment(body: str) -> str:
    """The same views for inline display (Jupyter): style (scoped to the report), bundle (where
    the body has a view) and body in one block. Without the bundle (``BundleError``) the rest
    of the report is still shown, each view replaced by a note saying why it is missing."""
    try:
        bundle = bundle_script(body)
    except BundleError as e:
        bundle, body = "", without_views(body, str(e))
    return f"<div class=\"l3d-inline\"><style>{STYLE}</style>\n{bundle}{body}</div>\n"


def without_views(body: str, reason: str) -> str:
    """``body`` with no CircuitsVis script and, after each (empty) view, ``reason`` in red in
    place of ``NOTE``."""
    note = f'<div class="l3d-cv-note l3d-cv-missing">CircuitsVis view not drawn: {esc(reason)}</div>'
    return RENDER.sub("", body).replace(NOTE, note)
