"""Shared output of every benchmark: JSON for machines, a markdown table for people, a PNG plot."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path


def environment() -> dict:
    import torch
    import transformers

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, result: dict, table: str, plot=None) -> None:
    """Writes NAME.json, NAME.md and, when ``plot(path)`` is given and matplotlib exists, NAME.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(table + "\n")
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            plot(out_dir / f"{name}.png")
        except ImportError:
            print("matplotlib not installed: no plot")
    print(table)
