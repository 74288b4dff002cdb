"""Report fixes from a fourth review: ``save`` replaces the file whole (a failed write leaves an
earlier report intact), heads the decomposition or the patching left out are drawn "–" rather
than 0, a destination that cannot be written is refused before the analyses, and a missing
CircuitsVis bundle is reported first (or, inline, noted in place of each view)."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest

import l3d_lens
from l3d_lens.cli import induction_pairs
from l3d_lens.decomposition import Decomposition
from l3d_lens.viz import Report, build, html, report
from l3d_lens.zoo import induction

from . import browser
from .helpers import HAS_HOOKED

KIND = "hooked" if HAS_HOOKED else "bridge"
MOUNT = re.compile(r'<div id="[^"]+" class="l3d-cv" data-component="\w+"></div>')
CELL = re.compile(r"<title>(L\d H\d): ([^<]+)</title>")


@pytest.fixture(scope="module")
def model():
    return induction.load(KIND)


@pytest.fixture(scope="module")
def dec(model):
    """Only head 0 of layer 1 decomposed: every other head is outside the decomposition."""
    cfg = l3d_lens.L3DConfig(components=["blocks.1.attn[0]"], n_subnetworks=2, rank=1, top_k=0.5, epochs=1,
                             include_biases=False, batch_size=32)
    return l3d_lens.decompose(model, induction.repeated_sequences(64, seed=0), cfg, progress=False)


@pytest.fixture(scope="module")
def x():
    return induction.repeated_sequences(4, seed=1)


@pytest.fixture(scope="module")
def rep(dec, x):
    return build(dec, x, n_top=1, n_references=1, subnetworks=[0])


@pytest.fixture
def no_analysis(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an analysis ran before the check")

    monkeypatch.setattr(Decomposition, "impact", refuse)


def without_circuitsvis(monkeypatch) -> None:
    """CircuitsVis not importable and its cached bundle forgotten (lru_cache keeps no error: the
    bundle is read again once monkeypatch restores the module)."""
    html.circuitsvis_bundle.cache_clear()
    monkeypatch.setitem(sys.modules, "circuitsvis", None)


@pytest.fixture
def no_bundle(monkeypatch):
    without_circuitsvis(monkeypatch)


def heat_map(page: str, heading: str) -> dict[str, str]:
    """The cells ("L1 H0" -> printed value) of the first heat map after ``heading``."""
    start = page.index(heading)
    return dict(CELL.findall(page[start: page.index("</svg>", start)]))


# --- save replaces the file whole ------------------------------------------------------------

def test_a_write_that_fails_halfway_leaves_the_earlier_report_intact(tmp_path):
    """``save`` wrote onto the destination: a write cut short by a file size limit (as by a
    full disk) left a truncated report in place of the earlier good one."""
    pytest.importorskip("resource")
    path = tmp_path / "r.html"
    Report("<p>the earlier report</p>", "old", []).save(path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal
        from l3d_lens.viz import Report
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            Report("<p>" + "x" * 500_000 + "</p>", "new", []).save({str(path)!r})
        except OSError as e:
            print("failed:", e)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "failed: [Errno 27]" in done.stdout, done.stdout + done.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no temporary file left


def test_an_interrupted_save_leaves_no_temporary_file_and_a_new_one_gets_the_umask_mode(tmp_path, monkeypatch):
    path = tmp_path / "r.html"
    Report("<p>old</p>", "old", []).save(path)
    before = path.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a tempfile.mkstemp file

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Report("<p>new</p>", "new", []).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


# --- heads left out are "–", not 0 ------------------------------------------------------------

def test_heads_outside_the_decomposed_slice_are_drawn_as_missing(rep):
    """Both L3D head maps printed 0 for the heads never decomposed, like a real zero."""
    page = rep.html[rep.html.index('id="subnet-0"'):]
    for heading in ("Share of squared norm per head", "Share of effect through each head"):
        cells = heat_map(page, heading)
        assert len(cells) == 8 and cells["L1 H0"] not in ("–", "nan"), (heading, cells)
        assert {v for c, v in cells.items() if c != "L1 H0"} == {"–"}, (heading, cells)


def test_the_top_heads_are_only_decomposed_ones(rep):
    assert rep.summary[0]["top heads"].startswith("L1H0 ")
    assert rep.summary[0]["top head by output effect"].startswith("L1H0 ")


def test_heads_left_out_of_the_comparison_are_drawn_as_missing(model, dec, x):
    """The comparison heat maps started from a grid of 0: an unpatched head printed 0."""
    clean, corrupted, metric = induction_pairs(8, seed=3)[:3]
    comparison = l3d_lens.compare_with_patching(model, clean, corrupted, metric, heads=[(1, 0), (0, 3)])
    page = build(dec, x, comparison=comparison, n_top=1, n_references=1, subnetworks=[0]).html
    section = page[page.index('<section id="comparison">'):]
    cells = heat_map(section, "<h3>heads</h3>")
    assert len(cells) == 8
    assert cells["L1 H0"] != "–" and cells["L0 H3"] != "–", cells
    assert {v for c, v in cells.items() if c not in ("L1 H0", "L0 H3")} == {"–"}, cells


# --- the destination is checked first ---------------------------------------------------------

def test_a_folder_as_destination_is_refused_before_any_analysis(dec, x, tmp_path, no_analysis):
    folder = tmp_path / "r.html"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=f"report path '{re.escape(str(folder))}' is a folder"):
        report(dec, x, folder)


def test_a_destination_under_a_file_is_refused_before_any_analysis(dec, x, tmp_path, no_analysis):
    (tmp_path / "notes").write_text("not a folder")
    for path in (tmp_path / "notes" / "r.html", tmp_path / "notes" / "sub" / "r.html"):
        with pytest.raises(NotADirectoryError, match=f"'{re.escape(str(tmp_path / 'notes'))}' is not a folder"):
            report(dec, x, path)
    assert (tmp_path / "notes").read_text() == "not a folder"


def test_a_folder_where_no_file_can_be_made_is_refused_before_any_analysis(dec, x, tmp_path, no_analysis,
                                                                            monkeypatch):
    """A read-only mount (simulated: root may write in a folder of mode 0555)."""
    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    path = tmp_path / "new" / "r.html"
    with pytest.raises(PermissionError, match=f"report path '{re.escape(str(path))}' is not writable: cannot create "
                                              f"a file in '{re.escape(str(tmp_path))}' \\(Read-only file system\\)"):
        report(dec, x, path)
    assert not (tmp_path / "new").exists()


def test_a_missing_folder_is_made_and_nothing_else_is_left(dec, x, tmp_path):
    path = report(dec, x, tmp_path / "a" / "b" / "r.html", n_top=1, n_references=1, subnetworks=[0])
    assert path.read_text(encoding="utf-8").rstrip().endswith("</html>")
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]


# --- the CircuitsVis bundle -------------------------------------------------------------------

def test_a_missing_bundle_is_reported_before_any_analysis(dec, x, tmp_path, no_analysis, no_bundle):
    for make in (lambda: build(dec, x), lambda: report(dec, x, tmp_path / "r.html")):
        with pytest.raises(RuntimeError, match="the CircuitsVis JavaScript bundle is missing"):
            make()
    assert list(tmp_path.iterdir()) == []


def test_inline_display_without_the_bundle_keeps_the_report_and_notes_each_view(rep, no_bundle):
    """``_repr_html_`` raised, so Jupyter showed nothing of the computed report."""
    n_views = len(MOUNT.findall(rep.body))
    inline = rep._repr_html_()
    assert n_views >= 2 and "Subnetwork 0" in inline
    assert "CircuitsVis.render(" not in inline and "var CircuitsVis=" not in inline
    assert len(MOUNT.findall(inline)) == n_views
    assert inline.count("CircuitsVis view not drawn: the CircuitsVis JavaScript bundle is missing") == n_views
    assert "needs JavaScript" not in inline


def test_each_view_says_it_needs_javascript_until_it_is_drawn(rep):
    """An untrusted notebook (or a viewer without JavaScript) showed blank space."""
    noted = re.compile(MOUNT.pattern + '<div class="l3d-cv-note muted">interactive view: needs JavaScript '
                       r"\(in Jupyter: a trusted notebook\)</div>")
    for text in (rep.html, rep._repr_html_()):
        views = MOUNT.findall(text)
        assert views and len(noted.findall(text)) == len(views)


PROBE = """<script type="module">setTimeout(() => {
  const shown = [...document.querySelectorAll(".l3d-cv-note")].map(n => getComputedStyle(n).display);
  document.body.setAttribute("data-notes", shown.join(","));
}, 2000);</script>"""


def test_the_note_is_hidden_once_a_view_is_drawn_and_shown_when_none_is(rep, tmp_path, monkeypatch):
    """In Chromium: the drawn page hides every note; the inline display without the bundle
    (nothing drawn) shows them."""
    chromium = browser.find_chromium()
    if chromium is None:
        pytest.fail(browser.MISSING.format(where=", ".join(browser.CHROMIUM_CANDIDATES)), pytrace=False)
    n_views = len(MOUNT.findall(rep.body))
    with monkeypatch.context() as m:
        without_circuitsvis(m)
        inline = rep._repr_html_()  # the views stay empty
    drawn = tmp_path / "drawn.html"
    drawn.write_text(rep.html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + inline + PROBE
                     + "</body></html>", encoding="utf-8")
    for page, display in ((drawn, "none"), (blank, "block")):
        dom = browser.run(chromium, page).dom
        notes = re.search(r'<body[^>]*data-notes="([^"]*)"', dom)
        assert notes and notes.group(1).split(",") == [display] * n_views, (page.name, notes)


def test_a_symlinked_report_is_written_through_the_link(tmp_path):
    from l3d_lens.viz.build import replace_file

    target = tmp_path / "real.html"
    target.write_text("old")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    replace_file(link, b"new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_replaced_report_keeps_its_mode(tmp_path):
    import stat

    from l3d_lens.viz.build import replace_file

    private = tmp_path / "private.html"
    private.write_text("old")
    private.chmod(0o600)
    replace_file(private, b"new")
    assert private.read_text() == "new" and stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_read_only_report_is_refused_before_any_analysis(tmp_path, monkeypatch):
    import os

    from l3d_lens.viz.build import replace_file, writable_html_path

    locked = tmp_path / "locked.html"
    locked.write_text("old")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(PermissionError, match="is read-only"):
        writable_html_path(locked)
    with pytest.raises(PermissionError, match="is read-only"):
        replace_file(locked, b"new")
    assert locked.read_text() == "old"


def test_show_in_a_kernel_without_the_bundle_displays_the_report(dec, x, no_bundle, monkeypatch):
    """build() checks the bundle first for a saved page; show() in Jupyter has its fallback, so
    it goes on and displays the report with a note per view (it raised before)."""
    import IPython.display

    import l3d_lens.viz as viz

    shown = []
    monkeypatch.setattr(viz, "in_kernel", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj._repr_html_()))
    assert viz.show(dec, x, n_top=1, n_references=1, subnetworks=[0]) is None
    assert len(shown) == 1 and "CircuitsVis view not drawn" in shown[0] and "Subnetwork 0" in shown[0]
    with pytest.raises(RuntimeError, match="bundle is missing"):
        viz.report(dec, x, "unused.html", n_top=1, n_references=1, subnetworks=[0])
