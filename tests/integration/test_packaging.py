"""pagoda installs one import name, ``pagoda``, and lives beside Hugging Face's ``kernels``.

transformers (5.25 on) depends on the PyPI package ``kernels`` and imports it; pagoda's Triton
kernels are ``pagoda.kernels``. These tests run real interpreters in subprocesses, so that what
they see is what a user's shell sees: from the repository root (where the working directory is
on ``sys.path``) and from a folder outside it, with the editable install the README makes, and
with a non-editable ``pip install .`` into a throwaway virtual environment.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.conftest import requires_smollm2

ROOT = Path(__file__).resolve().parents[2]

# Imports transformers (and through it HF's kernels), with --load-gguf loads the embedded GGUF through
# transformers' own GGUF loader, then imports pagoda; prints where each came from.
CLASH_SCRIPT = textwrap.dedent("""
    import json, sys
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    import kernels
    from kernels import CUDAProperties, kernelize  # HF's API, not pagoda's
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    if "--load-gguf" in sys.argv:
        from pagoda.engine.loader import embedded_gguf_path
        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        assert model.config.num_hidden_layers == 30 and tokenizer.eos_token == "<|im_end|>"
    import pagoda, pagoda.kernels.rmsnorm, pagoda.cluster.api.ingress
    from pagoda import LLM, SamplingParams
    print(json.dumps({"kernels": kernels.__file__, "pagoda": pagoda.__file__,
                      "pagoda.kernels": pagoda.kernels.rmsnorm.__file__}))
""")


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}  # cwd on sys.path
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{cmd} in {cwd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _top_level(dist: importlib.metadata.Distribution) -> set[str]:
    return set((dist.read_text("top_level.txt") or "").split())


def test_the_installed_distribution_has_one_top_level_name():
    assert _top_level(importlib.metadata.distribution("pagoda")) == {"pagoda"}
    # and no other import name resolves to pagoda's distribution
    owners = importlib.metadata.packages_distributions()
    assert sorted(name for name, dists in owners.items() if "pagoda" in dists) == ["pagoda"]


def test_the_repository_folders_are_not_top_level_packages():
    """engine/, kernels/ and cluster/ are portions of ``pagoda`` (no __init__.py): from the repository
    root they cannot shadow an installed package of the same name."""
    for folder in ("engine", "kernels", "cluster"):
        assert not (ROOT / folder / "__init__.py").exists(), folder
        link = ROOT / "pagoda" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), link


def _top_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, first name) of every absolute import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_no_module_imports_the_old_top_level_names():
    """Every import inside the project names ``pagoda.``: ``import engine`` would work from the
    repository root by accident and fail everywhere else."""
    files = [ROOT / "pagoda" / "__init__.py"]
    folders = ("engine", "kernels", "cluster", "bench", "tests", "deploy")
    files += [p for folder in folders for p in (ROOT / folder).rglob("*.py")]
    offenders = [f"{path.relative_to(ROOT)}:{line} import {name}" for path in files
                 for line, name in _top_level_imports(path) if name in ("engine", "kernels", "cluster")]
    assert not offenders, offenders


# Which `kernels` a process gets is settled by its first import, which both runs check. The GGUF load
# (four fifths of a run's time) runs once, from the repository root: there the working directory is on
# sys.path, where it could shadow what transformers imports while it loads.
@requires_smollm2
@pytest.mark.parametrize("where, load_gguf", [("repository root", True), ("another folder", False)],
                         ids=["repository root", "another folder"])
def test_transformers_and_hf_kernels_work_beside_pagoda(where, load_gguf, tmp_path):
    assert importlib.metadata.version("kernels"), "transformers' dependency `kernels` should be installed"
    cwd = ROOT if where == "repository root" else tmp_path
    seen = _last_json(_run([sys.executable, "-c", CLASH_SCRIPT] + ["--load-gguf"] * load_gguf, cwd))
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(seen["kernels"]).resolve().is_relative_to(site), seen  # HF's package, not pagoda's folder
    assert Path(seen["pagoda.kernels"]).resolve() == (ROOT / "kernels" / "rmsnorm.py").resolve(), seen


def _dockerfile_copies() -> set[str]:
    """What deploy/Dockerfile copies into the image to build pagoda from."""
    lines = (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    return {src for sources in copies for src in sources if not src.startswith("--")}


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> Path:
    """A throwaway virtual environment with pagoda installed by ``pip install .`` (not editable), from
    a copy of exactly what deploy/Dockerfile copies (so no stale build/ folder can leak in, and the
    image's file list is proven enough). Its dependencies come from this environment through a .pth
    file, which puts this environment's site-packages on the path without running its .pth files,
    so the editable install stays out."""
    src, venv = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("venv")
    for name in _dockerfile_copies():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], ROOT)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], ROOT).strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_deps_of_the_test_env.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
          "--no-cache-dir", "--quiet", str(src)], ROOT)
    return venv


def test_a_non_editable_install_holds_only_pagoda(installed_copy):
    python = installed_copy / "bin" / "python"
    code = ("import importlib.metadata as m, json, pagoda; d = m.distribution('pagoda'); "
            "print(json.dumps({'file': pagoda.__file__, 'top_level': d.read_text('top_level.txt'), "
            "'files': [str(f) for f in d.files]}))")
    seen = _last_json(_run([str(python), "-c", code], installed_copy))
    assert Path(seen["file"]).is_relative_to(installed_copy), seen["file"]  # the copy, not the source tree
    assert seen["top_level"].split() == ["pagoda"]
    installed = {Path(f).parts[0] for f in seen["files"] if not f.startswith("..")}
    assert installed == {"pagoda", "pagoda-0.1.0.dist-info"}, installed


@requires_smollm2
def test_a_non_editable_install_generates_and_serves_from_outside_the_source_tree(installed_copy, tmp_path):
    python, pagoda = installed_copy / "bin" / "python", installed_copy / "bin" / "pagoda"
    out = _run([str(pagoda), "generate", "What is the capital of France?", "--max-tokens", "16",
                "--temperature", "0"], tmp_path)
    assert "Paris" in out
    code = ("import pagoda.cluster.api.ingress as i, transformers, kernels; from transformers import LlamaConfig; "
            "print(i.__file__, kernels.__file__)")
    ingress, hf_kernels = _run([str(python), "-c", code], tmp_path).split()
    assert Path(ingress).is_relative_to(installed_copy) and "site-packages/kernels" in hf_kernels


def test_the_dockerfile_installs_the_package_and_smoke_checks_the_installed_copy():
    """deploy/Dockerfile copies what the wheel is built from (installed_copy builds from the same list)
    and imports pagoda from outside the source tree."""
    assert {"pagoda", "engine", "kernels", "cluster", "pyproject.toml"} <= _dockerfile_copies()
    lines = (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install"))
    run = " ".join(line.strip().rstrip("\\") for line in lines[start:])
    install, smoke = run.split("&& cd /tmp", 1)  # the check runs after leaving the source tree
    assert 'pip install --no-cache-dir ".[cluster]"' in install and "-e " not in install
    assert "import pagoda" in smoke and "site-packages" in smoke
