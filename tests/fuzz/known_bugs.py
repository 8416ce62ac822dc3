"""Server bugs the fuzzer found that are not fixed yet, each with a failing test of its own in
tests/integration/test_fuzz_api.py (named beside its entry). The fuzz tests set exactly these outcomes and
server log lines aside, so that they keep guarding everything else while the bug is open; bench.fuzz counts
them by name. Delete an entry once its test passes."""

from __future__ import annotations

from tests.fuzz.contract import Outcome

OUTCOMES: dict = {}  # name -> does this outcome show the bug? (none open)
LOG_LINES: dict = {}  # name -> does this ServerLog line show the bug? (none open)


def set_aside(outcomes: list[Outcome], log_lines: list[str]) -> tuple[list[Outcome], list[str], dict[str, int]]:
    """(outcomes, log lines) without those a known bug explains, and how many each bug explained."""
    counts = {}
    for name, shows in OUTCOMES.items():
        counts[name] = sum(1 for o in outcomes if o.violations and shows(o))
    kept = [o for o in outcomes if not (o.violations and any(shows(o) for shows in OUTCOMES.values()))]
    for name, shows in LOG_LINES.items():
        counts[name] = sum(1 for line in log_lines if shows(line))
    lines = [line for line in log_lines if not any(shows(line) for shows in LOG_LINES.values())]
    return kept, lines, counts
