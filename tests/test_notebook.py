"""The quickstart notebook runs end to end (smoke settings) and shows its tables and plots."""

import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDJAX_QUICKSTART_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    markdown = "".join(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert len(images) == 4  # overview, lr curves, few-label curve, confusion matrix
    assert "| random_init |" in markdown and "| pretrained |" in markdown and "Few labels" in markdown
    assert (tmp_path / "pretrain" / "eval" / "results.json").exists()
    assert (tmp_path / "probe" / "results.json").exists()
