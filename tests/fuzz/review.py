"""After a fuzz run: status counts and violations by class (``tally``), errors the servers logged
(``ServerLog``), and the checks that the engine is idle and the server still answers (``review``).

``ServerLog`` catches what no answer shows: an exception that escaped the HTTP app after its response went
out (uvicorn then drops the keep-alive connection, and the client's next request on it fails), or an
internal error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from collections import Counter
from typing import Self

from tests.fuzz.clients import still_serving
from tests.fuzz.contract import DETAIL_CHARS, Outcome


def tally(outcomes: list[Outcome], examples: int = 20) -> dict:
    """Counts of statuses (overall and per kind), violations by class, and the first ``examples`` bad cases."""
    bad = [o for o in outcomes if o.violations]
    return {
        "requests": len(outcomes),
        "statuses": dict(Counter(o.status for o in outcomes).most_common()),
        "by_kind": {kind: dict(Counter(o.status for o in outcomes if o.case.kind == kind).most_common())
                    for kind in sorted({o.case.kind for o in outcomes})},
        "violations": len(bad),
        "violation_classes": dict(Counter(v for o in bad for v in o.violations).most_common()),
        "examples": [{"violations": o.violations, "status": o.status, "detail": o.detail, "kind": o.case.kind,
                      "note": o.case.note, "repro": o.case.repro()} for o in _one_per_class(bad)[:examples]],
    }


def _one_per_class(bad: list[Outcome]) -> list[Outcome]:
    """The first outcome of each violation class, then the rest in order."""
    firsts, seen = [], set()
    for o in bad:
        key = tuple(o.violations)
        if key not in seen:
            seen.add(key)
            firsts.append(o)
    return firsts + [o for o in bad if o not in firsts]


class ServerLog(logging.Handler):
    """ERROR records of the API servers running in this process, while the ``with`` block lasts: exceptions
    that escaped the HTTP app (uvicorn's "Exception in ASGI application") and internal errors (pagoda.api).
    ``records``: one line each, the message and the exception chain's last two exceptions."""

    LOGGERS = ("uvicorn.error", "pagoda.api")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {record.getMessage()}"
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            chain = [e for e in (exc.__context__, exc) if e is not None]
            line += " | " + " <- ".join("".join(traceback.format_exception_only(e)).strip() for e in reversed(chain))
        self.records.append(line[:DETAIL_CHARS * 2])

    def __enter__(self) -> Self:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


def review(outcomes: list[Outcome], log_lines: list[str], stats, http_url: str | None, grpc_target: str | None,
           idle_s: float, set_aside=None) -> tuple[dict, list[str]]:
    """After a run: (tally, problems). Problems: answers that broke the contract, errors in the server log
    (``set_aside(outcomes, log_lines)`` may remove those a known bug explains, and count them), an engine not
    idle within ``idle_s`` (``stats()``: a replica's stats dict), a server that no longer answers."""
    known: dict[str, int] = {}
    if set_aside is not None:
        outcomes, log_lines, known = set_aside(outcomes, log_lines)
    result = tally(outcomes)
    result["server_errors"], result["known_bugs"] = log_lines, known
    problems = [f"{result['violations']} answers broke the contract: {result['violation_classes']}"] \
        if result["violations"] else []
    if log_lines:
        problems.append(f"{len(log_lines)} errors in the server log, e.g. {log_lines[0]}")
    idle, waited, last = wait_idle(stats, idle_s)
    if not idle:
        problems.append(f"engine not idle {waited:.1f}s after the run: {last}")
    problems += asyncio.run(still_serving(http_url, grpc_target))
    return result, problems


def explain(result: dict, problems: list[str], limit: int = 20_000) -> str:
    """An assertion message: the problems, then the tally with the requests that reproduce them."""
    return "\n".join(problems) + "\n" + json.dumps(result, indent=1, ensure_ascii=True)[:limit]


def wait_idle(stats, timeout_s: float, poll_s: float = 0.05) -> tuple[bool, float, dict]:
    """Polls ``stats()`` (a replica's stats dict) until nothing runs or waits and no KV block is in use;
    (idle, seconds waited, last stats)."""
    start = time.monotonic()
    while True:
        last = stats()
        if last["num_running"] == 0 and last["num_waiting"] == 0 and last["kv_cache_usage"] == 0:
            return True, time.monotonic() - start, last
        if time.monotonic() - start > timeout_s:
            return False, time.monotonic() - start, last
        time.sleep(poll_s)
