"""The HTML report in a real headless browser (Debian's Chromium, no network): every
CircuitsVis view renders, no JavaScript error, no request leaves the page, a hostile token
shows as text, non-finite values never reach a view, and a screenshot looks like a report.

Chromium is required: without it these tests FAIL with an install hint (CI installs it)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

import l3d_lens
from l3d_lens.analysis import impact
from l3d_lens.viz import build
from l3d_lens.viz.html import token_inert
from l3d_lens.zoo import induction

from . import browser
from .helpers import HAS_HOOKED

HOSTILE = "</script><b>x"
KIND = "hooked" if HAS_HOOKED else "bridge"


@pytest.fixture(scope="module")
def chromium():
    path = browser.find_chromium()
    if path is None:
        pytest.fail(browser.MISSING.format(where=", ".join(browser.CHROMIUM_CANDIDATES)), pytrace=False)
    return path


def hostile_to_str(ids: torch.Tensor) -> list[str]:
    """The embedded vocabulary, with BOS (in every sequence) replaced by a hostile string."""
    return [HOSTILE if w == induction.BOS else " " + w for w in induction.to_str_tokens(ids.reshape(-1))]


@pytest.fixture(scope="module")
def page(tmp_path_factory, chromium):
    """A small decomposition's report, with NaN and inf planted in the impacts, rendered once."""
    model = induction.load(KIND)
    data = induction.repeated_sequences(96, seed=0)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=4, rank=2, epochs=2,
                             top_k=0.2, include_biases=False, batch_size=32)
    dec = l3d_lens.decompose(model, data, cfg, progress=False)
    x = induction.repeated_sequences(24, seed=1)
    impacts = dec.impact(x, n_references=2)
    impacts[:, 3] = float("nan")  # every sequence, every subnetwork: position 3 is NaN
    impacts[0, 5, 0] = float("inf")
    impacts[1, 6, :] = float("-inf")
    # as a diverged decomposition's own impacts hold them; impacts= given are checked finite
    # (``check_impacts``), so that check is stepped around to plant them
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(impact, "check_impacts", lambda dec, data, impacts: impacts)
        rep = build(dec, x, to_str=hostile_to_str, impacts=impacts, n_top=2, title=f"browser test {HOSTILE}")
    folder = tmp_path_factory.mktemp("report")
    path = rep.save(folder / "report.html")
    run = browser.run(chromium, path)
    return {"path": path, "run": run, "dom": browser.parse(run.dom), "report": rep, "dec": dec, "x": x,
            "folder": folder}


def test_every_view_renders_without_errors_or_requests(page):
    run, dom = page["run"], page["dom"]
    mounts = browser.mount_points(dom)
    n_scripts = page["report"].html.count("CircuitsVis.render(")
    assert len(mounts) == n_scripts >= 4
    empty = [m.attrs["id"] for m in mounts if not any(True for _ in m.elements())]
    assert not empty, f"mount points with nothing rendered: {empty}"
    components = {m.attrs["data-component"] for m in mounts}
    assert components == {"ColoredTokens", "AttentionHeads"}
    for m in mounts:
        if m.attrs["data-component"] == "AttentionHeads":
            assert any(n.tag == "canvas" for n in m.elements()), "attention view drew no canvas"
    errors = [line for line in run.console if "Uncaught" in line or "Error" in line or "Refused" in line]
    assert not errors, errors
    assert run.page_requests == [], f"the report made network requests: {run.page_requests}"
    assert "l3d-report" in run.dom and "Subnetwork" in dom.text()


def test_hostile_token_is_text_everywhere(page):
    dom = page["dom"]
    assert not [n for n in dom.elements() if n.tag == "b"], "a token's markup became an element"
    text = dom.text()
    assert HOSTILE in text  # shown literally (tables, title)
    for m in browser.mount_points(dom):
        if m.attrs["data-component"] == "ColoredTokens":
            assert token_inert(HOSTILE).replace(" ", "\xa0") in m.text()
    # one document: the hostile '</script>' closed nothing early
    assert len([n for n in dom.elements() if n.tag == "body"]) == 1
    assert dom.text().count("browser test " + HOSTILE) >= 1


def test_no_nan_reaches_a_view(page):
    html, dom = page["report"].html, page["dom"]
    for props in re.findall(r"CircuitsVis\.render\(\"[^\"]+\", CircuitsVis\.\w+, (.*?)\);</script>", html):
        json.loads(props, parse_constant=lambda c: pytest.fail(f"non-finite {c} in view props"))
    seq_len = page["x"].shape[1]
    for m in browser.mount_points(dom):
        if m.attrs["data-component"] == "ColoredTokens":
            rendered = m.text()
            assert "NaN" not in rendered
            # every token of the row is visible (one NaN with default bounds would blank it)
            spans = [n for n in m.elements() if n.tag == "span" and "background-color" in n.attrs.get("style", "")]
            assert len(spans) == seq_len
    assert "NaN" not in dom.text()


def test_inline_view_renders_standalone(tmp_path, chromium, page):
    """The Jupyter path (_repr_html_) is self-contained too: put it in a bare page."""
    rep = build(page["dec"], page["x"][:8], to_str=hostile_to_str, n_top=1, n_references=1)
    shell = tmp_path / "inline.html"
    shell.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                     + rep._repr_html_() + "</body></html>", encoding="utf-8")
    run = browser.run(chromium, shell)
    mounts = browser.mount_points(browser.parse(run.dom))
    assert mounts and all(any(True for _ in m.elements()) for m in mounts)
    assert all(re.fullmatch(r"l3d-[0-9a-f]{12}-cv-\d+", m.attrs["id"]) for m in mounts)
    assert not [line for line in run.console if "Uncaught" in line]
    assert run.page_requests == []


def test_network_detector_sees_a_request(tmp_path, chromium):
    """Control: the request check above can fail (a page that fetches is caught)."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://cdn.example.invalid/x.png"></body></html>')
    assert any("cdn.example.invalid" in u for u in browser.run(chromium, bad).page_requests)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_screenshot_looks_like_a_report(page, chromium):
    out = browser.screenshot(chromium, page["path"], page["folder"] / "report.png", width=1000, height=1400)
    assert png_size(out) == (1000, 1400)
    # a blank or nearly blank page compresses to a few KB; text, charts and tokens do not
    assert out.stat().st_size > 40_000, f"the screenshot is (nearly) blank: {out.stat().st_size} bytes"
