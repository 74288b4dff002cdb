"""The README's quickstart runs as written and prints what it says it prints (shapes)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_quickstart_runs_and_matches_the_documented_shapes():
    code = blocks("python")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README quickstart", "exec"), {})
    printed = out.getvalue().splitlines()
    documented = blocks("text")[0].splitlines()
    assert printed[0].startswith("Decomposition(8 subnetworks of 8 weights, sample='token', loss=")
    assert printed[1] == documented[1]  # subnetwork shapes are exact
    assert printed[-1] == documented[-1] == "torch.Size([50, 8])"
    # the head-share tensor: its text as printed, digits aside (they depend on the torch build)
    digits = re.compile(r"\d\.\d{4}e[-+]\d{2}")
    assert [digits.sub("#", line) for line in printed[2:-1]] == [digits.sub("#", line) for line in documented[2:-1]]


def test_reading_section_runs_after_the_quickstart():
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for code in blocks("python")[:2]:
            exec(compile(code, "README", "exec"), ns)
    assert ns["imp"].shape == (64, 25, 8)
    assert ns["logits"].shape == (4, 25, len(ns["induction"].VOCAB))


def test_readme_has_exactly_the_two_commands():
    assert "l3d-lens demo" in README
    marker = README.index("<!-- test-command -->")
    assert 'python -m pytest -q' in README[marker: marker + 80]
