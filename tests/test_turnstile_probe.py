"""The GIL probes' turnstile (``bench/turnstile_probe.py``): threads that wait at it stand by while
a call runs first."""
from __future__ import annotations

import threading
import time

from bench.turnstile_probe import Turnstile


def _waiter(turnstile: Turnstile) -> tuple[threading.Thread, threading.Event]:
    passed = threading.Event()
    thread = threading.Thread(target=lambda: (turnstile.wait(), passed.set()), daemon=True)
    thread.start()
    return thread, passed


def test_a_thread_waits_while_a_call_runs_first_and_passes_once_it_ends() -> None:
    turnstile = Turnstile(max_wait_s=30)
    _, passed = _waiter(turnstile)
    assert passed.wait(5)  # open: at once
    with turnstile.first():
        thread, passed = _waiter(turnstile)
        assert not passed.wait(0.3)
    assert passed.wait(5)
    thread.join(5)
    with turnstile.first():  # open again after each call
        pass
    assert _waiter(turnstile)[1].wait(5)


def test_calls_run_first_side_by_side_and_the_turnstile_opens_when_the_last_ends() -> None:
    turnstile = Turnstile(max_wait_s=30)
    inside, leave = threading.Barrier(3), threading.Event()

    def call() -> None:
        with turnstile.first():
            inside.wait(5)  # both inside at once: the calls do not exclude each other
            leave.wait(5)

    calls = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    for thread in calls:
        thread.start()
    inside.wait(5)
    _, passed = _waiter(turnstile)
    assert not passed.wait(0.3)
    leave.set()
    for thread in calls:
        thread.join(5)
    assert passed.wait(5)


def test_a_waiter_is_not_held_by_calls_that_start_after_it_came() -> None:
    """Two batcher threads' decodes may overlap in a chain: a waiter goes on once those running
    when it came have ended, though another runs first by then."""
    turnstile = Turnstile(max_wait_s=30)
    leave_a, leave_b, b_inside = threading.Event(), threading.Event(), threading.Event()

    def call(leave: threading.Event, inside: threading.Event | None = None) -> None:
        with turnstile.first():
            if inside is not None:
                inside.set()
            leave.wait(10)

    a = threading.Thread(target=call, args=(leave_a,), daemon=True)
    a.start()
    time.sleep(0.05)
    _, passed = _waiter(turnstile)  # came while A runs
    b = threading.Thread(target=call, args=(leave_b, b_inside), daemon=True)
    b.start()
    assert b_inside.wait(5)
    assert not passed.wait(0.3)
    leave_a.set()  # A ends, B still runs: the waiter goes on
    assert passed.wait(5)
    _, later = _waiter(turnstile)  # one that came while B runs waits for B
    assert not later.wait(0.3)
    leave_b.set()
    assert later.wait(5)
    a.join(5)
    b.join(5)


def test_a_waiter_goes_on_after_its_longest_wait_if_the_call_does_not_end() -> None:
    turnstile = Turnstile(max_wait_s=0.05)
    with turnstile.first():
        began = time.monotonic()
        _, passed = _waiter(turnstile)
        assert passed.wait(5)
        assert time.monotonic() - began >= 0.04
