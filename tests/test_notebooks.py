"""The notebooks run top to bottom offline, draw their plots, and are committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIGURES = {"01_zero_shot": 4, "02_few_shot": 3, "03_search": 3}  # plots each notebook shows


def test_three_notebooks_with_outputs_cleared():
    assert [p.name for p in NOTEBOOKS] == ["01_zero_shot.ipynb", "02_few_shot.ipynb", "03_search.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not cleared"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # The kernel inherits the session's isolated cache and offline hub, imports this checkout (as the test
    # process does, whatever the install), and makes its temp folders in tmp_path. One thread: the model
    # is tiny, and spinning OpenMP threads are slow on a shared CPU.
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) == FIGURES[path.stem], f"{path.name}: plots not displayed"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
