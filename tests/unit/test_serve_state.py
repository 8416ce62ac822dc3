"""How `pagoda status` finds the cluster without --address: the flag, $RAY_ADDRESS, then the state file a
live `pagoda serve` of the application wrote on this host — never Ray's "newest cluster on the host"."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagoda.cluster.serve_state import find_serve, remove_state, state_path, write_state
from pagoda.cluster.status_cli import resolve_address


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGODA_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def test_a_live_serve_is_found_and_removes_only_its_own_file():
    write_state("app", "10.0.0.5:6379")
    assert find_serve("app") == "10.0.0.5:6379" and find_serve("other") is None
    remove_state("app", pid=1)  # not the writer: a newer `pagoda serve` keeps its file
    assert find_serve("app") == "10.0.0.5:6379"
    remove_state("app")
    assert find_serve("app") is None and not state_path("app").exists()


def test_a_dead_serves_file_is_stale_and_removed():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    write_state("app", "10.0.0.5:6379", pid=int(gone.stdout))
    assert find_serve("app") is None and not state_path("app").exists()


def test_a_torn_or_foreign_file_is_ignored():
    state_path("app").write_text("{not json")
    assert find_serve("app") is None


def test_the_address_comes_from_the_flag_then_ray_address_then_the_serve(monkeypatch):
    assert resolve_address(None, "app") is None  # nothing: an error, not Ray's "auto"
    write_state("app", "10.0.0.5:6379")
    assert resolve_address(None, "app") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert resolve_address(None, "app") == "10.0.0.9:6379"
    assert resolve_address("auto", "app") == "auto"
