"""The demo notebooks run top to bottom on CPU: quickstart.ipynb, whose inline report is the
offline one, and toy_models.ipynb."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "demos" / "quickstart.ipynb"
TOY_NOTEBOOK = NOTEBOOK.parent / "toy_models.ipynb"


def _run(path: Path, folder: Path) -> list:
    """Execute the notebook at ``path`` (committed without outputs) in ``folder``; its code
    cells' outputs, none of them an error."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        pytest.fail(f"the notebook test needs the dev dependencies nbclient, nbformat and ipykernel ({e}): "
                    f"pip install -e '.[dev]'", pytrace=False)
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _html(outputs: list) -> list[str]:
    return [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]


def test_quickstart_notebook_runs(tmp_path):
    inline = [h for h in _html(_run(NOTEBOOK, tmp_path)) if "CircuitsVis.render(" in h]
    assert len(inline) == 1 and "var CircuitsVis=" in inline[0] and "unpkg" not in inline[0]
    assert (tmp_path / "quickstart_report.html").is_file()


@pytest.mark.slow  # about 30 s; CI runs it (.ci/run: pytest -m slow)
def test_toy_notebook_runs_and_shows_the_scorecard_as_a_table(tmp_path):
    """demos/toy_models.ipynb: TMCS trained, decomposed, scored (the scorecard renders as the
    report-styled HTML table), matched and saved, top to bottom on CPU."""
    outputs = _run(TOY_NOTEBOOK, tmp_path)
    html = _html(outputs)
    assert len(html) == 1 and html[0].startswith('<div class="l3d-report">') and "tmcs: " in html[0]
    text = "".join(o.get("text", "") for o in outputs)
    lines = [ln for ln in text.splitlines() if ln.startswith("input ")]
    assert len(lines) == 10 and "same weights: True" in text
    # every input's matched subnetwork lies in that input's W_in column (a short run gets there)
    assert all(f"in column {i}, " in ln for i, ln in enumerate(lines)), lines
    assert (tmp_path / "tmcs_seed0" / "toy.json").is_file()
