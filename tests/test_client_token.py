"""The client's token from a mounted secret that the platform rotates, and token files it cannot read.

A real shim over TCP on loopback with ``--tokens``; the secret is swapped the way the kubelet swaps a
Secret volume (a new directory, then one rename of the ``..data`` symlink). Here the shim takes the
new token by a restart on the same port (a running shim also reads a changed tokens file again:
tests/test_tokens_reload.py): a kept-alive client meets a shim that refuses the token it read when
it was made.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import accel
from accel.transport import HTTPTransport
from shim.auth import hash_token
from tests.conftest import LiveShim, WSGITransport
from tests.kaas_util import buf, kernel

OLD, NEW = "old-token-of-alice-0123456789", "new-token-of-alice-9876543210"


class MountedSecret:
    """A Kubernetes Secret volume as the kubelet's AtomicWriter keeps it: the data in a timestamped
    directory, ``..data`` a symlink to that, ``accel-token`` a symlink to ``..data/accel-token``."""

    def __init__(self, root: Path, token: str) -> None:
        self.root, self._version = root, 0
        root.mkdir()
        self.rotate(token)
        (root / "accel-token").symlink_to("..data/accel-token")
        self.path = root / "accel-token"

    def rotate(self, token: str) -> None:
        """Write the new data in a directory of its own, swap ``..data`` at once, drop the old one."""
        self._version += 1
        new = self.root / f"..2026_01_01_00_00_{self._version:02d}.{self._version}"
        new.mkdir()
        (new / "accel-token").write_text(token)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        (self.root / "..data_tmp").symlink_to(new.name)
        os.replace(self.root / "..data_tmp", data)
        if old is not None:
            (self.root / old / "accel-token").unlink()
            (self.root / old).rmdir()


class Shim:
    """``accelshim serve --tokens`` (tenant alice) on one loopback port, restarted with another token."""

    def __init__(self, tmp: Path) -> None:
        self._tmp, self._runs, self.live = tmp, 0, None
        self.port: int | None = None

    def start(self, token: str) -> None:
        if self.live is not None:
            self.live.stop()
        self._runs += 1
        run = self._tmp / f"shim-{self._runs}"
        (run / "models").mkdir(parents=True)
        tokens = run / "tokens"
        tokens.write_text(f"alice: {hash_token(token)}\n")
        self.live = LiveShim(run / "models", run, "--classify-model", "", "--tokens", str(tokens), port=self.port)
        self.port = self.live.port
        self.live.wait_ready()

    @property
    def url(self) -> str:
        return self.live.tcp_url

    def unauthorized(self) -> float:
        """How many requests this run of the shim refused with 401 (its own count, /metrics)."""
        wire = HTTPTransport(self.url)
        text = wire.request("GET", "/metrics", None, {}, 10).body.decode()
        wire.close()
        key = 'accelshim_tenant_requests_total{status="401",tenant="_unauthenticated"} '
        return sum(float(line[len(key):]) for line in text.splitlines() if line.startswith(key))

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


class Counting:
    """The real TCP transport, noting the status of each request that went over the wire."""

    def __init__(self, url: str) -> None:
        self._inner = HTTPTransport(url)
        self.statuses: list[int] = []
        self._lock = threading.Lock()

    def request(self, method, path, body, headers, timeout):
        resp = self._inner.request(method, path, body, headers, timeout)
        with self._lock:
            self.statuses.append(resp.status)
        return resp

    def close(self) -> None:
        self._inner.close()


@pytest.fixture()
def rotation(tmp_path, monkeypatch):
    """``(secret, shim)``: the function's secret holds OLD, the shim accepts OLD."""
    monkeypatch.delenv("ACCEL_TOKEN", raising=False)
    secret = MountedSecret(tmp_path / "secret", OLD)
    monkeypatch.setenv("ACCEL_TOKEN_FILE", str(secret.path))
    shim = Shim(tmp_path)
    try:
        shim.start(OLD)
        yield secret, shim
    finally:
        shim.stop()


def _client(shim: Shim) -> tuple[accel.Client, Counting]:
    wire = Counting(shim.url)
    return accel.Client(shim.url, timeout=10, transport=wire), wire


def _noop_works(client: accel.Client, n: int = 3) -> bool:
    x = np.arange(n, dtype=np.int32)
    return np.array_equal(client.noop(x=x)["x"], x)


def test_a_rotated_secret_is_read_again_on_401_and_the_call_sent_once_more(rotation):
    secret, shim = rotation
    client, wire = _client(shim)
    assert _noop_works(client) and wire.statuses == [200]
    secret.rotate(NEW)
    assert _noop_works(client) and wire.statuses == [200, 200]  # the shim still takes OLD: not read again
    shim.start(NEW)  # now it takes NEW alone
    assert _noop_works(client) and wire.statuses == [200, 200, 401, 200]
    assert _noop_works(client) and wire.statuses == [200, 200, 401, 200, 200]  # NEW from now on
    assert shim.unauthorized() == 1


def test_a_refused_token_is_not_sent_again_when_the_file_has_not_changed(rotation):
    """The shim got the new token before the kubelet synced the function's secret: one request per
    call, no retry, an error that names the file; the call after the sync works, with no restart."""
    secret, shim = rotation
    client, wire = _client(shim)
    fixed_wire = Counting(shim.url)
    fixed_client = accel.Client(shim.url, timeout=10, token=OLD, transport=fixed_wire)
    assert _noop_works(client) and _noop_works(fixed_client)
    shim.start(NEW)
    for calls in (1, 2):
        with pytest.raises(accel.Unauthorized, match=rf"{secret.path}, as it reads now"):
            client.noop(x=np.arange(3))
        assert wire.statuses == [200] + [401] * calls
    with pytest.raises(accel.Unauthorized, match=r"the token from Client\(token=\.\.\.\)"):
        fixed_client.noop(x=np.arange(3))  # a token given to the client is never replaced
    assert fixed_wire.statuses == [200, 401]
    secret.rotate(NEW)
    assert _noop_works(client) and wire.statuses == [200, 401, 401, 401, 200]


def test_every_kind_of_call_is_sent_once_more_after_a_rotation(rotation):
    """A 401 comes before the shim does anything (waitress's parser refuses a big body before reading
    it; the guard refuses the rest before any route), so calls that are not idempotent (kaas, a region
    registration) go again too, and a body is sent again whole."""
    secret, shim = rotation
    clients = {kind: _client(shim) for kind in ("big", "put", "kaas", "register", "shm-gemm")}
    for client, _ in clients.values():
        assert _noop_works(client)
    big = np.random.default_rng(1).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB: the early 401
    fill = {"kernels": [kernel("elementwise", "fill", [(buf("filled", 16), "o")], [("Q", 4), ("f", 7.0)])]}
    secret.rotate(NEW)
    shim.start(NEW)
    with accel.SharedMemory("rot-reg", 4096) as reg, accel.SharedMemory("rot-gemm", 1 << 16) as work:
        np.testing.assert_array_equal(clients["big"][0].noop(x=big)["x"], big)
        clients["put"][0].put_buffer("put", b"\x01\x02\x03")
        assert clients["kaas"][0].kaas(fill)["outputs"] == [{"name": "filled", "key": "filled", "size": 16}]
        clients["register"][0].register_shm(reg.name, reg.key, reg.byte_size)
        a = work.array((4, 4), np.float32)
        a[:] = np.arange(16, dtype=np.float32).reshape(4, 4)
        np.testing.assert_array_equal(clients["shm-gemm"][0].gemm(a, np.eye(4, dtype=np.float32), shm=work), a)
        check = accel.Client(shim.url, timeout=10)
        assert check.get_buffer("put") == b"\x01\x02\x03"
        assert np.frombuffer(check.get_buffer("filled"), np.float32).tolist() == [7.0] * 4
        assert sorted(r["name"] for r in check.shm_status()) == ["rot-gemm", "rot-reg"]
        check.unregister_shm()
        del a
    for kind, (_, wire) in clients.items():
        assert wire.statuses == [200, 401, 200], kind


def test_threads_sharing_a_client_each_get_through_after_a_rotation(rotation):
    secret, shim = rotation
    client, wire = _client(shim)
    assert _noop_works(client)
    secret.rotate(NEW)
    shim.start(NEW)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(_noop_works(client))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 8
    assert wire.statuses.count(200) == 9 and 1 <= wire.statuses.count(401) <= 8  # one refusal per call at most


# --- token files that cannot be read -----------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """An in-process shim that takes OLD (tenant alice)."""
    from shim.config import Settings
    from shim.service import build_service

    tmp = tmp_path_factory.mktemp("token-files")
    (tmp / "models").mkdir()
    (tmp / "tokens").write_text(f"alice: {hash_token(OLD)}\n")
    svc = build_service(Settings(device="cpu", models_dir=tmp / "models", classify_model="", tokens_file=tmp / "tokens"))
    svc.load()
    return svc


def _missing(path: Path) -> None:
    """Nothing there (a secret not created, a wrong $ACCEL_TOKEN_FILE)."""


def _directory(path: Path) -> None:
    path.mkdir()


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe" + OLD.encode())


def _empty(path: Path) -> None:
    path.write_text("\n")


def _unreadable(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000")
    path.write_text(OLD)
    path.chmod(0)


@pytest.mark.parametrize("spoil,problem", [
    (_missing, "does not exist"), (_directory, "Is a directory"), (_not_utf8, "is not UTF-8 text"),
    (_empty, "is empty"), (_unreadable, "Permission denied"),
])
def test_a_token_file_that_cannot_be_read_is_logged_once_and_named_by_the_error(secured, tmp_path, monkeypatch,
                                                                                  caplog, spoil, problem):
    path = tmp_path / "accel-token"
    spoil(path)
    monkeypatch.delenv("ACCEL_TOKEN", raising=False)
    monkeypatch.setenv("ACCEL_TOKEN_FILE", str(path))
    caplog.set_level(logging.INFO, logger="accel")
    client = accel.Client("http://x", transport=WSGITransport(secured.app))  # no error yet: a shim may need none
    for _ in range(3):
        with pytest.raises(accel.Unauthorized) as refused:
            client.noop(x=np.arange(3))
        assert str(path) in refused.value.message and problem in refused.value.message
        assert "the client sends no token" in refused.value.message
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage() and problem in warnings[0].getMessage()
    if path.is_dir():
        path.rmdir()
    elif path.exists():
        path.chmod(0o600)
        path.unlink()
    path.write_text(OLD + "\n")  # the secret is mounted / fixed: the next call reads it, no restart
    assert _noop_works(client)
    assert any("holds a new one" in r.getMessage() for r in caplog.records)


def test_a_file_that_fails_after_a_good_read_keeps_its_token_in_use(rotation, caplog):
    """A read that fails (here: the secret gone) does not drop the token read before: calls the shim
    still takes keep working, a refused one says why no other token was tried."""
    secret, shim = rotation
    client, wire = _client(shim)
    caplog.set_level(logging.WARNING, logger="accel")
    assert _noop_works(client)
    shutil.rmtree(secret.root)
    assert _noop_works(client)  # no 401: the file is not read, the token read before still works
    shim.start(NEW)
    for _ in range(2):
        with pytest.raises(accel.Unauthorized, match="does not exist; the client still sends the token it read"):
            client.noop(x=np.arange(3))
    assert len(caplog.records) == 1 and "does not exist" in caplog.records[0].getMessage()
    MountedSecret(secret.root, NEW)
    assert _noop_works(client) and wire.statuses == [200, 200, 401, 401, 401, 200]


def test_no_secret_at_the_default_path_is_quiet_until_a_shim_asks_for_a_token(secured, tmp_path, monkeypatch,
                                                                               caplog):
    monkeypatch.delenv("ACCEL_TOKEN", raising=False)
    monkeypatch.delenv("ACCEL_TOKEN_FILE", raising=False)
    from accel import credentials  # where the client finds the default path

    monkeypatch.setattr(credentials, "SECRET_FILE", str(tmp_path / "accel-token"))
    caplog.set_level(logging.WARNING, logger="accel")
    client = accel.Client("http://x", transport=WSGITransport(secured.app))
    assert caplog.records == []  # a shim without --tokens needs no token: nothing to say
    for _ in range(2):
        with pytest.raises(accel.Unauthorized, match=r"this client has no token: set \$ACCEL_TOKEN"):
            client.noop(x=np.arange(3))
    assert len(caplog.records) == 1 and "does not exist" in caplog.records[0].getMessage()


def test_the_token_itself_is_never_in_an_error_or_a_log(secured, tmp_path, monkeypatch, caplog):
    path = tmp_path / "accel-token"
    path.write_text(NEW)  # not the shim's
    monkeypatch.delenv("ACCEL_TOKEN", raising=False)
    monkeypatch.setenv("ACCEL_TOKEN_FILE", str(path))
    caplog.set_level(logging.DEBUG, logger="accel")
    client = accel.Client("http://x", transport=WSGITransport(secured.app))
    with pytest.raises(accel.Unauthorized) as refused:
        client.noop(x=np.arange(3))
    assert NEW not in refused.value.message and NEW not in json.dumps([r.getMessage() for r in caplog.records])
