"""The HTML report without a browser: escaping, byte-identical output, one inlined bundle,
closed mount points, clean numbers, no hooks or mode changes left on the model, MLP and
plain-module decompositions, the comparison table and the inline (Jupyter) path."""

from __future__ import annotations

import dataclasses
import json
import re

import pandas as pd
import pytest
import torch

import l3d_lens
from l3d_lens.viz import build, report, show
from l3d_lens.viz.html import clean, json_props, token_html, token_inert
from l3d_lens.zoo import induction

from .helpers import HAS_HOOKED, TinyMLP, tiny_lm, tokens

KIND = "hooked" if HAS_HOOKED else "bridge"
MOUNT = re.compile(r'<div id="(l3d-(?:[0-9a-f]+-)?cv-\d+)" class="l3d-cv" data-component="(\w+)"></div>')


@pytest.fixture(scope="module")
def induction_dec():
    model = induction.load(KIND)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=3, rank=2, epochs=1,
                             include_biases=False, batch_size=32)
    return l3d_lens.decompose(model, induction.repeated_sequences(64, seed=0), cfg, progress=False)


def test_json_props_cannot_close_a_script():
    text = json_props({"tokens": ["</script><script>alert(1)</script>", "a&b", "<!--", "\u2028"]})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text)["tokens"][0] == "</script><script>alert(1)</script>"
    with pytest.raises(ValueError):
        json_props({"values": [float("nan")]})


def test_token_escaping_and_clean_numbers():
    assert token_html("</script><b>x") == "\u2039/script\u203a\u2039b\u203ax"
    assert token_html('a"&') == 'a"\uff06'
    assert not set(token_inert("<b>&")) & set("<>")
    assert clean([float("nan"), float("inf"), -float("inf"), 1.234567], lo=0.0, hi=2.0) == [0.0, 2.0, 0.0, 1.2346]
    assert clean(torch.tensor([[1.0, float("nan")]])) == [[1.0, 0.0]]


def test_report_is_deterministic_self_contained_and_escaped(induction_dec, tmp_path):
    x = induction.repeated_sequences(16, seed=1)
    hostile = lambda ids: ["</script><b>x" if w == induction.BOS else w for w in induction.to_str_tokens(ids)]  # noqa: E731
    a = report(induction_dec, x, tmp_path / "a.html", to_str=hostile, n_references=2, title="<i>t</i>")
    b = report(induction_dec, x, tmp_path / "b.html", to_str=hostile, n_references=2, title="<i>t</i>")
    html = a.read_text(encoding="utf-8")
    assert a.read_bytes() == b.read_bytes()  # byte-identical
    assert html.count("var CircuitsVis=") == 1  # the bundle, once, as a classic script
    assert html.count('<script type="module">') == html.count("CircuitsVis.render(") >= 3
    assert "crossorigin" not in html and "unpkg.com" not in html and "<script src" not in html
    outside = html.replace(html[html.index("<script>") : html.index("</script>")], "")
    assert not re.search(r"https?://", outside), "the report refers to a URL"
    assert "Content-Security-Policy" in html
    mounts = MOUNT.findall(html)
    assert [m[0] for m in mounts] == [f"l3d-cv-{i}" for i in range(len(mounts))]  # numbered, closed
    assert "<b>x" not in html and "<i>t</i>" not in html
    assert "&lt;/script&gt;&lt;b&gt;x" in html and "&lt;i&gt;t&lt;/i&gt;" in html
    # only the bundle's script and the views' scripts close a script element
    assert html.count("</script>") == 1 + len(mounts)


def test_report_leaves_the_model_untouched(induction_dec):
    model = induction_dec.model

    def hooks():
        n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
        lens = sum(len(getattr(hp, "fwd_hooks", [])) + len(getattr(hp, "bwd_hooks", []))
                   for hp in model.hook_dict.values())
        return n, lens

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = hooks()
    model.train()
    build(induction_dec, induction.repeated_sequences(8, seed=2), n_references=1, n_top=1)
    assert hooks() == before
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    model.eval()


def test_report_with_mlp_neurons_and_a_comparison(tmp_path):
    model = tiny_lm("bridge", dtype=torch.float32)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.mlp"], n_subnetworks=2, rank=2, epochs=1,
                             batch_size=8)
    dec = l3d_lens.decompose(model, tokens(16, 8), cfg, progress=False)

    @dataclasses.dataclass
    class Fake:  # anything with a .heads DataFrame
        heads: pd.DataFrame
        agreement: pd.DataFrame
        metric_clean: float
        note: str

    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "patching": [0.5, -0.1, float("nan"), 0.0],
                          "label": ["<script>", "a", "b", "c"]})
    fake = Fake(heads, pd.DataFrame({"spearman": [0.25]}), -1.5, "</script>")
    html = build(dec, tokens(8, 8), comparison=fake, n_references=1).html
    assert "Top 16 MLP neurons" in html and "L1 N" in html
    assert "Comparison with activation patching" in html and "spearman" in html and "&lt;script&gt;" in html
    assert "<script>" not in html.replace("<script>" + html.split("<script>", 1)[1].split("</script>", 1)[0], "", 1)
    with pytest.raises(TypeError, match=r"\.heads"):
        build(dec, tokens(8, 8), comparison=object())


def test_report_on_a_paired_sequence_decomposition():
    model = tiny_lm("bridge", dtype=torch.float32)
    clean, corrupted = tokens(12, 6, seed=1), tokens(12, 6, seed=2)
    cfg = l3d_lens.L3DConfig(components="blocks.0.attn", n_subnetworks=2, rank=2, epochs=1, batch_size=6, top_k=1.0,
                             sample="sequence", position="all", reference="paired")
    dec = l3d_lens.decompose(model, clean, cfg, reference=corrupted, progress=False)
    with pytest.raises(ValueError, match="pass reference="):
        build(dec, clean)
    html = build(dec, clean, reference=corrupted).html
    assert "against the paired reference" in html and "divergence at all positions" in html
    assert html.count("CircuitsVis.render(") >= 2


def test_report_on_a_plain_module():
    model = TinyMLP()
    x = torch.randn(32, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dec = l3d_lens.decompose(model, x, l3d_lens.L3DConfig(components=["fc1", "fc2"], n_subnetworks=2, rank=1,
                                                          epochs=1, batch_size=16, dtype="float64"), progress=False)
    rep = build(dec, [x[:10], x[10:20]], n_references=1)  # batches are concatenated
    assert "CircuitsVis.render(" not in rep.html  # no tokens, no attention: tables and charts only
    assert "Most affected outputs" in rep.html and "Intervention curve" in rep.html


def test_user_errors(induction_dec, tmp_path):
    x = induction.repeated_sequences(4, seed=1)
    with pytest.raises(ValueError, match="must end in .html"):
        report(induction_dec, x, tmp_path / "r.txt")
    with pytest.raises(TypeError, match="unknown report option"):
        build(induction_dec, x, n_tops=3)
    with pytest.raises(ValueError, match="one string per token"):
        build(induction_dec, x, to_str=lambda ids: ["a"], n_references=1)
    with pytest.raises(ValueError, match="impacts has shape"):
        build(induction_dec, x, impacts=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="Decomposition"):
        build("not a decomposition", x)


def test_show_outside_jupyter_returns_the_inline_report(induction_dec):
    x = induction.repeated_sequences(4, seed=1)
    a = show(induction_dec, x, n_references=1, n_top=1)
    b = show(induction_dec, x, n_references=1, n_top=1)
    ia, ib = a._repr_html_(), b._repr_html_()
    assert ia.count("var CircuitsVis=") == 1 and "<html" not in ia and "unpkg" not in ia
    ids_a, ids_b = {m[0] for m in MOUNT.findall(ia)}, {m[0] for m in MOUNT.findall(ib)}
    assert ids_a and not ids_a & ids_b  # two reports can share a notebook page


def test_heatmap_shows_missing_and_infinite_values_as_such():
    """A NaN cell (e.g. a head no method scored) printed "0" like a real zero, and inf too."""
    import re

    from l3d_lens.viz.charts import heatmap

    svg = heatmap([[0.5, float("nan")], [float("inf"), -0.25]], ["L0", "L1"], ["H0", "H1"], signed=True)
    assert re.findall(r">([^<>]*)</text>", svg)[2:] == ["L0", "0.50", "–", "L1", "inf", "-0.25"]
    assert 'fill="#eaeef2"' in svg and "H1: –</title>" in svg
