"""Where a running `pagoda serve` can be found: one small JSON file per application on this host.

    ~/.cache/pagoda/serve-<app>.json   {"app": ..., "gcs_address": ..., "pid": ...}   ($PAGODA_STATE_DIR moves it)

`pagoda serve` writes it once its application is up (on the local Ray cluster it started) and
removes it on exit; `pagoda status` reads it when given no address, so it reports on that cluster
rather than on whichever Ray cluster was started last on the host (Ray's ``address="auto"``). A file
whose process is gone is stale and is removed when read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_DIR_ENV = "PAGODA_STATE_DIR"


def state_path(app: str) -> Path:
    root = os.environ.get(STATE_DIR_ENV) or Path.home() / ".cache" / "pagoda"
    return Path(root) / f"serve-{app}.json"


def write_state(app: str, gcs_address: str, pid: int | None = None) -> Path:
    path = state_path(app)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"app": app, "gcs_address": gcs_address, "pid": pid or os.getpid()}))
    tmp.replace(path)  # readers never see half a file
    return path


def remove_state(app: str, pid: int | None = None) -> None:
    """Removes the file if it is ``pid``'s (default: this process's): a newer `pagoda serve` keeps its own."""
    path = state_path(app)
    state = _read(path)
    if state is not None and state.get("pid") == (pid or os.getpid()):
        path.unlink(missing_ok=True)


def find_serve(app: str) -> str | None:
    """The GCS address of this host's live `pagoda serve` of ``app``, or None."""
    path = state_path(app)
    state = _read(path)
    if state is None:
        return None
    if not _alive(state.get("pid")):
        path.unlink(missing_ok=True)
        return None
    return state.get("gcs_address")


def _read(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
