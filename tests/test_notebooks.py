"""The roofline notebook executes headless (nbclient, the ``python3`` kernel) on the committed results and shows its
figure without changing any tracked file; the committed figure is regenerated only by ``python -m
bench.roofline_plot`` and matches the code and the results."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

from bench import roofline_plot

ROOT = Path(__file__).resolve().parents[1]


def _tracked_changes() -> str | None:
    if not (ROOT / ".git").exists():
        return None  # a copied tree without git
    cmd = ["git", "status", "--porcelain", "--untracked-files=no"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_roofline_notebook_executes_shows_its_figure_and_changes_no_tracked_file(monkeypatch):
    monkeypatch.delenv("ROOFLINE_PNG", raising=False)  # the kernel inherits the environment
    monkeypatch.delenv("ROOFLINE_RESULTS", raising=False)  # the committed bench/results/
    before, mtime = _tracked_changes(), roofline_plot.COMMITTED_PNG.stat().st_mtime_ns
    nb = nbformat.read(ROOT / "notebooks" / "roofline.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the figure is shown
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if not list((ROOT / "bench" / "results").glob("*.json")):
        assert "No GPU results committed yet" in text
    assert _tracked_changes() == before and roofline_plot.COMMITTED_PNG.stat().st_mtime_ns == mtime


def _digest_of(png: Path) -> str | None:
    with Image.open(png) as image:
        return image.text.get(roofline_plot.DIGEST_KEY)


def test_regeneration_step_writes_the_figure_with_its_source_digest(tmp_path):
    out = tmp_path / "roofline.png"
    assert roofline_plot.main(["--out", str(out)]) == 0
    results, notes = roofline_plot.load_results(roofline_plot.RESULTS_DIR)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _digest_of(out) == roofline_plot.source_digest(results, notes)
    assert roofline_plot.source_digest([], ["a note"]) != roofline_plot.source_digest([], [])


def test_committed_roofline_figure_matches_the_code_and_results():
    results, notes = roofline_plot.load_results(roofline_plot.RESULTS_DIR)
    assert _digest_of(roofline_plot.COMMITTED_PNG) == roofline_plot.source_digest(results, notes), (
        "notebooks/roofline.png is stale: regenerate it with `python -m bench.roofline_plot`"
    )
