"""Redraw a benchmark's PNG from its JSON (for results made on a machine without matplotlib).

    python -m bench.replot bench/results/kernels.json
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

_MODULE_OF = {"kernels": "bench.kernels", "offline_cpu": "bench.offline_cpu", "latency": "bench.latency",
              "offline": "bench.offline", "tp": "bench.tp", "allreduce": "bench.allreduce", "router": "bench.router",
              "serving": "bench.serving"}


def main() -> None:
    for arg in sys.argv[1:]:
        path = Path(arg)
        result = json.loads(path.read_text())
        name = result["benchmark"]
        module = next(m for prefix, m in _MODULE_OF.items() if name == prefix or name.startswith(prefix + "_"))
        importlib.import_module(module).plot(result, path.with_suffix(".png"))
        print("wrote", path.with_suffix(".png"))


if __name__ == "__main__":
    main()
