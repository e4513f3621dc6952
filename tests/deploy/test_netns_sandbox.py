"""A sandbox with no network and only the shim's unix socket still gets classify results.

This is the deployment's central claim: a function pod (or a microVM's socket proxy) needs no network
route, no GPU and no CUDA to use the node's GPU, only the socket file. The function side runs in a fresh
network namespace (``ip netns``: only a loopback interface, down) against a real ``accelshim serve``
started outside it; TCP to the same shim must fail from inside. Needs root and iproute2 (``.ci/run``
installs it); skips, saying why, without them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import CAT_LABELS, LiveShim, encode

SANDBOX_CODE = r"""
import json, socket, sys
import accel
url, tcp_port = sys.argv[1], int(sys.argv[2])
out = {"top": [p.label for p in accel.Client(url, timeout=30).classify(sys.stdin.buffer.read(), top_k=3)]}
try:
    socket.create_connection(("127.0.0.1", tcp_port), timeout=2).close()
    out["tcp"] = "connected"
except OSError as exc:
    out["tcp"] = f"{type(exc).__name__}: {exc}"
out["tcp_client_ready"] = accel.Client(f"http://127.0.0.1:{tcp_port}", timeout=2, retries=0).ready()
print(json.dumps(out))
"""


def _ip() -> str:
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if Path(p).exists()), None)
    if ip is None:
        pytest.skip("netns sandbox not exercised: iproute2 is not installed (apt-get install -y iproute2)")
    if os.geteuid() != 0:
        pytest.skip("netns sandbox not exercised: `ip netns add` needs root")
    return ip


@pytest.fixture()
def netns() -> Iterator[tuple[str, str]]:
    """``(ip, name)`` of a new, empty network namespace, deleted afterwards whatever happens."""
    ip = _ip()
    name = f"accelshim-test-{uuid.uuid4().hex[:8]}"
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"netns sandbox not exercised: `ip netns add` failed here: {made.stderr.strip()}")
    try:
        yield ip, name
    finally:
        subprocess.run([ip, "netns", "delete", name], capture_output=True, timeout=30)
        assert name not in subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture()
def shim(models_dir: Path, tmp_path: Path) -> Iterator[LiveShim]:
    live = LiveShim(models_dir, tmp_path)
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def test_classify_over_the_unix_socket_from_a_namespace_without_network(netns, shim: LiveShim, chelsea):
    ip, name = netns
    links = subprocess.run([ip, "netns", "exec", name, ip, "-o", "link"], capture_output=True, text=True, timeout=30)
    assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"], links.stdout
    assert "state DOWN" in links.stdout  # not even loopback

    result = subprocess.run([ip, "netns", "exec", name, sys.executable, "-c", SANDBOX_CODE, shim.unix_url,
                             str(shim.port)], input=encode(chelsea, "JPEG"), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = json.loads(result.stdout)
    assert out["top"][0] in CAT_LABELS, out
    assert out["tcp"] != "connected" and "unreachable" in out["tcp"].lower(), out
    assert out["tcp_client_ready"] is False

    # the same code outside the namespace reaches the shim over TCP: the failure above is the namespace's
    outside = subprocess.run([sys.executable, "-c", SANDBOX_CODE, shim.unix_url, str(shim.port)],
                             input=encode(chelsea, "JPEG"), capture_output=True, timeout=120)
    assert json.loads(outside.stdout)["tcp"] == "connected", outside.stderr.decode(errors="replace")
