"""SIGTERM behind of-watchdog: index.py keeps serving for the watchdog's ``healthcheck_interval`` (the
watchdog goes on accepting requests and forwarding them that long), then drains, and exits by
``write_timeout`` + 1 s whatever is left. Real ``python index.py`` processes on loopback ports."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import requests

SLOW_HANDLER = '''import time

def handle(event, context):
    time.sleep(float(event.query.get("sleep", 0)))
    return {"body": {"slept": event.query.get("sleep")}}
'''


def _fresh_get(url: str, **params: str) -> requests.Response:
    """A GET on a new connection (the watchdog's requests after SIGTERM come on new ones too)."""
    return requests.get(url, params=params, headers={"Connection": "close"}, timeout=3)


def _in_background(url: str, sleep: float) -> tuple[threading.Thread, list]:
    """A request that sleeps ``sleep`` s in the handler; its response (or error) lands in the list."""
    answers: list = []

    def call() -> None:
        try:
            answers.append(requests.get(url, params={"sleep": str(sleep)}, timeout=sleep + 10))
        except requests.RequestException as exc:
            answers.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, answers


def test_sigterm_behind_the_watchdog_serves_new_requests_for_healthcheck_interval_then_drains(start_index):
    # the watchdog accepts for healthcheck_interval (2 s) after SIGTERM; index.py for 2.5 s, exits by 6 s
    fn = start_index(SLOW_HANDLER, mode="http", write_timeout="5s", healthcheck_interval="2s").wait_listening()
    slow, answers = _in_background(fn.url, 4.0)
    time.sleep(0.3)
    fn.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    served = []
    while time.monotonic() < signalled + 1.8:  # requests routed to the terminating pod are answered
        time.sleep(0.3)
        served.append(_fresh_get(fn.url + "/", sleep="0").status_code)
    assert served and set(served) == {200}, served
    while time.monotonic() < signalled + 3.0:
        time.sleep(0.05)
    assert slow.is_alive()  # 4 s of sleep: still in flight once the listener is closed
    with pytest.raises(requests.ConnectionError):
        _fresh_get(fn.url + "/")
    slow.join(10)
    assert answers[0].status_code == 200 and answers[0].json() == {"slept": "4.0"}
    assert fn.proc.wait(10) == 0
    assert time.monotonic() - signalled < 6.0  # write_timeout + 1 s
    log = fn.log
    assert "SIGTERM: still serving new requests for 2.5s" in log and "exiting within 6.0s" in log
    assert log.index("SIGTERM: still serving") < log.index("SIGTERM: draining") < log.index("drained in")


def test_sigterm_exits_by_write_timeout_plus_one_second_with_a_request_stuck(start_index):
    fn = start_index(SLOW_HANDLER, mode="http", write_timeout="1", healthcheck_interval="500ms").wait_listening()
    stuck, answers = _in_background(fn.url, 30.0)
    time.sleep(0.3)
    fn.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert fn.proc.wait(5) == 0  # exits 0: of-watchdog would end the whole pod at once on an error exit
    assert 1.8 < time.monotonic() - signalled < 3.5  # the limit is 2 s
    stuck.join(10)
    assert isinstance(answers[0], requests.ConnectionError)
    assert "1 request(s) still in flight 2.0s after SIGTERM; exiting without them" in fn.log


def test_a_second_signal_ends_the_grace_period_early(start_index):
    fn = start_index(SLOW_HANDLER, mode="http", write_timeout="30s").wait_listening()
    fn.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert _fresh_get(fn.url + "/").status_code == 200  # in its 30.5 s of grace
    fn.proc.send_signal(signal.SIGTERM)
    assert fn.proc.wait(5) == 0
    assert "SIGTERM again: the grace period ends early" in fn.log


def test_sigint_and_runs_without_the_watchdog_stop_accepting_at_once(start_index):
    """Ctrl-C, and ``accelshim up`` (which passes the stack's write_timeout but runs no watchdog)."""
    for environment, signum in (({"mode": "http", "write_timeout": "30s"}, signal.SIGINT),
                                ({"write_timeout": "30s", "healthcheck_interval": "30s"}, signal.SIGTERM)):
        fn = start_index(SLOW_HANDLER, **environment).wait_listening()
        fn.proc.send_signal(signum)
        assert fn.proc.wait(5) == 0
        assert f"{signal.Signals(signum).name}: draining" in fn.log and "still serving" not in fn.log


@pytest.mark.parametrize("environment, grace, limit", [
    ({}, 0.0, 30.0),                                                      # no watchdog in front
    ({"write_timeout": "30s", "healthcheck_interval": "5s"}, 0.0, 30.0),  # accelshim up: no watchdog either
    ({"mode": "http"}, 10.5, 11.0),                                       # the watchdog's defaults: 10 s
    ({"mode": "http", "write_timeout": "30s"}, 30.5, 31.0),               # healthcheck_interval = write_timeout
    ({"mode": "http", "write_timeout": "1m", "healthcheck_interval": "5"}, 5.5, 61.0),
    ({"mode": "http", "write_timeout": "20", "healthcheck_interval": "soon"}, 20.5, 21.0),  # as the watchdog
    ({"mode": "http", "write_timeout": "1.5"}, 10.5, 11.0),               # not a Go duration: its default
    ({"mode": "http", "write_timeout": "2s", "healthcheck_interval": "1m"}, 3.0, 3.0),  # never past the limit
    ({"mode": "http", "healthcheck_interval": "0"}, 0.0, 11.0),
])
def test_shutdown_plan_reads_the_watchdogs_settings_as_it_does(index, environment, grace, limit):
    assert index.ShutdownPlan.from_env(environment) == (grace, limit)


@pytest.mark.parametrize("value, seconds", [
    ("30", 30.0), ("+5", 5.0), ("0", 0.0), ("30s", 30.0), ("1m", 60.0), ("1m30s", 90.0), ("1.5h", 5400.0),
    ("500ms", 0.5), (".5s", 0.5), ("5.s", 5.0), ("-5s", -5.0), ("-0", 0.0), ("2h45m", 9900.0),
    ("1.5", None), ("-5", None), ("", None), ("s", None), (".s", None), ("1sm", None), ("1.5.5s", None),
    (" 5", None), ("1_0", None), ("thirty", None),
])
def test_durations_parse_as_in_of_watchdog(index, value, seconds):
    """A whole number is seconds, anything else a Go duration (config.go's parseIntOrDurationValue)."""
    assert index.parse_duration(value) == seconds
