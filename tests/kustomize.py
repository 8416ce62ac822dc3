"""The manifests of ``deploy/k8s`` as ``kubectl kustomize`` renders them (tests that need them skip
without kubectl)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/single-gpu", "overlays/tp2", "overlays/autoscale")
HAS_KUBECTL = shutil.which("kubectl") is not None
requires_kubectl = pytest.mark.skipif(not HAS_KUBECTL, reason="kubectl (with kustomize) is not installed")


@cache
def rendered(kustomization: str) -> tuple[dict, ...]:
    """Every object of ``deploy/k8s/<kustomization>``, rendered."""
    if not HAS_KUBECTL:
        pytest.skip("kubectl (with kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(kustomization: str, kind: str) -> list[dict]:
    """The rendered objects of one kind (copies: callers may change them)."""
    return [copy.deepcopy(d) for d in rendered(kustomization) if d["kind"] == kind]
