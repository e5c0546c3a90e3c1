"""examples/tutorial-small.ipynb runs top to bottom through the Python API: a real, tiny sweep.

The notebook starts its own simulation SuperLink, as a user's would (it runs in its own
kernel, so it cannot borrow the session's); only its output folder is pointed at tmp_path.
"""

import json
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.e2e

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "tutorial-small.ipynb"
PARAMETERS = "OUT = None"


def outputs(nb, source_start):
    """The outputs of the code cell whose source starts with `source_start`."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    return cell.outputs


def test_the_tutorial_notebook_runs_and_shows_both_strategies(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if c.cell_type == "code" and c.source == PARAMETERS]
    out = tmp_path / "tutorial-small"
    params.source = f"OUT = {str(out)!r}"
    t0 = time.monotonic()
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    took = time.monotonic() - t0
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors

    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["completed"] * 6, [(c["id"], c["error"]) for c in cells]
    table = outputs(nb, "result.table")[0]["data"]["text/plain"]
    rows = [line.split() for line in table.splitlines()[1:]]
    assert [r[1] for r in rows] == ["fedavg"] * 3 + ["gossip"] * 3, table
    assert all(r[-4] == "1" for r in rows), "one seed a cell"
    names = outputs(nb, "figures = result.figures()")[0]["data"]["text/plain"]
    assert "'final_accuracy_vs_eps'" in names and "'accuracy_vs_round'" in names
    figure = outputs(nb, 'figures["final_accuracy_vs_eps"]')
    assert any("image/png" in o.get("data", {}) for o in figure), "the figure is not shown"
    assert not (out / "logs").exists()
    assert took < 600
