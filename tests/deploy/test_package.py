"""The package as the shim image installs it (``pip install /src[...]``, not editable, from the
files its Dockerfile copies): every module and kernel source of the tree is in it, and the installed
copy serves with request workers (``make test`` installs the tree editable, which finds any module)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import accel
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("*.py", "*.cu")  # what the shim and the client are made of (the kernels' CUDA sources too)


def _sources(top: Path) -> set[str]:
    return {p.relative_to(top).as_posix() for pattern in SOURCES for p in top.rglob(pattern)
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The Dockerfile's build context (pyproject.toml, README.md, shim/, the client) built into a
    wheel and installed into a folder of its own."""
    tmp = tmp_path_factory.mktemp("package")
    context = tmp / "src"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "shim", context / "shim", ignore=skip)
    shutil.copytree(ROOT / "template/python3-accel/accel", context / "template/python3-accel/accel", ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip[:3], "wheel", *pip[3:], "--no-deps", "-w", str(tmp / "wheel"), str(context)],
                   check=True, timeout=300, cwd=tmp)
    installed = tmp / "site"
    subprocess.run([*pip[:3], "install", *pip[3:], "--no-deps", "--no-compile", "--target", str(installed),
                    *map(str, (tmp / "wheel").glob("*.whl"))], check=True, timeout=300, cwd=tmp)
    return installed


def test_every_module_and_kernel_source_is_installed(site):
    for package, source in (("shim", ROOT / "shim"), ("accel", ROOT / "template/python3-accel/accel")):
        missing = _sources(source) - _sources(site / package)
        assert not missing, f"{package}: not installed: {sorted(missing)}"


def test_the_installed_package_serves_with_request_workers(site, tmp_path):
    """Run from the installed folder alone (another working directory, so that neither the tree
    nor the editable install is found first): two request workers start and answer."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(site)}
    (tmp_path / "models").mkdir()
    with open(tmp_path / "shim.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--device", "cpu", "--port", str(port),
                                 "--models", str(tmp_path / "models"), "--classify-model", "", "--workers", "2"],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = accel.Client(f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + 60
        while not client.ready():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "shim.log").read_text()
            time.sleep(0.1)
        assert client.gemm([[1.0, 2.0]], [[3.0], [4.0]]).tolist() == [[11.0]]
        where = subprocess.run([sys.executable, "-c", "import shim.workers; print(shim.workers.__file__)"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
        assert where.startswith(str(site)), where
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "shim.log").read_text()
    assert "2 request workers serving" in (tmp_path / "shim.log").read_text()
