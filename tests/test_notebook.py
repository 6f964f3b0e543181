"""launch/colab_tpu.ipynb runs top to bottom on a CPU (its parameter cell picks the tiny config there)."""

import nbclient
import nbformat
from conftest import REPO


def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    notebook = nbformat.read(REPO / "launch" / "colab_tpu.ipynb", as_version=4)
    # The kernel inherits this process's environment: 8 simulated CPU devices, no network needed.
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()

    outputs = {
        index: "".join(out.get("text", "") for out in cell.get("outputs", []))
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
    }
    text = "\n".join(outputs.values())
    assert "8 x cpu (cpu)" in text
    assert "plan for experiments/tiny.py on 8 x cpu" in text
    assert "finished at step 8" in text
    assert "'loss':" in text and "ROMEO:" in text
    plots = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(plots) == 1
    assert (tmp_path / "runs" / "colab" / "eval" / "metrics.jsonl").exists()
