"""Results files: where they live, atomic JSON writes, row keys, and the markdown/PNG written next to them."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from bench.plots import plot

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1


def results_path(bench: str, device: str, quick: bool, out_dir: Optional[Path] = None) -> Path:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    name = f"{bench}_{kind}{'_quick' if quick else ''}.json"
    return Path(out_dir or RESULTS_DIR) / name


def load_results(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def save_results(path: Path, doc: Dict[str, Any]) -> None:
    """Atomic write (a crash mid-run leaves the previous complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)


def row_key(row: Dict[str, Any], fields: Iterable[str]) -> str:
    return json.dumps([row.get(f) for f in fields], default=str)


def write_outputs(doc: Dict[str, Any], path: Path, markdown_text: str, *, plot_enabled: bool = True,
                  **plot_kwargs: Any) -> None:
    """Write ``<path>.md``, print the table, and plot ``<path>.png`` with :func:`plot` (``plot_kwargs``)."""
    path.with_suffix(".md").write_text(markdown_text + "\n")
    print()
    print(markdown_text)
    png = plot(doc, path.with_suffix(".png"), **plot_kwargs) if plot_enabled else None
    print(f"\nwrote {path}, {path.with_suffix('.md')}, {png}" if png else f"\nwrote {path}")
