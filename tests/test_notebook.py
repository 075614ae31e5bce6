"""The example notebook runs headless, top to bottom, as a user would run it (examples/quickstart.ipynb:
train, ensemble, export, time, predict, score through the public API), and is kept without outputs."""

import json
import os

import pytest

from conftest import REPO

pytestmark = pytest.mark.once  # one backend is enough: the API's tests run under both

NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")


def test_the_notebook_is_stored_without_outputs():
    cells = json.load(open(NOTEBOOK))["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)


def test_the_quickstart_notebook_runs_and_scores(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"]
    assert not [o for cell in outputs for o in cell if o.get("output_type") == "error"]
    last = outputs[-1][-1]["data"]["text/plain"]
    assert "'log_loss'" in last and "'rows': 20" in last, last
    assert os.path.isfile(tmp_path / "quickstart" / "submission.csv")
    assert os.path.isfile(tmp_path / "quickstart" / "exports" / "ensemble.onnx")
