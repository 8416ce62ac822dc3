"""Fixtures shared by unit test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def grammar_tok(embedded_path):
    """The embedded model's tokenizer (the grammar tests' vocabulary)."""
    from pagoda.engine.tokenizer import load_tokenizer

    return load_tokenizer(embedded_path)


@pytest.fixture(scope="session")
def grammar_compiler(grammar_tok):
    """A grammar compiler over the embedded vocabulary padded by GRAMMAR_PAD ids the tokenizer never makes."""
    from pagoda.engine.structured.grammar import GrammarCompiler
    from pagoda.engine.tokenizer import eos_token_ids

    return GrammarCompiler(grammar_tok, vocab_size=len(grammar_tok) + GRAMMAR_PAD,
                           stop_token_ids=eos_token_ids(grammar_tok), max_threads=2)


GRAMMAR_PAD = 64
