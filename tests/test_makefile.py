"""The two commands (issue #18): the torch install arguments the Makefile passes, and idempotent setup.

PyTorch's CPU index cannot be reached from CI, so these tests check the arguments (`make torch-install-args`,
`make -n`) with the probe's answer forced; `make check-install` resolves the real install where it can."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cpu_only_linux_gets_the_cpu_index_when_it_answers():
    outside_ci = {"CI": ""}
    if os.uname().sysname == "Linux" and shutil.which("nvidia-smi") is None:
        # the probe answers (PYTHON=true): CPU index added; it does not (PYTHON=false): the registry's torch only
        assert make("torch-install-args", "PYTHON=true", env=outside_ci).split() == ["torch==2.13.0", "--extra-index-url", CPU_INDEX]
        assert make("torch-install-args", "PYTHON=false", env=outside_ci).split() == ["torch==2.13.0"]
    else:  # a GPU machine or another system: PyPI's torch as it is
        assert make("torch-install-args", "PYTHON=true", env=outside_ci).split() == ["torch==2.13.0"]
    # under CI no other host is probed: its registry serves the CPU build
    assert make("torch-install-args", "PYTHON=true", env={"CI": "true"}).split() == ["torch==2.13.0"]
    assert make("torch-install-args", f"TORCH_INDEX={CPU_INDEX}").split() == ["torch==2.13.0", "--extra-index-url", CPU_INDEX]
    assert make("torch-install-args", "TORCH_INDEX=none").split() == ["torch==2.13.0"]
    assert make("torch-install-args", "TORCH_INSTALL=torch --index-url x").split() == ["torch", "--index-url", "x"]


def test_setup_is_idempotent(tmp_path):
    venv = tmp_path / "venv"
    first = make("-n", "demo", f"VENV={venv}", "TORCH_INDEX=none")
    assert "pip install -q torch==2.13.0" in first and "pip install -q -e ." in first and "quickstart.py" in first
    (venv / "bin").mkdir(parents=True)
    for stamp in (".stamp-venv", ".stamp-torch-2.13.0", ".stamp-attnctl", ".stamp-test"):
        (venv / stamp).touch()
    second = make("-n", "demo", f"VENV={venv}", "TORCH_INDEX=none")
    assert "pip install" not in second and "venv" not in second.split("quickstart.py")[0].replace(str(venv), "")
    assert "quickstart.py" in second
    assert "pip install" not in make("-n", "test", f"VENV={venv}", "TORCH_INDEX=none")
    os.utime(venv / ".stamp-attnctl", (0, 0))  # older than pyproject.toml: the package is installed again
    assert "pip install -q -e ." in make("-n", "demo", f"VENV={venv}", "TORCH_INDEX=none")


def test_test_target_uses_xdist_workers_unless_told_not_to(tmp_path):
    venv = tmp_path / "venv"
    def pytest_line(*args):
        lines = make("-n", "test", f"VENV={venv}", "TORCH_INDEX=none", *args).splitlines()
        return [line.split()[1:] for line in lines if "-m pytest" in line][0]

    assert pytest_line() == ["-m", "pytest", "-q", "-n", "auto"]
    assert pytest_line("TEST_JOBS=1") == ["-m", "pytest", "-q"]
