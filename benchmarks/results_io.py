"""Where the benchmarks' records and tables go: one JSON record per finished run (read back to resume), then
`results.json` (the numbers) and `results.md` (the table), both written atomically, so that a table read while a
long benchmark runs is always a complete one."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from optimum_rmtkd.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def finished_run(runs_dir: Path, name: str) -> Optional[Dict[str, Any]]:
    """The record `<runs_dir>/<name>.json` of a finished run, `None` when there is none (a benchmark resumes by it)."""
    path = runs_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_results(output_dir: Path, summary: Dict[str, Any], render: Callable[[Dict[str, Any]], str]) -> str:
    """Write `summary` and its Markdown rendering into `output_dir`; returns the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = render(summary)
    atomic_write_json(output_dir / "results.json", summary)
    atomic_write_text(output_dir / "results.md", text)
    return text


def write_figure(figure, path: Path, dpi: int = 110) -> None:
    """Write a pyplot `figure` as PNG atomically (rendered in memory first) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
