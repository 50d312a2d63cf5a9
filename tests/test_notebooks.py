"""Both notebooks run top to bottom on the small shipped trace (what a newcomer's first run does)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks' tests need the dev extra (nbformat, nbclient)")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SMALL_TRACE = ROOT / "traces" / "ci-small"


def execute(name: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits the test's environment
    book = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(book, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return book


def images(book: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in book.cells if cell.cell_type == "code"
               for out in cell.outputs)


def test_committed_notebooks_have_no_outputs():
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        book = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count")
                   for c in book.cells if c.cell_type == "code"), f"{path.name}: clear its outputs"


def test_analysis_notebook_runs(monkeypatch):
    book = execute("analysis.ipynb", monkeypatch, MOE_TRACE_PATH=str(SMALL_TRACE))
    assert images(book) == 4  # heatmap, spread, predictor error, placement; the loss needs metrics.parquet


def test_compare_notebook_runs(monkeypatch):
    # Its default: the shipped INT8-vs-SDPA pair of 2000-step gpt-125m-moe runs.
    monkeypatch.delenv("MOE_TRACE_A", raising=False)
    monkeypatch.delenv("MOE_TRACE_B", raising=False)
    book = execute("compare_runs.ipynb", monkeypatch)
    assert images(book) == 3


def test_balancing_notebook_runs(monkeypatch):
    # The CI subset: gpt-tiny-moe trained once per balancing method (benchmarks/balancing_study.py).
    book = execute("balancing.ipynb", monkeypatch, MOE_TRACE_STUDY=str(ROOT / "traces" / "balancing-ci"))
    assert images(book) == 3  # side-by-side summary, windowed variance, heaviest/mean load
