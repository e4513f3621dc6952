"""Lender: the CUDA backend's device workers lent to threads one job at a time, first come first served."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from accel.errors import NotReady
from shim.backends.lending import Lender


def test_an_idle_item_is_lent_at_once_the_last_given_back_first():
    lender = Lender(["a", "b"])
    first = lender.borrow()
    assert first == "b" and lender.idle() == 1
    lender.give_back(first)
    assert lender.borrow() == "b"  # the warmest
    assert lender.borrow() == "a" and lender.idle() == 0


def test_a_waiting_thread_gets_the_next_item_given_back_before_anyone_who_comes_later():
    lender = Lender(["only"])
    held = lender.borrow()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(lender.borrow(5)))
    waiter.start()
    _until(lambda: lender._waiting)  # noqa: SLF001 - it waits
    lender.give_back(held)
    # the giver asks again at once: it must wait its turn, the waiter has the item
    with pytest.raises(NotReady, match="stayed busy"):
        lender.borrow(0.05)
    waiter.join(5)
    assert got == ["only"] and lender.idle() == 0


def test_threads_that_borrow_back_to_back_share_the_items_fairly():
    """32 threads over 8 items, each borrowing again as soon as it gives back: every thread gets its
    turns (a plain condition lets the giver take the item straight back, starving the others)."""
    lender = Lender(range(8))
    counts = [0] * 32
    stop = [0.0]
    most_waited = [0.0]
    # the 0.6 s start once every thread is there: a thread started late on a loaded machine is no starved one
    together = threading.Barrier(32, action=lambda: stop.__setitem__(0, time.monotonic() + 0.6))

    def loop(i: int) -> None:
        together.wait(30)
        while time.monotonic() < stop[0]:
            asked = time.perf_counter()
            item = lender.borrow(10)
            most_waited[0] = max(most_waited[0], time.perf_counter() - asked)
            time.sleep(0.0005)  # the job
            counts[i] += 1
            lender.give_back(item)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(loop, range(32)))
    assert min(counts) >= max(counts) // 20, counts
    assert most_waited[0] < 2.0, most_waited
    assert lender.idle() == 8


def test_a_wait_that_times_out_leaves_no_turn_behind():
    lender = Lender(["x"])
    held = lender.borrow()
    with pytest.raises(NotReady) as caught:
        lender.borrow(0.02)
    assert caught.value.status == 503 and caught.value.retry_after
    assert not lender._waiting  # noqa: SLF001
    lender.give_back(held)
    assert lender.idle() == 1 and lender.borrow(0) == "x"


@pytest.mark.parametrize("given", [True, False])
def test_a_waiter_interrupted_loses_no_item_and_leaves_no_turn(monkeypatch, given):
    """A thread interrupted while it waits (KeyboardInterrupt, say): an item already handed to its turn
    goes on (here: back to idle), and a turn not served yet is dropped; nothing is lost, even an item
    that is None."""
    from shim.backends import lending

    lender = Lender([None])
    held = lender.borrow()

    class Interrupt(BaseException):
        pass

    class InterruptedWait(threading.Event):
        def wait(self, timeout=None):
            if given:
                lender.give_back(held)  # handed to this waiting turn ...
            raise Interrupt  # ... and the wait is interrupted before it returns

    # the lender's module sees a threading of its own; the process's threading is untouched
    monkeypatch.setattr(lending, "threading", SimpleNamespace(Event=InterruptedWait, Lock=threading.Lock))
    with pytest.raises(Interrupt):
        lender.borrow(5)
    monkeypatch.undo()
    assert not lender._waiting  # noqa: SLF001
    if not given:
        lender.give_back(held)
    assert lender.idle() == 1 and lender.borrow(0) is None


def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.001)
