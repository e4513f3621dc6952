"""A running shim reads its tokens file again when it changes (a Kubernetes Secret updated in place),
in the device process and in every request worker, and keeps its tokens when the new file is bad."""
from __future__ import annotations

import gc
import logging
import threading
import time

import pytest

import accel
from accel.transport import HTTPTransport
from shim import auth
from shim.auth import TokenStore, hash_token
from tests.conftest import LiveShim
from tests.test_client_token import MountedSecret

OLD, NEW, BOB = "old-token-of-alice-0123456789", "new-token-of-alice-9876543210", "token-of-bob-0123456789ab"


def _until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _refused(store: TokenStore, token: str) -> bool:
    try:
        store.authenticate(f"Bearer {token}")
    except accel.Unauthorized:
        return True
    return False


def test_a_store_takes_a_changed_file_at_once_and_keeps_its_tokens_when_the_file_is_bad(tmp_path, caplog):
    secret = MountedSecret(tmp_path / "secret", f"alice: {hash_token(OLD)}\n")
    store = TokenStore.load(secret.path)
    store.reload_when_changed(secret.path, interval_s=0.05)
    secret.rotate(f"alice: {hash_token(OLD)} {hash_token(NEW)}\nbob: {hash_token(BOB)} max_queue=3\n")
    assert _until(lambda: not _refused(store, NEW), 5), "the rotated file was not read again"
    assert store.authenticate(f"Bearer {OLD}").name == "alice" and store.tenant("bob").limits.max_queue == 3
    secret.rotate(f"alice: {hash_token(NEW)}\n")  # the old token retired, bob gone
    assert _until(lambda: _refused(store, OLD), 5)
    assert _refused(store, BOB) and store.names() == ["alice"]
    with caplog.at_level(logging.ERROR, logger="shim.auth"):
        secret.rotate("alice: short\n")
        assert _until(lambda: "cannot be used" in caplog.text, 5)
    assert store.authenticate(f"Bearer {NEW}").name == "alice"  # the tokens read before stay
    assert caplog.text.count("cannot be used") == 1  # once per version of the file


def test_the_reload_thread_ends_with_its_store(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"alice: {hash_token(OLD)}\n")
    before = set(threading.enumerate())
    store = TokenStore.load(path)
    store.reload_when_changed(path, interval_s=0.02)
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "tokens-reload"]
    del store
    gc.collect()
    assert _until(lambda: not thread.is_alive(), 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_running_shim_and_its_workers_take_the_rotated_tokens_without_a_restart(tmp_path, workers):
    secret = MountedSecret(tmp_path / "secret", f"alice: {hash_token(OLD)}\n")
    (tmp_path / "models").mkdir()
    extra = ["--workers", str(workers)] if workers else []
    shim = LiveShim(tmp_path / "models", tmp_path, "--classify-model", "", "--tokens", str(secret.path), *extra)
    try:
        shim.wait_ready()

        def answers(token: str) -> set[int]:
            """Statuses of noop with ``token`` over several new connections (spread over the workers)."""
            statuses = set()
            for _ in range(6):
                wire = HTTPTransport(shim.tcp_url)
                try:
                    statuses.add(wire.request("POST", "/v2/models/noop/infer", b'{"inputs": []}',
                                              {"Authorization": f"Bearer {token}",
                                               "Content-Type": "application/json"}, 10).status)
                finally:
                    wire.close()
            return statuses

        assert answers(OLD) == {200} and answers(NEW) == {401}
        secret.rotate(f"alice: {hash_token(NEW)}\n")
        limit = auth.RELOAD_INTERVAL_S * 3
        assert _until(lambda: answers(NEW) == {200} and answers(OLD) == {401}, limit), shim.log.read_text()[-2000:]
        assert "read again: 1 tenant(s)" in shim.log.read_text()
    finally:
        shim.stop()

