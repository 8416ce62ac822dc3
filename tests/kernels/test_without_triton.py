"""Without triton, ``pagoda.kernels`` still imports: the references work, the wrappers say why they can't."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from pagoda.kernels._triton import HAS_TRITON
from pagoda.kernels.activation import silu_and_mul, silu_and_mul_ref
assert not HAS_TRITON
x = torch.randn(2, 8)
torch.testing.assert_close(silu_and_mul_ref(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])
try:
    silu_and_mul(x)
except RuntimeError as err:
    assert "triton" in str(err)
else:
    raise AssertionError("the wrapper ran without triton")
"""


def test_references_import_and_run_without_triton():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
