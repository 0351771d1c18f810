"""The notebooks execute headless (nbclient, the ``python3`` kernel) on the committed results and write their
figures; the tests send the figures to a temporary path so the tree stays clean."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_roofline_notebook_executes_and_writes_its_figure(tmp_path, monkeypatch):
    png = tmp_path / "roofline.png"
    monkeypatch.setenv("ROOFLINE_PNG", str(png))  # the kernel inherits the environment
    monkeypatch.delenv("ROOFLINE_RESULTS", raising=False)  # the committed bench/results/
    nb = nbformat.read(ROOT / "notebooks" / "roofline.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figure is shown
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    committed = [p for p in (ROOT / "bench" / "results").glob("*.json")]
    if not committed:
        assert "No GPU results committed yet" in text
