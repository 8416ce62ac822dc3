"""The `pagoda` command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import requires_smollm2

CLI = [sys.executable, "-m", "pagoda.engine.cli"]


def _run(args, stdin=None, timeout=300):
    return subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_sampling_flag():
    out = _run(["generate", "--help"]).stdout
    for flag in ("--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--presence-penalty",
                 "--frequency-penalty", "--seed", "--max-tokens", "--min-tokens", "--stop", "--stop-token-ids",
                 "--ignore-eos"):
        assert flag in out


def test_bad_flag_value_is_a_clear_error():
    result = _run(["generate", "hi", "--top-p", "0"])
    assert result.returncode == 2
    assert "top_p must be in (0, 1]" in result.stderr


@requires_smollm2
def test_generate_answers_paris():
    result = _run(["generate", "What is the capital of France?", "--max-tokens", "32"])
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@requires_smollm2
def test_chat_keeps_the_conversation():
    result = _run(["chat", "--max-tokens", "24"], stdin="What is the capital of France?\nAnd of Germany?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pagoda> ") == 2
    assert "Paris" in result.stdout
