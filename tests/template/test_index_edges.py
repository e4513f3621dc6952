"""index.py's shutdown, readiness and client timeout, and the Dockerfile's test stage, at their edges:
each test says what it expects and why."""
from __future__ import annotations

import signal
import socket
import time

from tests.template.test_dockerfile_tests import _build_context, _run_test_step

SLOW_HANDLER = '''import time

def handle(event, context):
    time.sleep(float(event.query.get("sleep", 0)))
    return {"body": {"got": len(event.body)}}
'''

HANDLER_WITH_ITS_OWN_SIGTERM = '''import logging
import signal

# what a library may do at import: note the signal (a metrics flush, a log line) and carry on
signal.signal(signal.SIGTERM, lambda signum, frame: logging.getLogger("lib").warning("SIGTERM seen"))


def handle(event, context):
    return {"body": "hello"}
'''

SLOW_IMPORT_HANDLER = '''import os
import pathlib
import time

pathlib.Path(os.environ["IMPORTING"]).write_text("importing")  # the test waits for this
time.sleep(2.0)  # a slow import (a model, a big dependency): index.py has no signal handler yet


def handle(event, context):
    return {"body": "hello"}
'''


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        pass
    return b"".join(chunks)


def test_a_request_whose_body_is_still_arriving_when_the_grace_ends_is_answered(start_index):
    """of-watchdog streams the caller's body upstream as it arrives. A request that the watchdog accepted
    before its healthcheck_interval ended, whose body is still coming in when index.py closes its
    listener, is in flight: its headers and half its body are already on a connection that index.py
    accepted. ``_in_flight`` counts only ``ch.requests`` (complete requests) and outbound bytes, not
    ``ch.request`` (the one being received), so the drain sees nothing, closes the connection and exits
    at once, although the request would finish in a few ms, far inside write_timeout + 1 s."""
    fn = start_index(SLOW_HANDLER, mode="http", write_timeout="5s", healthcheck_interval="500ms").wait_listening()
    body = b"x" * 2000
    head = (f"POST /?sleep=0 HTTP/1.1\r\nHost: fn\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", fn.port), timeout=5)
    try:
        sock.sendall(head + body[:1000])
        time.sleep(0.3)  # accepted and half read by waitress
        fn.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # past the grace (0.5 s + 0.5 s): the listener is closed, the limit (6 s) is far
        try:
            sock.sendall(body[1000:])
        except OSError:
            pass
        answer = _read_all(sock, 5)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), f"{answer[:200]!r}\n{fn.log}"
    assert fn.proc.wait(10) == 0


def test_sigterm_while_the_handler_is_imported_still_exits_0(start_index, tmp_path):
    """of-watchdog forwards SIGTERM to index.py at once and ``log.Fatalf``s (exit 1, the whole container)
    when its child exits with an error; index.py's docs and its drain rely on exiting 0. A SIGTERM that
    arrives while ``from function import handler`` runs (before ``serve`` installs its handlers: a cold
    start that is scaled down, a rollout) takes Python's default action instead: killed by the signal."""
    importing = tmp_path / "importing"
    fn = start_index(SLOW_IMPORT_HANDLER, mode="http", write_timeout="2s", healthcheck_interval="500ms",
                     IMPORTING=str(importing))
    deadline = time.monotonic() + 20
    while not importing.exists():  # python runs and imports the handler; waitress does not listen yet
        assert fn.proc.poll() is None and time.monotonic() < deadline, fn.log
        time.sleep(0.02)
    assert fn.proc.poll() is None and not fn.listening(), fn.log
    fn.proc.send_signal(signal.SIGTERM)
    code = fn.proc.wait(10)
    assert code == 0, f"exit {code}:\n{fn.log}"


def test_client_timeout_behind_the_watchdog_without_exec_timeout_is_under_its_10s_default(index):
    """Behind of-watchdog (``mode=http``) an unset or unparseable exec_timeout is 10 s (config.go:
    ``getDuration(envMap, "exec_timeout", time.Second*10)``), which ShutdownPlan already models with
    WATCHDOG_TIMEOUT. client_timeout instead keeps the client's 30 s default, so with the image's own
    settings (the Dockerfile sets mode=http and no exec_timeout) a slow shim still gets the watchdog's
    bare 504 at 10 s, before the client's JSON error: the very case the change meant to fix."""
    assert index.client_timeout({"mode": "http"}) == 9.0
    assert index.client_timeout({"mode": "http", "exec_timeout": "thirty"}) == 9.0
    assert index.client_timeout({}) is None  # no watchdog (accelshim up): the client's default, as before


def test_a_test_command_that_changes_directory_still_passes_the_build(tmp_path):
    """python3-http runs TEST_COMMAND in /home/app/function (its default is ``tox``, run there); here it
    runs in /home/app, so a user who keeps that habit writes ``cd function && ...``. ``eval`` runs it in
    the step's own shell, the ``cd`` sticks, ``function-tests.txt`` lands in function/, and the ship
    stage's ``COPY --from=test /home/app/function-tests.txt`` fails the build although the tests passed."""
    app, env, _ = _build_context(tmp_path)
    result = _run_test_step(app, env, TEST_COMMAND="cd function && python -m pytest -q -p no:cacheprovider .")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (app / "function-tests.txt").is_file(), "the file that the ship stage copies is not where it looks"


def test_sigterm_still_drains_and_exits_0_when_the_handler_sets_its_own_handler_at_import(start_index):
    """index.py installs its handlers before the handler's import (a SIGTERM then must not kill it)
    and again after it: a handler module, or a library it imports, may set its own."""
    fn = start_index(HANDLER_WITH_ITS_OWN_SIGTERM, mode="http", write_timeout="2s",
                     healthcheck_interval="500ms").wait_listening()
    fn.proc.send_signal(signal.SIGTERM)
    code = fn.proc.wait(10)  # the plan's limit is write_timeout + 1 s
    assert code == 0, f"exit {code}:\n{fn.log}"
