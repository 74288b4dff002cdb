"""Report fixes from a third review: the impact caption states only a number of references it
knows, ``show`` keeps the report in a terminal IPython, a lone surrogate in a token or the title
no longer crashes late, a to_str may return any iterable of strings, and a report whose every
subnetwork is dead says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import IPython
import IPython.display

import l3d_lens
from l3d_lens.decomposition import Decomposition
from l3d_lens.viz import Report, build, report, show
from l3d_lens.zoo import induction

from .helpers import HAS_HOOKED

KIND = "hooked" if HAS_HOOKED else "bridge"
NOTEBOOK = Path(__file__).resolve().parents[1] / "demos" / "quickstart.ipynb"
CLAIM = re.compile(r"over (\d+) random references")


@pytest.fixture(scope="module")
def dec():
    cfg = l3d_lens.L3DConfig(components=["blocks.1.attn"], n_subnetworks=2, rank=2, top_k=0.5, epochs=1,
                             include_biases=False, batch_size=32)
    return l3d_lens.decompose(induction.load(KIND), induction.repeated_sequences(64, seed=0), cfg, progress=False)


@pytest.fixture(scope="module")
def x():
    return induction.repeated_sequences(4, seed=1)


def test_the_caption_states_the_number_of_references_only_when_it_is_known(dec, x):
    """With ``impacts=`` the caption said "over 4 random references" whatever the impacts used
    (the quickstart's used 2)."""
    impacts = dec.impact(x, n_references=1)
    supplied = build(dec, x, impacts=impacts, n_top=1).html
    assert not CLAIM.search(supplied) and "over random references, as supplied (impacts=)" in supplied
    stated = build(dec, x, impacts=impacts, n_references=1, n_top=1).html
    assert set(CLAIM.findall(stated)) == {"1"}
    computed = build(dec, x, n_top=1).html
    assert set(CLAIM.findall(computed)) == {"4"} and "as supplied" not in computed


def test_the_quickstart_tells_show_and_report_the_references_of_its_impacts():
    """The notebook computed impacts with n_references=2 and showed them captioned "over 4"."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    calls = re.findall(r"^(?:path = )?(show|report)\((.*?)\)$", code, flags=re.M | re.S)
    with_impacts = [args for name, args in calls if "impacts=impacts" in args]
    assert len(with_impacts) == 2
    assert "dec.impact(held_out, n_references=n_references)" in code
    assert all("n_references=n_references" in args for args in with_impacts)


class TerminalShell:
    """A terminal IPython: no ``kernel``, no HTML front end."""


class KernelShell:
    kernel = object()


@pytest.mark.parametrize("shell, returned, displayed", [(TerminalShell(), Report, 0), (KernelShell(), type(None), 1)])
def test_show_keeps_the_report_where_the_shell_cannot_draw_it(dec, x, monkeypatch, shell, returned, displayed):
    """In a terminal IPython ``show`` computed the whole report and returned None: only a text
    repr was printed and the report was lost. A Jupyter kernel still gets one display."""
    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    rep = show(dec, x, n_references=1, n_top=1)
    assert isinstance(rep, returned) and len(shown) == displayed
    assert all(isinstance(s, Report) for s in shown)


def test_a_lone_surrogate_in_a_token_becomes_the_replacement_character(dec, x, tmp_path):
    """It crashed deep in pandas/pyarrow (or at save) with an unclear UnicodeEncodeError."""
    path = report(dec, x, tmp_path / "r.html", to_str=lambda ids: ["a\ud800"] * ids.numel(), n_references=1,
                  n_top=1)
    text = path.read_text(encoding="utf-8")
    assert "a\ufffd" in text and "\ud800" not in text


def test_a_lone_surrogate_in_the_title_is_refused_before_any_analysis(dec, x, monkeypatch, tmp_path):
    """It failed at ``save``, after every analysis, with an unclear UnicodeEncodeError."""
    def no_analysis(*args, **kwargs):
        raise AssertionError("an analysis ran before the title was checked")

    monkeypatch.setattr(Decomposition, "impact", no_analysis)
    with pytest.raises(ValueError, match=r"title has a lone surrogate '\\ud800' at index 1"):
        report(dec, x, tmp_path / "r.html", title="t\ud800", n_top=1)
    assert not (tmp_path / "r.html").exists()


def test_to_str_may_return_any_iterable_of_strings(dec, x):
    """A generator failed with a bare "object of type 'generator' has no len()"."""
    html = build(dec, x, to_str=lambda ids: (f"w{i}" for i in ids.tolist()), n_references=1, n_top=1).html
    assert re.search(r">w\d+<", html)
    with pytest.raises(ValueError, match="one string per token id: got NoneType for"):
        build(dec, x, to_str=lambda ids: None, n_references=1)
    with pytest.raises(ValueError, match="one string per token id: got generator of length 1 for"):
        build(dec, x, to_str=lambda ids: (s for s in ["a"]), n_references=1)


def test_a_report_whose_every_subnetwork_is_dead_says_so(dec, x, monkeypatch):
    """It silently showed all of them, as if they were live."""
    note = "Every subnetwork is dead (P_act 0): all of them are shown."
    assert note not in build(dec, x, n_references=1, n_top=1).html
    monkeypatch.setattr(Decomposition, "fraction_active", property(lambda self: torch.zeros(self.n_subnetworks)))
    html = build(dec, x, n_references=1, n_top=1).html
    assert note in html and 'id="subnet-0"' in html and 'id="subnet-1"' in html
