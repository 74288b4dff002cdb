"""demos/quickstart.ipynb runs top to bottom on CPU, and its inline report is the offline one."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "demos" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        pytest.fail(f"the notebook test needs the dev dependencies nbclient, nbformat and ipykernel ({e}): "
                    f"pip install -e '.[dev]'", pytrace=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    inline = [h for h in html if "CircuitsVis.render(" in h]
    assert len(inline) == 1 and "var CircuitsVis=" in inline[0] and "unpkg" not in inline[0]
    assert (tmp_path / "quickstart_report.html").is_file()
