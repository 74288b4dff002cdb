"""Report fixes from a review: options checked before any analysis, mount-point ids unique for
every inline display, and the logits table equal to ``top_logits`` in sequence mode over all
positions."""

from __future__ import annotations

import html
import math
import re

import pytest

import l3d_lens
from l3d_lens.decomposition import Decomposition
from l3d_lens.viz import build, report
from l3d_lens.zoo import induction

from .helpers import HAS_HOOKED

KIND = "hooked" if HAS_HOOKED else "bridge"
MOUNT_ID = re.compile(r'<div id="([^"]+)" class="l3d-cv"')


def _dec(**overrides):
    cfg = dict(components=["blocks.1.attn"], n_subnetworks=2, rank=2, top_k=0.5, epochs=1, include_biases=False,
               batch_size=32)
    return l3d_lens.decompose(induction.load(KIND), induction.repeated_sequences(64, seed=0),
                              l3d_lens.L3DConfig(**{**cfg, **overrides}), progress=False)


@pytest.fixture(scope="module")
def dec():
    return _dec()


@pytest.mark.parametrize("options, match", [
    (dict(n_top=-1), "n_top must be an int >= 1"), (dict(n_top=0), "n_top must be an int >= 1"),
    (dict(n_top=1.5), "n_top must be an int >= 1"), (dict(n_logits=-1), "n_logits must be an int >= 1"),
    (dict(n_neurons=True), "n_neurons must be an int >= 1"), (dict(n_heads=0), "n_heads must be an int >= 1"),
    (dict(deltas=[]), "deltas must be a non-empty sequence"), (dict(deltas=[1.0, math.nan]), "finite numbers"),
    (dict(subnetworks=[7]), "7"), (dict(to_str=lambda ids: ["a"]), "one string per token"),
    (dict(path="r.txt"), "must end in .html")])
def test_report_options_are_refused_before_any_analysis_runs(dec, options, match, monkeypatch, tmp_path):
    """A negative count used to slice silently (n_top=-1 showed all but one sample), and a bad
    subnetwork, delta list, to_str or path failed only after every impact was computed."""
    def no_analysis(*args, **kwargs):
        raise AssertionError("an analysis ran before the options were checked")

    monkeypatch.setattr(Decomposition, "impact", no_analysis)
    x = induction.repeated_sequences(8, seed=1)
    path = tmp_path / options.pop("path", "r.html")
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        report(dec, x, path, **options)
    assert not path.exists()


def test_every_inline_display_gets_its_own_ids_and_the_file_keeps_numbered_ones(dec, tmp_path):
    """Two displays in one notebook page (the same report twice, or one from before a kernel
    restart, whose counter started at 1 again) used to share ids, so one view showed the other's
    tokens; the saved file is still numbered l3d-cv-0, 1, ... and byte-identical."""
    x = induction.repeated_sequences(4, seed=1)
    rep = build(dec, x, n_top=1, n_references=1)
    first, second = set(MOUNT_ID.findall(rep._repr_html_())), set(MOUNT_ID.findall(rep._repr_html_()))
    other = set(MOUNT_ID.findall(build(dec, x, n_top=1, n_references=1)._repr_html_()))
    assert first and len(first) == len(second) == len(other)
    assert not first & second and not first & other and not second & other
    page = MOUNT_ID.findall(rep.html)
    assert page == [f"l3d-cv-{i}" for i in range(len(first))]
    again = build(dec, x, n_top=1, n_references=1)
    assert rep.html == again.html
    assert report(dec, x, tmp_path / "a.html", n_top=1, n_references=1).read_bytes() == \
        report(dec, x, tmp_path / "b.html", n_top=1, n_references=1).read_bytes()


def test_the_logits_table_is_top_logits_in_sequence_mode_over_all_positions():
    """With position="all" the table averaged the signed derivative over positions before taking
    |.|, so its numbers and order differed from ``top_logits`` (0.059 for 0.174)."""
    dec = _dec(sample="sequence", position="all", reference="mean")
    x = induction.repeated_sequences(16, seed=1)

    def to_str(ids):
        return induction.to_str_tokens(ids.reshape(-1))

    page = build(dec, x, to_str=to_str, n_top=4, n_logits=6).html
    compared = 0
    for k in range(dec.n_subnetworks):
        if f'id="subnet-{k}"' not in page:
            continue
        section = page.split(f'id="subnet-{k}"')[1].split("</section>")[0]
        seqs = [int(s) for s in re.findall(r"sequence (\d+): divergence", section)]
        table = re.findall(r"Most affected logits.*?(<table>.*?</table>)", section, re.S)[0]
        rows = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
                for tr in re.findall(r"<tr>(.*?)</tr>", table)][1:]
        api = dec.top_logits(x[seqs], k, 6, to_str=to_str)
        assert [int(r[0]) for r in rows] == api.token_id.tolist()
        assert [float(r[2]) for r in rows] == pytest.approx(api.mean_abs_dlogit.tolist(), rel=2e-3)
        assert [float(r[3]) for r in rows] == pytest.approx(api.mean_dlogit.tolist(), rel=2e-3, abs=1e-6)
        compared += 1
    assert compared
