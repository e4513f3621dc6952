"""Tenants and tokens: 401 without a valid token, health probes open, the token file's forms, the
accel client's token sources, and the refusal to listen off loopback without tokens."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import accel
from accel.client import read_token
from shim.auth import TokenFileError, TokenStore, hash_token
from tests.conftest import ROOT, WSGITransport

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210xx"


def tokens_file(tmp: Path) -> Path:
    path = tmp / "tokens"
    path.write_text(f"# tenants\nalice: {hash_token(ALICE)}\nbob: {BOB}  max_inflight=1  # plain token\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """An in-process shim (noop and gemm) that needs tokens."""
    from shim.config import Settings
    from shim.service import build_service

    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "models").mkdir()
    svc = build_service(Settings(device="cpu", models_dir=tmp / "models", classify_model="",
                                 tokens_file=tokens_file(tmp)))
    svc.load()
    return svc


NOOP = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}


@pytest.mark.parametrize("authorization,names", [
    (None, "send Authorization: Bearer"),
    ("Bearer not-a-token-of-anyone", "not valid"),
    (f"Basic {ALICE}", "must be 'Bearer <token>'"),
    ("Bearer ", "must be 'Bearer <token>'"),
    (f"Bearer {hash_token(ALICE)}", "not valid"),  # the digest is not the token
])
def test_401_without_a_valid_token(secured, authorization, names):
    http = secured.app.test_client()
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in [("POST", "/v2/models/noop/infer"), ("GET", "/v2/models/gemm"), ("GET", "/v2"),
                         ("GET", "/v2/no/such/endpoint")]:
        reply = http.open(path, method=method, json=NOOP if method == "POST" else None, headers=headers)
        assert reply.status_code == 401, (path, reply.data)
        assert names in reply.get_json()["error"]
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_valid_tokens_pass_and_each_names_its_tenant(secured):
    http = secured.app.test_client()
    for token in (ALICE, BOB):
        reply = http.post("/v2/models/noop/infer", json=NOOP, headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 200 and reply.get_json()["outputs"][0]["data"] == [1, 2]
    assert http.post("/v2/models/noop/infer", json=NOOP, headers={"Authorization": f"bearer  {ALICE} "}).status_code == 200
    metrics = http.get("/metrics").get_data(as_text=True)
    assert 'accelshim_tenant_requests_total{status="200",tenant="alice"}' in metrics
    assert 'accelshim_tenant_requests_total{status="200",tenant="bob"}' in metrics
    assert 'accelshim_tenant_rejected_total{reason="unauthorized",tenant="_unauthenticated"}' in metrics


def test_probes_metrics_and_openapi_stay_open(secured):
    http = secured.app.test_client()
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"):
        assert http.get(path).status_code == 200, path


def test_client_sends_its_token(secured, monkeypatch, tmp_path):
    transport = WSGITransport(secured.app)
    with pytest.raises(accel.Unauthorized):
        accel.Client("http://x", transport=transport, token="").noop(x=np.arange(3))
    np.testing.assert_array_equal(accel.Client("http://x", transport=transport, token=ALICE).noop(x=np.arange(3))["x"],
                                  np.arange(3))
    monkeypatch.setenv("ACCEL_TOKEN", BOB)  # the environment ...
    assert accel.Client("http://x", transport=transport).gemm(np.eye(2), np.eye(2)).shape == (2, 2)
    monkeypatch.delenv("ACCEL_TOKEN")
    secret = tmp_path / "accel-token"  # ... or the OpenFaaS secret file
    secret.write_text(ALICE + "\n")
    monkeypatch.setenv("ACCEL_TOKEN_FILE", str(secret))
    assert accel.Client("http://x", transport=transport).gemm(np.eye(2), np.eye(2)).shape == (2, 2)


def test_read_token_order(tmp_path):
    secret = tmp_path / "accel-token"
    secret.write_text(" from-file \n")
    assert read_token({"ACCEL_TOKEN": "from-env", "ACCEL_TOKEN_FILE": str(secret)}) == "from-env"
    assert read_token({"ACCEL_TOKEN_FILE": str(secret)}) == "from-file"
    assert read_token({"ACCEL_TOKEN_FILE": str(tmp_path / "absent")}) is None
    assert read_token({"ACCEL_TOKEN": "two\nlines"}) is None  # no header could carry it: not sent either


def test_template_index_client_passes_the_token(secured, monkeypatch):
    """The template's handler context: ``context.accel`` carries the function's token."""
    sys.path.insert(0, str(ROOT / "template" / "python3-accel"))
    try:
        import index
    finally:
        sys.path.pop(0)

    class Handler:
        @staticmethod
        def handle(event, context):
            return {"statusCode": 200, "body": {"c": context.accel.gemm(np.eye(2), np.eye(2)).tolist()}}

    monkeypatch.setenv("ACCEL_TOKEN", ALICE)
    client = accel.Client("http://x", transport=WSGITransport(secured.app))  # as index.main() makes it
    reply = index.create_app(Handler, client).test_client().post("/")
    assert reply.status_code == 200 and reply.get_json()["c"] == [[1, 0], [0, 1]]
    monkeypatch.delenv("ACCEL_TOKEN")
    monkeypatch.setenv("ACCEL_TOKEN_FILE", "/nonexistent/accel-token")
    client = accel.Client("http://x", transport=WSGITransport(secured.app))
    refused = index.create_app(Handler, client).test_client().post("/")  # the function's token, not the caller's
    assert refused.status_code == 502 and "/nonexistent/accel-token" in refused.get_json()["error"]


@pytest.mark.parametrize("text,names", [
    ("alice-without-a-colon", "expected 'tenant: token'"),
    ("alice:", "expected 'tenant: token'"),
    ("../etc: 0123456789abcdef0123", "tenant name '../etc'"),
    ("alice: short", "shorter than 16"),
    ("alice: sha256:abcd", "64 hex digits"),
    (f"alice: {ALICE}\nalice: {BOB}", "appears twice"),
    (f"alice: {ALICE}\nbob: {hash_token(ALICE)}", "the same token"),
    (f"alice: {ALICE} max_inflight=0", "positive integer"),
    (f"alice: {ALICE} color=red", "unknown option"),
    ("# nobody\n", "no tenant"),
    (f"alice: {ALICE} {hash_token(ALICE)}", "the same token twice"),
    (f"alice: {ALICE} {BOB}\nbob: {BOB}", "tenants 'alice' and 'bob' have the same token"),
    ("alice: max_inflight=2", "no token before its options"),
    (f"alice: {ALICE} short", "shorter than 16"),
])
def test_bad_token_files_are_refused(text, names):
    with pytest.raises(TokenFileError, match=re.escape(names)):
        TokenStore.parse(text)


def test_token_store_keeps_digests_only():
    store = TokenStore.parse(f"alice: {ALICE}\nbob: {hash_token(BOB)} max_queue=3")
    assert ALICE not in repr(vars(store)) and store.names() == ["alice", "bob"]
    assert store.authenticate(f"Bearer {BOB}").name == "bob"
    assert store.tenant("bob").limits.max_queue == 3


def test_a_tenant_may_have_several_tokens_each_valid_while_one_is_rotated():
    new = "alice-new-token-0123456789"
    store = TokenStore.parse(f"alice: {hash_token(ALICE)} {new} max_inflight=2\nbob: {BOB}")
    assert store.names() == ["alice", "bob"]
    assert store.authenticate(f"Bearer {ALICE}").name == store.authenticate(f"Bearer {new}").name == "alice"
    assert store.authenticate(f"Bearer {ALICE}").limits.max_inflight == 2
    assert store.authenticate(f"Bearer {BOB}").name == "bob"
    with pytest.raises(accel.Unauthorized):
        store.authenticate("Bearer someone-elses-token-0123")


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shim", "serve", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_refuses_a_non_loopback_address_without_tokens():
    result = _serve("--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2 and "--tokens" in result.stderr
    result = _serve("--host", "::", "--port", "0")
    assert result.returncode == 2 and "--tokens" in result.stderr


def test_refuses_a_bad_tokens_file_before_starting(tmp_path):
    bad = tmp_path / "tokens"
    bad.write_text("alice: short\n")
    result = _serve("--host", "0.0.0.0", "--port", "0", "--tokens", str(bad))
    assert result.returncode == 1 and "shorter than 16" in result.stderr


def test_unix_socket_is_0660(live_shim):
    mode = stat.S_IMODE(os.stat(live_shim.sock).st_mode)
    assert mode == 0o660, oct(mode)


def test_a_hash_sign_inside_a_plain_token_is_part_of_it():
    from shim.auth import TokenStore

    store = TokenStore.parse("alice: abc#defghijklmnop0123  # a comment\n# a whole-line comment\n")
    assert store.authenticate("Bearer abc#defghijklmnop0123").name == "alice"


def _one_reply(sock) -> bytes:
    """One HTTP reply as it arrives, however many reads its head and body take."""
    data = b""
    while True:
        head, found, body = data.partition(b"\r\n\r\n")
        if found and len(body) >= _content_length(head):
            return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_big_body_without_a_valid_token_is_refused_before_it_is_read(tmp_path):
    """On a shim with tokens, waitress answers 401 once the headers are in: an unauthenticated
    client cannot make the shim buffer a body of up to --max-body-bytes."""
    import socket
    import time

    from tests.conftest import LiveShim

    (tmp_path / "models").mkdir()
    live = LiveShim(tmp_path / "models", tmp_path, "--classify-model", "", "--tokens", str(tokens_file(tmp_path)))
    try:
        live.wait_ready()
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            size = 200 << 20  # announced, never sent: the answer must not wait for it
            sock.sendall(f"POST /v2/models/noop/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                         "Authorization: Bearer not-a-token-of-anyone\r\n\r\n".encode() + b"\0" * 65536)
            start = time.monotonic()
            reply = _one_reply(sock).decode("latin-1")
            assert time.monotonic() - start < 5
        assert reply.startswith("HTTP/1.1 401") and "application/json" in reply and "token" in reply
        small = accel.Client(live.tcp_url, token=ALICE, timeout=10)
        assert small.noop(x=np.arange(3))["x"].tolist() == [0, 1, 2]  # with a token, all is well
    finally:
        live.stop()
