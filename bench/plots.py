"""PNG plots of a results file (matplotlib, optional): median time and peak memory against size."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional


def plot(doc: Dict[str, Any], path: Path, *, x: Callable[[Dict[str, Any]], float], xlabel: str,
         series: Callable[[Dict[str, Any]], str], title: str, ylabel_time: str = "median time (s)",
         variant: Optional[Callable[[Dict[str, Any]], str]] = None) -> Optional[Path]:
    """Two panels: median time (log, p20-p80 band) and peak memory against size. One colour per provider, one line
    style per ``variant`` (case / dtype), so providers compare at a glance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    variant = variant or (lambda r: "")
    lines: Dict[tuple, List[tuple]] = {}
    for r in doc["rows"]:
        if r.get("status") == "ok":
            lines.setdefault((r.get("provider", ""), variant(r), series(r)), []).append(
                (x(r), r["median_s"], r.get("p20_s"), r.get("p80_s"), r.get("peak_mb")))
    providers = sorted({k[0] for k in lines})
    variants = sorted({k[1] for k in lines})
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    styles = {v: ["-", "--", ":", "-."][i % 4] for i, v in enumerate(variants)}
    markers = {v: ["o", "s", "^", "D"][i % 4] for i, v in enumerate(variants)}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for (prov, var, name), pts in sorted(lines.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        kw = dict(color=colors[prov], linestyle=styles[var], marker=markers[var])
        ax_t.plot(xs, [p[1] for p in pts], label=name, **kw)
        ax_t.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.12, color=colors[prov])
        ax_m.plot(xs, [max(p[4] or 0, 1e-2) for p in pts], label=name, **kw)
    for ax, yl in ((ax_t, ylabel_time), (ax_m, "peak memory over inputs (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax_m.legend(fontsize=7, loc="best")
    m = doc.get("machine", {})
    where = m.get("gpu_name") if str(m.get("device", "cpu")).startswith("cuda") else \
        f"{m.get('cpu_model')}, {m.get('torch_threads')} threads"
    fig.suptitle(f"{title} - {where}" + ("  [QUICK smoke run]" if doc.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
