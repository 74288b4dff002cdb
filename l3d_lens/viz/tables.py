"""Any pandas DataFrame (or a list of rows) as an escaped HTML table: numbers right-aligned
with a few significant digits, text left-aligned and escaped, missing values as a dash."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .html import esc


def cell(value: Any) -> tuple[str, bool]:
    """(escaped text, is_text) for one value."""
    if value is None:
        return "&ndash;", False
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return "&ndash;", False
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, bool):
        return esc(value), True
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, int):
        return str(value), False
    if isinstance(value, float):
        if math.isnan(value):
            return "&ndash;", False
        if math.isinf(value):
            return ("inf" if value > 0 else "-inf"), False
        a = abs(value)
        if a != 0 and (a < 1e-3 or a >= 1e6):
            return f"{value:.3e}", False
        return f"{value:.4g}", False
    return esc(value), True


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str = "",
          numeric: Sequence[int] = ()) -> str:
    """Rows of values under ``columns``; the columns at indices ``numeric`` are right-aligned as
    numbers even where their values are already formatted strings (still escaped)."""
    first = rows[0] if rows else []
    kinds = [cell(v)[1] and j not in numeric for j, v in enumerate(first)] + [False] * (len(columns) - len(first))
    head = "".join(f'<th class="t">{esc(c)}</th>' if t else f"<th>{esc(c)}</th>" for c, t in zip(columns, kinds))
    body = []
    for r in rows:
        tds = []
        for j, v in enumerate(r):
            text, is_text = cell(v)
            tds.append(f'<td class="t">{text}</td>' if is_text and j not in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    cap = f"<caption class=\"muted\">{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def dataframe(df: Any, *, max_rows: int = 60, caption: str = "") -> str:
    """A DataFrame as a table (a non-default index becomes leading columns); long frames are
    cut at ``max_rows`` with a note."""
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        if isinstance(df, Mapping):
            df = pd.DataFrame(df)
        else:
            raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    frame = df
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.name is not None:
        frame = frame.reset_index()
    columns = [str(c) for c in frame.columns]
    rows = [list(r) for r in frame.head(max_rows).itertuples(index=False, name=None)]
    out = table(columns, rows, caption=caption)
    if len(frame) > max_rows:
        out += f'<p class="muted">&hellip; {len(frame) - max_rows} more rows not shown</p>'
    return out
