"""Report fixes from a sixth review: tokens in the CircuitsVis views show no HTML entity (their
hover tooltips printed ``&#x27;s``), ``subnetworks=`` takes one int and is checked when the
options are made, ``impacts=`` of the wrong type or with negative entries is refused clearly,
token ids without a tokenizer no longer run together, and a page with no view leaves the
1.3 MB CircuitsVis bundle out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import l3d_lens
from l3d_lens.viz import Options, build, show
from l3d_lens.viz.html import token_html, token_inert

from . import browser
from .helpers import HAS_HOOKED, TinyMLP, tiny_lm, tokens

KIND = "hooked" if HAS_HOOKED else "bridge"
COLORED = re.compile(r"CircuitsVis\.ColoredTokens, (\{.*?\})\);</script>")
HEADS = re.compile(r"CircuitsVis\.AttentionHeads, (\{.*?\})\);</script>")
TOKENS = ["'s", "<b>", "a&b", '"q"']
SHOWN = ["'s", "\u2039b\u203a", "a\uff06b", '"q"']  # as both the token and its tooltip show them


def cycled(ids: torch.Tensor) -> list[str]:
    return [TOKENS[i % len(TOKENS)] for i in range(ids.numel())]


@pytest.fixture(scope="module")
def dec():
    """Token mode on 16-token sequences, on a model with no tokenizer."""
    model = tiny_lm(KIND, n_ctx=16)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=3, rank=1, epochs=1,
                             batch_size=8, include_biases=False, sample="token")
    return l3d_lens.decompose(model, tokens(8, 16), cfg, progress=False)


def view_tokens(pattern: re.Pattern, html: str) -> list[list[str]]:
    return [json.loads(props)["tokens"] for props in pattern.findall(html)]


# --- tokens: no entity in a view, no markup on the page ------------------------------------
def test_token_html_has_no_entity_and_no_markup():
    assert [token_html(t) for t in TOKENS] == SHOWN
    assert [token_inert(t) for t in TOKENS] == SHOWN  # the same text in every view
    for hostile in ["</script><b>x", "<img src=x onerror=alert(1)>", "&lt;", "&#60;script&#62;", "<!--"]:
        assert not set(token_html(hostile)) & set("<>&")


def test_report_tokens_show_as_text_in_both_views(dec):
    html = build(dec, tokens(4, 16), to_str=cycled, n_references=1, n_top=1, subnetworks=[0]).html
    colored, heads = view_tokens(COLORED, html), view_tokens(HEADS, html)
    assert colored and heads
    for row in colored + heads:
        assert row == [SHOWN[i % len(SHOWN)] for i in range(len(row))]
    note = "(&lt;, &gt; and &amp; in tokens are drawn as &#x2039;, &#x203a; and &#xff06; in "
    assert html.count(note + "the coloured tokens)") == 1
    assert html.count(note + "this view)") == 1
    outside = re.sub(r"<script>.*?</script>", "", html, flags=re.S)
    assert "<b>" not in outside  # no raw markup
    assert "&lt;b&gt;" in outside  # the top samples table shows the token itself


@pytest.fixture(scope="module")
def chromium():
    path = browser.find_chromium()
    if path is None:
        pytest.fail(browser.MISSING.format(where=", ".join(browser.CHROMIUM_CANDIDATES)), pytrace=False)
    return path


HOVER = """<script>setTimeout(function () {
  document.querySelectorAll('.colored-tokens > span').forEach(function (e) {
    ['pointerover', 'pointerenter', 'mouseover', 'mouseenter', 'mousemove'].forEach(function (t) {
      e.dispatchEvent(new MouseEvent(t, {bubbles: t.indexOf('enter') < 0, clientX: 10, clientY: 10}));
    });
  });
}, 1500);</script></body>"""


def test_hover_tooltips_show_the_tokens_as_text(dec, chromium, tmp_path):
    """In a browser, each coloured token and its tooltip (shown by hovering) read the same."""
    rep = build(dec, tokens(1, 16), to_str=cycled, n_references=1, n_top=1, subnetworks=[0], attention_window=0)
    page = tmp_path / "hover.html"
    page.write_text(rep.html.replace("</body>", HOVER), encoding="utf-8")
    dom = browser.parse(browser.run(chromium, page).dom)
    (mount,) = [m for m in browser.mount_points(dom) if m.attrs["data-component"] == "ColoredTokens"]
    tips = [n.text() for n in mount.elements() if n.tag == "strong"]
    shown = [n.text() for n in mount.elements() if n.tag == "span" and "background-color" in n.attrs.get("style", "")]
    expected = [SHOWN[i % len(SHOWN)] for i in range(16)]
    assert shown == expected
    assert tips == expected, "the tooltips did not open, or show an entity"
    assert not [n for n in dom.elements() if n.tag == "b"]


# --- subnetworks= ----------------------------------------------------------------------------
def test_subnetworks_option_takes_one_int(dec):
    assert Options(subnetworks=2).subnetworks == (2,)
    assert Options(subnetworks=torch.tensor(1)).subnetworks == (1,)
    assert Options(subnetworks=(k for k in [2, 0])).subnetworks == (2, 0)
    html = show(dec, tokens(4, 16), subnetworks=2, n_references=1, n_top=1, attention_window=0).html
    assert re.findall(r'<section class="subnet" id="subnet-(\d+)">', html) == ["2"]
    with pytest.raises(ValueError, match=r"report option subnetworks \[1, 1\] repeats an index"):
        Options(subnetworks=[1, 1])
    with pytest.raises(ValueError, match=r"subnetwork 3 out of range; valid: 0\.\.2"):
        build(dec, tokens(4, 16), subnetworks=3)


@pytest.mark.parametrize("value", [[], (), "1", 1.0, True, [0, "1"], [0, None]])
def test_subnetworks_option_is_checked_when_made(value):
    with pytest.raises(ValueError, match="report option subnetworks must be an int or a non-empty sequence of ints"):
        Options(subnetworks=value)


# --- impacts= --------------------------------------------------------------------------------
def test_impacts_of_the_wrong_type_or_negative_are_refused(dec):
    x = tokens(4, 16)
    impacts = dec.impact(x, n_references=1)
    with pytest.raises(TypeError, match="impacts must be a real tensor .*got list"):
        build(dec, x, impacts=impacts.tolist())
    with pytest.raises(TypeError, match="impacts must be a real tensor .*got dtype torch.bool"):
        build(dec, x, impacts=impacts > 0)
    negative = impacts.clone()
    negative[0, 1, 2] = -0.5
    with pytest.raises(ValueError, match="impacts has 1 negative entries; impacts are never negative"):
        build(dec, x, impacts=negative)
    assert "Subnetwork" in build(dec, x, impacts=impacts, n_top=1, attention_window=0).html


# --- token ids without a tokenizer ---------------------------------------------------------
def test_ids_without_a_tokenizer_are_shown_apart(dec):
    assert getattr(dec.model, "tokenizer", None) is None
    x = tokens(4, 16)
    html = build(dec, x, n_references=1, n_top=1, subnetworks=[0]).html
    (row,) = view_tokens(COLORED, html)
    assert row == [f" {int(i)}" for i in x[int(re.search(r"sequence (\d+): peak", html).group(1))]]
    logits = html[html.index("Most affected logits"):]
    assert "<th>id</th><th>mean |d/d delta|</th>" in logits[:logits.index("</tr>")]  # no column repeating the id
    named = build(dec, x, to_str=cycled, n_references=1, n_top=1, subnetworks=[0]).html
    assert '<th class="t">token</th>' in named[named.index("Most affected logits"):]


# --- the bundle only where a view needs it -------------------------------------------------
def test_a_page_with_no_view_has_no_bundle(tmp_path):
    model = TinyMLP()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=2, rank=1, epochs=1, batch_size=8,
                             dtype="float64")
    rep = build(l3d_lens.decompose(model, x, cfg, progress=False), x, n_references=1)
    html, inline = rep.html, rep._repr_html_()
    for text in (html, inline):
        assert "var CircuitsVis=" not in text and "<script" not in text and "Intervention curve" in text
    assert len(html.encode("utf-8")) < 200_000
    assert html.startswith("<!DOCTYPE html>") and "</head>\n<body>" in html and html.endswith("</html>\n")
    assert Path(rep.save(tmp_path / "r.html")).read_text(encoding="utf-8") == html


def test_a_page_with_views_keeps_one_bundle(dec):
    rep = build(dec, tokens(4, 16), n_references=1, n_top=1, subnetworks=[0])
    assert rep.html.count("var CircuitsVis=") == 1 and rep._repr_html_().count("var CircuitsVis=") == 1
