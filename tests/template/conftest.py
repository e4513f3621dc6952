"""Helpers of the template tests: the template's index.py as a module, projects made from the
template the way ``faas-cli new`` makes them, ``python index.py`` and ``accelshim up`` as subprocesses."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import requests
import yaml

from shim.up.build import shrinkwrap
from shim.up.stack import load_stack
from tests.conftest import ROOT, free_port

TEMPLATE = ROOT / "template" / "python3-accel"


@pytest.fixture(scope="session")
def index() -> ModuleType:
    """``template/python3-accel/index.py``, imported from its file (it imports no handler at import)."""
    spec = importlib.util.spec_from_file_location("python3_accel_index", TEMPLATE / "index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_project(root: Path, handlers: dict[str, str], environment: dict[str, str] | None = None) -> Path:
    """A project as ``faas-cli template pull`` + ``faas-cli new --lang python3-accel`` leave it, with
    each function's handler.py replaced by ``handlers[name]``; returns its stack file."""
    shutil.copytree(TEMPLATE, root / "template" / "python3-accel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    functions = {}
    for name, source in handlers.items():
        shutil.copytree(TEMPLATE / "function", root / name, ignore=shutil.ignore_patterns("__pycache__"))
        (root / name / "handler.py").write_text(source)
        functions[name] = {"lang": "python3-accel", "handler": f"./{name}", "image": f"example/{name}:latest",
                           "environment": dict(environment or {})}
    stack = root / "stack.yml"
    stack.write_text(yaml.safe_dump({"version": 1.0, "provider": {"name": "openfaas",
                                                                  "gateway": "http://127.0.0.1:8080"},
                                     "functions": functions}))
    return stack


class IndexProcess:
    """``python index.py`` of a function built from ``handler_source`` (shrinkwrapped as ``accelshim up``
    does) on a free loopback port, its environment ``environment`` over a bare one (PATH, http_port, an
    ACCEL_SHIM_URL where nothing listens); its log in a file."""

    def __init__(self, tmp: Path, handler_source: str, environment: dict[str, str]) -> None:
        stack = load_stack(new_project(tmp / "project", {"fn": handler_source}))
        context = shrinkwrap(stack.functions["fn"], tmp / "build")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "index.log"
        self._log = open(self.log_path, "wb")
        env = {"PATH": "/usr/bin:/bin", "http_port": str(self.port),
               "ACCEL_SHIM_URL": f"http://127.0.0.1:{free_port()}", **environment}
        self.proc = subprocess.Popen([sys.executable, "index.py"], cwd=context, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def wait_listening(self, timeout: float = 20.0) -> "IndexProcess":
        deadline = time.monotonic() + timeout
        while not self.listening():
            assert self.proc.poll() is None, f"index.py exited {self.proc.returncode}:\n{self.log}"
            assert time.monotonic() < deadline, f"index.py not listening in {timeout}s:\n{self.log}"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture()
def start_index(tmp_path_factory) -> Iterator:
    """``start(handler_source, **environment) -> IndexProcess`` (not waited for); all killed at the end."""
    started: list[IndexProcess] = []

    def start(handler_source: str, **environment: str) -> IndexProcess:
        started.append(IndexProcess(tmp_path_factory.mktemp("index"), handler_source, environment))
        return started[-1]

    yield start
    for process in started:
        process.stop()


class Up:
    """``python -m shim.up`` on free ports, its log in a file; ``stop()`` is SIGTERM then SIGKILL."""

    def __init__(self, stack: Path, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.build_dir = tmp / "build"
        self.log_path = tmp / "up.log"
        cmd = [sys.executable, "-m", "shim.up", "-f", str(stack), "--port", str(self.port),
               "--build-dir", str(self.build_dir), "--run-dir", str(tmp / "run"), "--startup-timeout", "60", *extra]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> "Up":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"accelshim up exited {self.proc.returncode}:\n{self.log}")
            if "Ctrl-C stops everything" in self.log:
                assert requests.get(f"{self.url}/healthz", timeout=5).text == "OK\n"
                return self
            time.sleep(0.05)
        raise TimeoutError(f"accelshim up not ready in {timeout}s:\n{self.log}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def processes_under(folder: Path) -> list[int]:
    """Pids of the live processes whose working directory is inside ``folder`` (Linux /proc)."""
    folder = folder.resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and (cwd == folder or folder in cwd.parents):
                pids.append(int(entry.name))
    return pids


def _starter(new_dir) -> Iterator:
    started: list[Up] = []

    def start(stack: Path, *extra: str) -> Up:
        up = Up(stack, new_dir(), *extra)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


@pytest.fixture()
def up_factory(tmp_path_factory) -> Iterator:
    """Start ``Up`` instances (``start(stack, *flags)``), all stopped at the end of the test."""
    yield from _starter(lambda: tmp_path_factory.mktemp("up"))


@pytest.fixture(scope="module")
def module_up_factory(tmp_path_factory) -> Iterator:
    """``up_factory`` for module-scoped fixtures."""
    yield from _starter(lambda: tmp_path_factory.mktemp("up"))


@pytest.fixture(scope="session")
def make_project():
    """``new_project(root, handlers, environment=None) -> stack path``."""
    return new_project


@pytest.fixture(scope="session")
def live_processes_under():
    """``processes_under(folder) -> pids``."""
    return processes_under
