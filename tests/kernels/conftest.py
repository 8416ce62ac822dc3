"""Kernel tests run the Triton code itself: on CUDA where there is a GPU, else on CPU tensors
through the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported: ``triton.jit`` decides at
decoration time, for our kernels and for triton's own library functions (tl.sigmoid, tl.cdiv...).
This file sets it, which is early enough when pytest collects this directory first or alone. If
something imported triton earlier in the session (another test directory importing ``kernels``),
the interpreter cannot be switched on any more and these tests are skipped with that reason;
setting TRITON_INTERPRET=1 in the environment or in a top-level tests/conftest.py avoids it.
"""

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
_TRITON_ALREADY_IMPORTED = "triton" in sys.modules
INTERPRETER_UNAVAILABLE = False

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    INTERPRETER_UNAVAILABLE = _TRITON_ALREADY_IMPORTED and sys.modules["triton"] is not None
    if not INTERPRETER_UNAVAILABLE:
        # kernels imported without triton present would have inert stand-ins: reload to be sure.
        for name in sorted(n for n in sys.modules if n == "kernels" or n.startswith("kernels.")):
            importlib.reload(sys.modules[name])


def pytest_collection_modifyitems(config, items):
    if not INTERPRETER_UNAVAILABLE:
        return
    skip = pytest.mark.skip(
        reason="triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
        "run with TRITON_INTERPRET=1 in the environment (or set it in tests/conftest.py)"
    )
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)
