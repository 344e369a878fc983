"""Every notebook runs top to bottom on a GPU machine, CUDA visible (the committed outputs are CPU runs:
nbval checks those; this checks the GPU paths: live benchmarks, kernels on cuda tensors, exercise checks
on the device).

Run: `PYTHONPATH=$PWD python3 -m pytest -m gpu -p no:nbval tests/test_gpu_notebooks.py` (the project on
PYTHONPATH reaches the notebook kernels). Needs nbformat, nbclient, ipykernel, ipywidgets and
matplotlib: a missing one fails the test with its name, it is never skipped.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TOOLS = ("nbformat", "nbclient", "ipykernel", "ipywidgets", "matplotlib")

pytestmark = pytest.mark.gpu


def test_notebooks_were_found():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_gpu(path):
    assert torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "", "CUDA must be visible"
    missing = [name for name in TOOLS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"install {', '.join(missing)} to run the notebooks (not skipped: this test exists for the GPU)")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [(cell.source[:200], out.ename, out.evalue) for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, f"{path.name} on the GPU: {errors[0][1]}: {errors[0][2]}\nin the cell\n{errors[0][0]}"
    ran = [cell for cell in nb.cells if cell.cell_type == "code" and cell.get("execution_count")]
    assert len(ran) == sum(cell.cell_type == "code" for cell in nb.cells), "some cells did not run"
