"""Installing as users install packages: a wheel built from a copy of the checkout, installed
into a fresh virtual environment, works from outside the checkout and carries the CUDA C++
sources (``xgblora_fast/csrc/``) that the JIT build of the fallback needs.

No network: the wheel is built with the project environment's setuptools
(``--no-build-isolation``) and installed with ``--no-deps``. The fresh environment reuses the
project environment's torch, transformers, ... through a ``.pth`` file: ``--system-site-packages``
alone would give it the site-packages of the base interpreter, not of the project's venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from xgblora_fast.ops import _native

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CSRC_FILES = (*_native.SOURCES, *_native.HEADERS, "host_test.cpp")
# What a fresh clone does not have (build outputs, caches, environments).
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "runs", "__pycache__",
    ".pytest_cache", ".ruff_cache", ".benchmarks", "gpu_check_*", "*.so",
)  # fmt: skip


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout as a clone has it (an in-tree build writes build/ and egg-info)."""
    src = tmp_path_factory.mktemp("checkout") / "xgblora-fast"
    shutil.copytree(REPO, src, ignore=NOT_IN_A_CLONE)
    return src


@pytest.fixture(scope="module")
def wheel(checkout, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", checkout, "-w", dist],
        cwd=dist)  # fmt: skip
    wheels = list(dist.glob("xgblora_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_and_sdist_carry_the_csrc_sources(wheel, checkout, tmp_path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in CSRC_FILES:
        assert f"xgblora_fast/csrc/{name}" in names
    assert "xgblora_fast/ops/_native.py" in names
    # The sdist (MANIFEST.in) keeps csrc/ beside the package, where setup.py copies it from.
    out = tmp_path / "sdist"
    code = f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"
    sdist = out / run([sys.executable, "-c", code], cwd=checkout).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    for name in CSRC_FILES:
        assert f"csrc/{name}" in members


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    # The project's pip installs into the new environment (no ensurepip, no network); before the
    # .pth below exists, so it sees no other copy of the package.
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python,
         "install", "--no-deps", "--no-index", wheel], tmp_path)  # fmt: skip
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(run([python, "-c", code], tmp_path).stdout.strip())
    (purelib / "_xgblora_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    probe = (
        "import json, xgblora_fast, xgblora_fast.ops._native as n\n"
        "c = n.find_csrc()\n"
        "print(json.dumps({'file': xgblora_fast.__file__, 'csrc': c and str(c),\n"
        "    'files': sorted(p.name for p in c.iterdir()) if c else [],\n"
        "    'available': n.sources_available()}))\n"
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = json.loads(run([python, "-c", probe], cwd, env).stdout.strip().splitlines()[-1])
    package = Path(out["file"]).resolve().parent
    assert package == (purelib / "xgblora_fast").resolve(), out  # the venv's copy ...
    assert not package.is_relative_to(REPO), out  # ... not the checkout's
    csrc = Path(out["csrc"])
    assert csrc == package / "csrc" and csrc.is_dir(), out
    assert set(CSRC_FILES) <= set(out["files"]), out
    assert out["available"], out

    cli = run([venv / "bin" / "xgblora-fast", "finetune", "--help"], cwd, env)
    assert "--model" in cli.stdout
