"""vsock: ``vsock://CID:PORT`` parsing, and the shim's AF_VSOCK listener (``accelshim serve --vsock``).

What runs where: the URL parsing and the settings run everywhere. Binding and listening on AF_VSOCK run
for real wherever the kernel has AF_VSOCK (a VM with a virtio-vsock device, or a host with vhost-vsock
or vsock loopback); elsewhere those tests skip and say so. A request over vsock needs a peer: on one
machine that is the loopback transport (CID 1, CONFIG_VSOCKETS_LOOPBACK); where the kernel lacks it,
the round-trip test skips with that reason, and the bind/listen tests still run.
"""
from __future__ import annotations

import errno
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accel import Client
from accel.errors import InvalidInput
from accel.transport import HTTPTransport, parse_url
from shim.config import Settings
from shim.server.binding import bind_sockets, bind_vsock
from shim.server.serving import Server
from tests.conftest import CAT_LABELS, encode

VMADDR_CID_LOCAL = 1


def _vsock_unavailable() -> str | None:
    """Why AF_VSOCK cannot be used here, or None when a socket can be made."""
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no socket.AF_VSOCK"
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        return f"the kernel refuses AF_VSOCK sockets ({exc.strerror}): no vsock transport loaded"
    return None


NO_VSOCK = _vsock_unavailable()
needs_vsock = pytest.mark.skipif(NO_VSOCK is not None, reason=f"vsock bind/listen not exercised: {NO_VSOCK}")


def _free_vsock_port() -> int:
    """A vsock port nobody here listens on (ports are per machine; try a few)."""
    for port in range(20_000 + (hash(time.time()) % 20_000), 60_000):
        try:
            bind_vsock(port).close()
            return port
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError("no free vsock port")


# --- the client's URL --------------------------------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    ("vsock://2:5000", ("vsock", "2", 5000)),
    ("vsock://3:1024/", ("vsock", "3", 1024)),
    ("vsock://0:1", ("vsock", "0", 1)),
    ("vsock://4294967294:4294967294", ("vsock", "4294967294", 4294967294)),
])
def test_vsock_url_parses(url: str, expected: tuple[str, str, int]):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url, says", [
    ("vsock://2", "vsock://CID:PORT"),
    ("vsock://:5000", "vsock://CID:PORT"),
    ("vsock://host:5000", "decimal"),
    ("vsock://2:http", "decimal"),
    ("vsock://-1:5000", "decimal"),
    ("vsock://2:0", "port 1 to"),
    ("vsock://2:4294967295", "port 1 to"),      # VMADDR_PORT_ANY is not a peer
    ("vsock://4294967295:5000", "32-bit"),      # VMADDR_CID_ANY is not a peer
    ("vsock://2:5000:1", "vsock://CID:PORT"),
    ("vsocket://2:5000", "vsock://CID:PORT"),   # unknown scheme: the usage names vsock too
])
def test_bad_vsock_url_is_invalid_input(url: str, says: str):
    with pytest.raises(InvalidInput, match=re.escape(says)):
        parse_url(url)
    with pytest.raises(InvalidInput):
        Client(url)


def test_vsock_client_is_made_without_connecting():
    """Making a client connects nothing (CID 2 is this machine's host: tests never dial it)."""
    if not hasattr(socket, "AF_VSOCK"):
        with pytest.raises(InvalidInput, match="AF_VSOCK"):
            HTTPTransport("vsock://2:5000")
        return
    client = Client("vsock://2:5000")
    assert client.url == "vsock://2:5000"


# --- the shim's settings and listener ----------------------------------------------------------
def test_vsock_port_setting_from_flag_env_and_range():
    assert Settings.from_env({}).vsock_port is None
    assert Settings.from_env({"ACCELSHIM_VSOCK_PORT": "5000"}).vsock_port == 5000
    assert Settings.from_env({"ACCELSHIM_VSOCK_PORT": "5000"}, vsock_port=6000).vsock_port == 6000
    for bad in ("0", "4294967295"):
        with pytest.raises(ValueError, match="vsock port"):
            Settings.from_env({"ACCELSHIM_VSOCK_PORT": bad})
    with pytest.raises(ValueError, match="ACCELSHIM_VSOCK_PORT"):
        Settings.from_env({"ACCELSHIM_VSOCK_PORT": "five"})


@needs_vsock
def test_bind_sockets_binds_vsock_on_any_cid(service):
    port = _free_vsock_port()
    sockets = bind_sockets(None, 0, None, vsock_port=port)
    try:
        [sock] = sockets
        assert sock.family == socket.AF_VSOCK and sock.type == socket.SOCK_STREAM
        assert sock.getsockname() == (socket.VMADDR_CID_ANY, port)
        # a second shim on the same port gets a clear error, not a traceback
        with pytest.raises(OSError, match=f"--vsock {port}: cannot bind") as info:
            bind_vsock(port)
        assert info.value.errno == errno.EADDRINUSE
        # the server puts it into listen() with waitress on the shared event loop
        server = Server(service, sockets)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert server.addresses() == [f"vsock://any:{port}"]
        for s in server._servers:
            s.close()
    finally:
        for s in sockets:
            s.close()


@needs_vsock
def test_serve_with_vsock_alone_starts_and_reports_the_address(models_dir: Path, tmp_path: Path):
    """``accelshim serve --host none --vsock PORT --unix PATH`` comes up ready (checked over the unix
    socket) with the vsock listener in its address list."""
    port, sock = _free_vsock_port(), tmp_path / "s.sock"
    log = tmp_path / "shim.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--host", "none", "--vsock", str(port),
                                 "--unix", str(sock), "--device", "cpu", "--models", str(models_dir)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        client = Client(f"unix://{sock}", timeout=2.0)
        deadline = time.monotonic() + 60
        while not (sock.exists() and client.ready()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert f"vsock://any:{port}" in log.read_text()
        with pytest.raises(OSError, match="cannot bind"):  # it holds the port
            bind_vsock(port)
    finally:
        proc.terminate()
        proc.wait(15)


def test_serve_rejects_a_bad_vsock_port(models_dir: Path):
    result = subprocess.run([sys.executable, "-m", "shim", "serve", "--host", "none", "--vsock", "0",
                             "--device", "cpu", "--models", str(models_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "vsock port 0 out of range" in result.stderr


def _loopback_unavailable() -> str | None:
    """Why a vsock connection to CID 1 (loopback) cannot be made here, or None."""
    port = _free_vsock_port()
    listener = bind_vsock(port)
    listener.listen(1)
    probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect((VMADDR_CID_LOCAL, port))
        return None
    except OSError as exc:
        return (f"connecting to CID 1 fails ({exc.strerror or exc}): the kernel has no vsock loopback "
                "transport (CONFIG_VSOCKETS_LOOPBACK)")
    finally:
        probe.close()
        listener.close()


@needs_vsock
def test_classify_over_vsock_loopback(models_dir: Path, tmp_path: Path, chelsea):
    """A real request over AF_VSOCK, where this kernel has a loopback transport (CID 1)."""
    why = _loopback_unavailable()
    if why:
        pytest.skip(f"vsock request round-trip not exercised: {why}; bind and listen were exercised")
    port = _free_vsock_port()
    with open(tmp_path / "shim.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--host", "none", "--vsock", str(port),
                                 "--device", "cpu", "--models", str(models_dir)], stdout=out, stderr=subprocess.STDOUT)
    try:
        client = Client(f"vsock://{VMADDR_CID_LOCAL}:{port}", timeout=2.0)
        deadline = time.monotonic() + 60
        while not client.ready():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "shim.log").read_text()
            time.sleep(0.05)
        top = Client(f"vsock://{VMADDR_CID_LOCAL}:{port}", timeout=30).classify(encode(chelsea, "JPEG"), top_k=3)
        assert top[0].label in CAT_LABELS
    finally:
        proc.terminate()
        proc.wait(15)
