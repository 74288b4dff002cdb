"""Report fixes from a fifth review: attention views cropped to ``attention_window`` positions
(a whole long sequence made the page tens of MB), a dangling symlinked folder refused before
the analyses, and a lone surrogate in any string shown as U+FFFD instead of failing the save."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

import l3d_lens
import l3d_lens.viz
from l3d_lens.viz import Options, Report, report
from l3d_lens.viz.attention import head_patterns
from l3d_lens.viz.build import writable_html_path
from l3d_lens.viz.html import circuitsvis_bundle, clean, esc, json_props, token_inert
from l3d_lens.viz.tables import dataframe

from .helpers import HAS_HOOKED, tiny_lm, tokens

KIND = "hooked" if HAS_HOOKED else "bridge"
HEADS = re.compile(r"CircuitsVis\.AttentionHeads, (\{.*?\})\);</script>")
WINDOW = re.compile(r"positions (\d+)&ndash;(\d+) of (\d+) \(0-based\), the (?:first \d+, which hold|\d+ ending at) "
                    r"the peak at position (\d+)")


def attention_props(html: str) -> list[dict]:
    return [json.loads(m) for m in HEADS.findall(html)]


@pytest.fixture(scope="module")
def long_dec():
    """Sequence mode at the last position, on 512-token sequences."""
    model = tiny_lm(KIND, dtype=torch.float32, n_ctx=512)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=2, rank=1, epochs=1,
                             batch_size=4, include_biases=False, sample="sequence", position=-1)
    x = tokens(4, 512)
    return l3d_lens.decompose(model, x, cfg, progress=False), x


@pytest.fixture(scope="module")
def token_dec():
    """Token mode on 16-token sequences: each top sample has a peak position."""
    model = tiny_lm(KIND, n_ctx=16)
    cfg = l3d_lens.L3DConfig(components=["blocks.0.attn", "blocks.1.attn"], n_subnetworks=2, rank=1, epochs=1,
                             batch_size=8, include_biases=False, sample="token")
    x = tokens(8, 16)
    return l3d_lens.decompose(model, x, cfg, progress=False), x


@pytest.mark.parametrize("window", [-1, 1.5, True, "128"])
def test_attention_window_option_is_checked(window):
    with pytest.raises(ValueError, match="attention_window must be an int >= 0"):
        Options(attention_window=window)
    Options(attention_window=0)
    Options(attention_window=None)


def test_a_long_sequence_report_stays_small(long_dec, tmp_path):
    """At 512 tokens a view holds heads x 128 x 128 numbers, not heads x 512 x 512 (8 MB
    before), and the page grows at most linearly with the sequence length."""
    dec, x = long_dec
    bundle = len(circuitsvis_bundle().encode("utf-8"))
    sizes = {}
    for seq in (256, 512):
        path = report(dec, x[:, :seq], tmp_path / f"r{seq}.html", n_references=1, n_top=1)
        html = path.read_text(encoding="utf-8")
        sizes[seq] = path.stat().st_size - bundle
        views = attention_props(html)
        assert views
        for props in views:
            assert len(props["tokens"]) == 128
            assert all(len(rows) == 128 and all(len(r) == 128 for r in rows) for rows in props["attention"])
        assert f"positions {seq - 128}&ndash;{seq - 1} of {seq} (0-based)" in html
        assert "the decomposed position" in html
    assert sizes[512] < 1_000_000, sizes
    assert sizes[512] < 2.2 * sizes[256], sizes  # linear at most (it was 4x: quadratic)


def test_a_short_sequence_is_shown_whole(token_dec, tmp_path):
    dec, x = token_dec
    html = report(dec, x, tmp_path / "r.html", n_references=1, n_top=1).read_text(encoding="utf-8")
    views = attention_props(html)
    assert views and "(attention_window=" not in html
    for props in views:
        assert len(props["tokens"]) == 16 and all(len(rows) == 16 for rows in props["attention"])


def test_the_window_ends_at_the_peak_and_matches_the_pattern(token_dec, tmp_path):
    """Queries, keys and token labels cropped alike, to the window the note names."""
    dec, x = token_dec
    to_str = lambda ids: [f"t{i}:{int(t)}" for i, t in enumerate(ids.tolist())]  # noqa: E731
    html = report(dec, x, tmp_path / "r.html", n_references=1, n_top=1, attention_window=5,
                  to_str=to_str).read_text(encoding="utf-8")
    views = attention_props(html)
    notes = WINDOW.findall(html)
    seqs = re.findall(r"Attention patterns of its top heads on sequence (\d+)", html)
    assert views and len(notes) == len(views) == len(seqs)
    for props, (a, b, n, peak), seq in zip(views, notes, seqs):
        a, b, n, peak, seq = int(a), int(b), int(n), int(peak), int(seq)
        assert n == 16 and b - a + 1 == 5 and a <= peak <= b
        assert b == peak or a == 0  # ends at the peak, or the first 5 where the peak is earlier
        assert props["tokens"] == [f"t{i}:{int(x[seq, i])}" for i in range(a, b + 1)]
        heads = [tuple(map(int, re.match(r"L(\d+)H(\d+)", name).groups())) for name in props["attentionHeadNames"]]
        want = head_patterns(dec, x[seq], heads)[:, a:b + 1, a:b + 1]
        assert props["attention"] == clean(want, 0.0, 0.0, 1.0, 4)


@pytest.mark.parametrize("window", [0, None])
def test_attention_window_zero_or_none_drops_the_views(token_dec, tmp_path, window):
    dec, x = token_dec
    html = report(dec, x, tmp_path / "r.html", n_references=1, n_top=1,
                  attention_window=window).read_text(encoding="utf-8")
    assert "CircuitsVis.AttentionHeads" not in html and "Attention patterns" not in html
    assert "CircuitsVis.ColoredTokens" in html


def test_a_dangling_symlinked_folder_is_refused_before_any_analysis(token_dec, tmp_path, monkeypatch):
    dec, x = token_dec
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    monkeypatch.setattr(l3d_lens.viz, "build", lambda *a, **k: pytest.fail("the analysis ran"))
    for path, link in ((tmp_path / "out" / "sub" / "r.html", tmp_path / "out"), (tmp_path / "out" / "r.html",
                       tmp_path / "out"), (tmp_path / "loop" / "r.html", tmp_path / "loop")):
        with pytest.raises(FileNotFoundError, match="is a symlink to") as e:
            writable_html_path(path)
        assert repr(str(link)) in str(e.value)
        with pytest.raises(FileNotFoundError, match="which does not exist"):
            report(dec, x, path)
    assert not (tmp_path / "gone").exists()


def test_a_dangling_link_at_the_path_itself_is_written_through(tmp_path):
    """As ``open`` would: the link's target (and its missing folders) are made; ``save``
    returns the target's real path and the link stays a link."""
    link = tmp_path / "link.html"
    target = tmp_path / "made" / "real.html"
    link.symlink_to(target)
    saved = Report("<p>x</p>", "t", []).save(link)
    assert saved == target and link.is_symlink() and "<p>x</p>" in target.read_text(encoding="utf-8")


def test_a_lone_surrogate_in_any_string_becomes_a_replacement_character():
    assert esc("a\ud800<") == "a\ufffd&lt;"
    assert token_inert("\udc80<") == "\ufffd\u2039"
    json_props({"tokens": ["x\udfff"]}).encode("utf-8")
    frame = pd.DataFrame({"note": pd.Series(["ok", "bad\ud800"], dtype=object), "score": [0.5, -0.2]})
    frame.columns = pd.Index(["note\ud801", "score"], dtype=object)
    table = dataframe(frame)
    table.encode("utf-8")
    assert "bad\ufffd" in table and "note\ufffd" in table


def test_a_comparison_with_a_lone_surrogate_is_saved(token_dec, tmp_path):
    import types

    dec, x = token_dec
    comparison = types.SimpleNamespace(heads=pd.DataFrame({
        "layer": [0, 1], "head": [1, 0], "score": [0.5, -0.2], "note": pd.Series(["ok", "bad\ud800"], dtype=object)}))
    path = report(dec, x, tmp_path / "r.html", comparison=comparison, n_references=1, n_top=1)
    assert "bad\ufffd" in path.read_text(encoding="utf-8")
