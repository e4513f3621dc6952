"""A function pod on a node without a shim: what its caller gets.

OpenFaaS CE cannot keep a function on GPU nodes (docs/deploy.md, "OpenFaaS CE: placement"). A pod
scheduled elsewhere still starts, and calls the node-local Service (internalTrafficPolicy: Local),
which has no endpoint on that node: kube-proxy drops the connection (KEP-2086: "only route to
node-local endpoints, drop otherwise"), so no SYN is ever answered. The docs promise that the
function then answers a JSON 503 naming the shim's URL, once the accel client's timeout is spent,
and so before the watchdog's exec_timeout.

Here the function side runs in a network namespace whose route to the shim's address leads into a
second namespace that owns no such address and drops the packets, silently, as kube-proxy does.
The template's real app (index.create_app) and client (accel.Client) run there. Needs root and
iproute2 (``.ci/run`` installs it); skips, saying why, without them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Iterator

import pytest

from tests.conftest import ROOT
from tests.deploy.test_netns_sandbox import _ip
from tests.deploy.test_watchdog_timeouts import FUNCTIONS, watchdog_seconds

SHIM_URL = "http://10.213.0.2:8000"  # stands for accelshim.accelshim.svc...:8000 seen from a node without a shim
CLIENT_TIMEOUT_S = 2.0  # the accel client's timeout, shortened from its 30 s to keep the test quick

FUNCTION_CODE = r"""
import json, sys, time, types
sys.path.insert(0, sys.argv[1])
import accel, index
url, timeout = sys.argv[2], float(sys.argv[3])
handler = types.SimpleNamespace(handle=lambda event, context: context.accel.classify(event.body))
app = index.create_app(handler, accel.Client(url, timeout=timeout, token="tenant-token"))
start = time.monotonic()
response = app.test_client().post("/", data=b"\xff\xd8\xff\xe0 a JPEG, or so")
print(json.dumps({"status": response.status_code, "body": response.get_json(),
                  "seconds": time.monotonic() - start}))
"""


@pytest.fixture()
def node_without_shim() -> Iterator[tuple[str, str]]:
    """``(ip, namespace)``: a namespace whose packets to the shim's address are dropped unanswered."""
    ip = _ip()
    fn_ns, void_ns = (f"accelshim-test-{uuid.uuid4().hex[:8]}" for _ in range(2))
    made: list[str] = []
    try:
        for name in (fn_ns, void_ns):
            step = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True, timeout=30)
            if step.returncode != 0:
                pytest.skip(f"misplaced-function test not exercised: `ip netns add` failed: {step.stderr.strip()}")
            made.append(name)
        for args in (["-n", fn_ns, "link", "add", "fn0", "type", "veth", "peer", "name", "void0", "netns", void_ns],
                     ["-n", fn_ns, "addr", "add", "10.213.0.1/24", "dev", "fn0"],
                     ["-n", fn_ns, "link", "set", "fn0", "up"],
                     ["-n", void_ns, "link", "set", "void0", "up"],
                     # a fixed neighbour: no ARP to fail fast; the frames reach void_ns, which drops them
                     ["-n", fn_ns, "neigh", "add", "10.213.0.2", "lladdr", "02:00:00:00:02:13", "dev", "fn0",
                      "nud", "permanent"]):
            step = subprocess.run([ip, *args], capture_output=True, text=True, timeout=30)
            if step.returncode != 0:
                pytest.skip(f"misplaced-function test not exercised: `ip {' '.join(args)}` failed: "
                            f"{step.stderr.strip()}")
        yield ip, fn_ns
    finally:
        for name in made:
            subprocess.run([ip, "netns", "delete", name], capture_output=True, timeout=30)
        listed = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
        assert not any(name in listed for name in made)


def test_a_function_without_a_shim_answers_a_json_503_before_the_watchdog_cuts_it(node_without_shim):
    ip, name = node_without_shim
    result = subprocess.run([ip, "netns", "exec", name, sys.executable, "-c", FUNCTION_CODE,
                             str(ROOT / "template" / "python3-accel"), SHIM_URL, str(CLIENT_TIMEOUT_S)],
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = json.loads(result.stdout)
    assert out["status"] == 503, out
    assert out["body"]["error"] == f"cannot reach the shim at {SHIM_URL}: timed out", out
    assert out["body"]["call_id"], out
    # dropped, not refused: the client waited out its whole timeout, and no longer
    assert CLIENT_TIMEOUT_S * 0.9 <= out["seconds"] < CLIENT_TIMEOUT_S + 2.0, out
    # scaled to the deployed values, the client's 30 s still end before every function's exec_timeout
    assert all((watchdog_seconds(fn.environment.get("exec_timeout")) or 0) > 30.0 for fn in FUNCTIONS)
