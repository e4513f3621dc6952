"""Batches started on the batcher's thread and answered where their Future is set (a request
worker's batchers: the device call goes over the link and its reply lands on the link's reader)."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import pytest

from shim.batching import Batcher
from shim.futures import then


class _Device:
    """Answers started batches on a thread of its own, in order, uppercasing each item; a batch
    holding "poison" fails. Holds its answers until ``hold`` batches are on their way (or for
    ``patience`` seconds, once)."""

    def __init__(self, hold: int = 1, patience: float = 5.0) -> None:
        self.started: list[list[str]] = []
        self.on_their_way = self.most_on_their_way = 0
        self.answered_on: set[str] = set()
        self._hold, self._patience = hold, patience
        self._jobs: queue.SimpleQueue[tuple[list[str], Future[list[str]]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._enough = threading.Event()
        self._thread = threading.Thread(target=self._answer, name="device", daemon=True)
        self._thread.start()

    def run_later(self, items: Sequence[str]) -> Future[list[str]]:
        future: Future[list[str]] = Future()
        with self._lock:
            self.started.append(list(items))
            self.on_their_way += 1
            self.most_on_their_way = max(self.most_on_their_way, self.on_their_way)
            if self.on_their_way >= self._hold:
                self._enough.set()
        self._jobs.put((list(items), future))
        return future

    def _answer(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._enough.wait(self._patience)
            self._enough.set()
            items, future = job
            time.sleep(0.002)
            with self._lock:
                self.on_their_way -= 1
            self.answered_on.add(threading.current_thread().name)
            if "poison" in items:
                future.set_exception(ValueError("poisoned"))
            else:
                future.set_result([i.upper() for i in items])

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(5)


def _blocking(items: Sequence[str]) -> list[str]:
    raise AssertionError("a batcher with run_batch_later never runs a batch on its own thread")


def _call_all(batcher: Batcher, items: list[str]) -> list[Any]:
    """Each item submitted by a thread of its own, all at once; each result or error (a request
    left unanswered fails the test after 10 s instead of hanging it)."""
    gate = threading.Barrier(len(items))
    got: dict[int, Any] = {}

    def call(k: int, item: str) -> None:
        with batcher.incoming() as submit:
            gate.wait(5)
            try:
                got[k] = submit(item, 1)
            except ValueError as exc:
                got[k] = exc

    threads = [threading.Thread(target=call, args=(k, item), daemon=True) for k, item in enumerate(items)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(got) == len(items), f"{len(items) - len(got)} requests were never answered"
    return [got[k] for k in range(len(items))]


def test_batches_go_out_without_waiting_and_at_most_concurrency_are_on_their_way():
    device = _Device(hold=2)
    batcher = Batcher("m", _blocking, max_batch_size=2, max_queue_delay_us=0, concurrency=2,
                      run_batch_later=device.run_later)
    try:
        items = [f"item{i}" for i in range(12)]
        assert _call_all(batcher, items) == [i.upper() for i in items]
    finally:
        batcher.close()
        device.stop()
    # a second batch started before the first was answered, never a third
    assert device.most_on_their_way == 2
    assert all(len(b) <= 2 for b in device.started) and sorted(sum(device.started, [])) == sorted(items)
    assert device.answered_on == {"device"}
    assert len(batcher._threads) == 1  # noqa: SLF001 - one thread gathers; the batches need none


def test_a_failed_batch_runs_its_requests_again_each_alone():
    device = _Device()
    batcher = Batcher("m", _blocking, max_batch_size=8, max_queue_delay_us=200_000, concurrency=2,
                      run_batch_later=device.run_later)
    try:
        got = _call_all(batcher, ["a", "b", "poison", "c", "d", "e"])
    finally:
        batcher.close()
        device.stop()
    assert [g for g in got if not isinstance(g, ValueError)] == ["A", "B", "C", "D", "E"]
    assert isinstance(got[2], ValueError) and str(got[2]) == "poisoned"
    assert any("poison" in b and len(b) > 1 for b in device.started)  # it was batched with others
    assert ["poison"] in device.started and ["a"] in device.started  # then each ran alone
    assert batcher._queue.in_flight == 0  # noqa: SLF001 - every batch taken was counted back


def test_a_batch_that_cannot_start_fails_its_request_and_the_batcher_goes_on():
    started: list[list[str]] = []

    def run_later(items: Sequence[str]) -> Future[list[str]]:
        started.append(list(items))
        if items == ["down"]:
            raise ConnectionError("the device process is gone")
        done: Future[list[str]] = Future()
        done.set_result([i * 2 for i in items])
        return done

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=1,
                      run_batch_later=run_later)
    try:
        with pytest.raises(ConnectionError, match="gone"):
            batcher.submit("down", 1)
        assert batcher.submit("up", 1) == "upup"
    finally:
        batcher.close()
    assert started == [["down"], ["up"]]


def test_closing_answers_what_is_queued_and_on_its_way():
    device = _Device(hold=3, patience=1.0)  # holds its answers for 1 s: a third batch never goes
    batcher = Batcher("m", _blocking, max_batch_size=1, max_queue_delay_us=0, concurrency=2,
                      run_batch_later=device.run_later)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.submit, f"x{i}", 1) for i in range(4)]
        time.sleep(0.3)
        assert device.most_on_their_way == 2 and not any(f.done() for f in futures)
        closing = threading.Thread(target=batcher.close)
        closing.start()  # the device answers after 1 s: the queue drains as batches land
        assert sorted(f.result(30) for f in futures) == ["X0", "X1", "X2", "X3"]
        closing.join(30)
    device.stop()
    assert not closing.is_alive() and not batcher._threads[0].is_alive()  # noqa: SLF001


def test_then_maps_a_result_and_carries_an_error():
    done: Future[int] = Future()
    doubled = then(done, lambda x: 2 * x)
    assert not doubled.done()
    done.set_result(21)
    assert doubled.result(0) == 42
    failed: Future[int] = Future()
    failed.set_exception(KeyError("k"))
    with pytest.raises(KeyError):
        then(failed, lambda x: x).result(0)
    with pytest.raises(ZeroDivisionError):
        then(done, lambda x: x / 0).result(0)


def test_results_that_cannot_be_handed_out_fail_their_requests_instead_of_leaving_them_waiting():
    def run_later(items: Sequence[str]) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_result(None)  # not one result per request
        return done

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=1,
                      run_batch_later=run_later)
    try:
        assert isinstance(batcher.submit_later("y", 1).exception(10), TypeError)
        with pytest.raises(TypeError):
            batcher.submit("x", 1)
    finally:
        batcher.close()
    assert batcher._queue.in_flight == 0  # noqa: SLF001


def test_submit_later_is_answered_on_the_reply_thread_and_cancelled_requests_are_skipped():
    device = _Device()
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=2,
                      run_batch_later=device.run_later)
    answered_on: list[str] = []
    called = threading.Event()
    try:
        later = batcher.submit_later("later", 1)
        later.add_done_callback(lambda _done: (answered_on.append(threading.current_thread().name), called.set()))
        assert later.result(5) == "LATER" and called.wait(5)
        cancelled = [batcher.submit_later(f"c{i}", 1) for i in range(8)]
        for future in cancelled[::2]:
            future.cancel()  # those not yet taken are skipped
        for future in cancelled[1::2]:
            assert future.result(5).startswith("C")
    finally:
        batcher.close()
        device.stop()
    assert answered_on == ["replies-m"]  # not the device's thread: a callback may block there
    assert batcher._queue.in_flight == 0  # noqa: SLF001


def test_with_land_answers_submit_later_is_answered_where_the_batch_lands():
    """A GPU pipeline's landing thread waits for nothing else: the answers go from there, without
    the hand-off to the reply thread; a failed batch's errors still go through the reply thread."""
    device = _Device()
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=2,
                      run_batch_later=device.run_later, land_answers=True)
    answered_on: list[str] = []
    try:
        for item in ("a", "b"):
            later = batcher.submit_later(item, 1)
            called = threading.Event()
            later.add_done_callback(lambda _done: (answered_on.append(threading.current_thread().name), called.set()))
            assert later.result(5) == item.upper() and called.wait(5)
        with pytest.raises(ValueError, match="poisoned"):
            batcher.submit_later("poison", 1).result(5)
    finally:
        batcher.close()
        device.stop()
    assert answered_on == ["device", "device"]
    assert batcher._queue.in_flight == 0  # noqa: SLF001


def test_with_land_answers_a_batch_run_at_once_is_still_answered_on_the_reply_thread():
    """A GPU pipeline that cannot queue a batch (JPEGs to decode, more rows than a session takes)
    runs it at once and returns a Future already done: its answers must not run on the batcher's
    thread, before it gathers the next batch."""
    gate = threading.Event()

    def run_at_once(items: Sequence[str]) -> Future[list[str]]:
        gate.wait(5)  # the test's callback is on the request's Future first
        done: Future[list[str]] = Future()
        done.set_result([i.upper() for i in items])
        return done

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=2,
                      thread_start=lambda: None, run_batch_later=run_at_once, land_answers=True)
    answered_on: list[str] = []
    called = threading.Event()
    try:
        later = batcher.submit_later("a", 1)
        later.add_done_callback(lambda _d: (answered_on.append(threading.current_thread().name), called.set()))
        gate.set()
        assert later.result(5) == "A" and called.wait(5)
    finally:
        batcher.close()
    assert answered_on == ["replies-m"]


def test_a_batch_whose_requests_were_all_cancelled_frees_its_place():
    device = _Device(hold=2, patience=0.5)  # holds the first answer for 0.5 s
    batcher = Batcher("m", _blocking, max_batch_size=1, max_queue_delay_us=0, concurrency=1,
                      run_batch_later=device.run_later)
    try:
        first = batcher.submit_later("a", 1)
        queued = batcher.submit_later("b", 1)  # waits: one batch may be on its way
        assert queued.cancel()
        assert first.result(5) == "A"
        assert batcher.submit_later("c", 1).result(5) == "C"  # the cancelled batch kept no place
    finally:
        batcher.close()
        device.stop()
    assert batcher._queue.in_flight == 0 and device.started == [["a"], ["c"]]  # noqa: SLF001


def test_a_metric_that_fails_fails_the_requests_instead_of_leaving_them_waiting():
    class Broken:
        def labels(self, _name: str) -> "Broken":
            return self

        def observe(self, _value: float) -> None:
            raise OSError("the metric broke")

    device = _Device()
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, batch_seconds=Broken(),
                      concurrency=2, run_batch_later=device.run_later)
    try:
        assert isinstance(batcher.submit_later("x", 1).exception(5), OSError)
    finally:
        batcher.close()
        device.stop()
    assert batcher._queue.in_flight == 0  # noqa: SLF001


class _Recorder:
    """A ``run_batch_later`` that notes each batch and the thread that started it; answers each
    at once (items doubled), or holds it until ``release`` while ``hold`` is set."""

    def __init__(self, hold: bool = False) -> None:
        self.started: list[tuple[list[str], str]] = []
        self.held: list[tuple[list[str], Future[list[str]]]] = []
        self._hold = hold

    def run_later(self, items: Sequence[str]) -> Future[list[str]]:
        self.started.append((list(items), threading.current_thread().name))
        done: Future[list[str]] = Future()
        if self._hold:
            self.held.append((list(items), done))
        else:
            done.set_result([i * 2 for i in items])
        return done

    def release(self) -> None:
        held, self.held = self.held, []
        for items, done in held:
            done.set_result([i * 2 for i in items])


def _in_thread(name: str, fn: Any, *args: Any) -> Future[Any]:
    """``fn(*args)`` on a thread called ``name``; its result in a Future."""
    out: Future[Any] = Future()

    def run() -> None:
        try:
            out.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - carried to the test
            out.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return out


def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_lone_request_starts_its_batch_on_its_own_thread():
    device = _Recorder()
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=5_000_000, concurrency=2,
                      run_batch_later=device.run_later)
    try:
        assert _in_thread("request-1", batcher.submit, "a", 1).result(5) == "aa"
    finally:
        batcher.close()
    assert device.started == [(["a"], "request-1")]  # not woken the batcher's thread for it


def test_the_last_request_expected_takes_over_the_batch_being_gathered():
    device = _Recorder()
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=5_000_000, concurrency=2,
                      run_batch_later=device.run_later)
    decoded, submitted = threading.Event(), []

    def announced_then(item: str, rows: int) -> str:
        with batcher.incoming() as submit:
            decoded.wait(5)  # "decoding" while the batcher's thread gathers the first request
            submitted.append(time.monotonic())
            return submit(item, rows)

    try:
        late = _in_thread("request-late", announced_then, "b", 1)
        _until(lambda: batcher._queue.incoming == 1)  # noqa: SLF001
        first = _in_thread("request-first", batcher.submit, "a", 1)
        _until(lambda: batcher._queue.forming is not None)  # noqa: SLF001 - its thread waits for the late one
        decoded.set()
        assert late.result(5) == "bb" and first.result(5) == "aa"
        # the late one's thread started both, at once: not after the batcher's thread woke (5 s)
        assert device.started == [(["a", "b"], "request-late")]
        assert time.monotonic() - submitted[0] < 2.0
        # what does not fit is left to the batcher's thread, which is not stuck in the batch taken over
        decoded.clear()
        late = _in_thread("request-late", announced_then, "big", 4)
        _until(lambda: batcher._queue.incoming == 1)  # noqa: SLF001
        first = _in_thread("request-first", batcher.submit, "c", 1)
        _until(lambda: batcher._queue.forming is not None)  # noqa: SLF001
        decoded.set()
        assert first.result(5) == "cc" and late.result(2) == "bigbig"
        # (the two start at once, each on its thread: in either order)
        assert sorted(device.started[1:]) == [(["big"], "batcher-m-0"), (["c"], "request-late")]
    finally:
        batcher.close()
    assert batcher._queue.in_flight == 0  # noqa: SLF001


def test_a_request_does_not_start_a_batch_beyond_those_that_may_be_on_their_way():
    device = _Recorder(hold=True)
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=1,
                      run_batch_later=device.run_later)
    try:
        first = _in_thread("request-1", batcher.submit, "a", 1)
        _until(lambda: len(device.started) == 1)
        second = _in_thread("request-2", batcher.submit, "b", 1)
        time.sleep(0.2)
        assert len(device.started) == 1 and not second.done()  # one batch may be on its way
        device.release()  # on this thread: the first lands, the batcher's thread starts the second
        assert first.result(5) == "aa"
        _until(lambda: len(device.started) == 2)
        device.release()
        assert second.result(5) == "bb"
    finally:
        batcher.close()
    assert device.started == [(["a"], "request-1"), (["b"], "batcher-m-0")]
    assert batcher._queue.in_flight == 0  # noqa: SLF001


def test_a_batch_taken_over_that_fails_runs_its_requests_again_each_alone():
    started: list[tuple[list[str], str]] = []

    def run_later(items: Sequence[str]) -> Future[list[str]]:
        started.append((list(items), threading.current_thread().name))
        done: Future[list[str]] = Future()
        if "poison" in items:
            done.set_exception(ValueError("poisoned"))
        else:
            done.set_result([i * 2 for i in items])
        return done

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=5_000_000, concurrency=1,
                      run_batch_later=run_later)
    decoded = threading.Event()

    def announced_then(item: str) -> str:
        with batcher.incoming() as submit:
            decoded.wait(5)
            return submit(item, 1)

    try:
        late = _in_thread("request-late", announced_then, "poison")
        _until(lambda: batcher._queue.incoming == 1)  # noqa: SLF001
        first = _in_thread("request-first", batcher.submit, "a", 1)
        _until(lambda: batcher._queue.forming is not None)  # noqa: SLF001
        decoded.set()
        assert first.result(5) == "aa"
        with pytest.raises(ValueError, match="poisoned"):
            late.result(5)
    finally:
        batcher.close()
    assert started[0] == (["a", "poison"], "request-late")
    assert sorted(items for items, _ in started[1:]) == [["a"], ["poison"]]  # each again, alone
    assert batcher._queue.in_flight == 0  # noqa: SLF001


def test_a_batch_that_cannot_start_on_a_requests_thread_fails_its_requests_and_frees_its_place():
    class Stop(BaseException):
        pass

    class BreaksOnce:
        broke = False

        def labels(self, _name: str) -> "BreaksOnce":
            return self

        def observe(self, _value: float) -> None:
            if not BreaksOnce.broke:
                BreaksOnce.broke = True
                raise Stop()

    device = _Recorder()
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, queue_seconds=BreaksOnce(),
                      concurrency=1, run_batch_later=device.run_later)
    try:
        with pytest.raises(Stop):
            batcher.submit("a", 1)
        assert batcher._queue.in_flight == 0  # noqa: SLF001 - its place is free: the next batch goes
        assert _in_thread("request-2", batcher.submit, "b", 1).result(5) == "bb"
    finally:
        batcher.close()
    assert device.started == [(["b"], "request-2")]


class _CountingCondition(threading.Condition):
    """A Condition that counts, by thread name, the waits it returned from (each a wake-up)."""

    woken: dict[str, int] = {}

    def wait(self, timeout: float | None = None) -> bool:
        try:
            return super().wait(timeout)
        finally:
            name = threading.current_thread().name
            self.woken[name] = self.woken.get(name, 0) + 1


def test_requests_queued_while_the_batches_on_their_way_are_at_the_cap_do_not_wake_the_batchers_thread(
        monkeypatch):
    """While as many batches as may be are on their way and nobody gathers, a request queued (or
    one announced and given up) cannot move the batcher's thread: it is not woken for it (each
    woken thread waits for the interpreter lock, on the device process's busiest core). Once a
    batch lands it is, and starts the queued requests as one batch."""
    device = _Recorder(hold=True)
    _CountingCondition.woken = {}
    with monkeypatch.context() as patch:  # the batcher's queue made with it (and the Barrier: harmless)
        patch.setattr(threading, "Condition", _CountingCondition)
        batcher = Batcher("m", _blocking, max_batch_size=8, max_queue_delay_us=0, concurrency=1,
                          thread_start=lambda: None, run_batch_later=device.run_later)
    try:
        futures = [batcher.submit_later("a", 1)]
        _until(lambda: len(device.started) == 1)  # on its way: the cap of 1 reached
        time.sleep(0.05)
        before = _CountingCondition.woken.get("batcher-m-0", 0)
        for item in "bcdefg":
            futures.append(batcher.submit_later(item, 1))
            with batcher.incoming():  # announced, then given up
                pass
            time.sleep(0.01)
        time.sleep(0.1)
        assert _CountingCondition.woken.get("batcher-m-0", 0) == before and len(device.started) == 1
        device.release()  # "a" lands: its place is free
        _until(lambda: len(device.started) == 2)
        device.release()
        assert [f.result(5) for f in futures] == [i * 2 for i in "abcdefg"]
    finally:
        device._hold = False  # noqa: SLF001
        device.release()
        batcher.close()
    assert [items for items, _ in device.started] == [["a"], list("bcdefg")]


def test_a_batcher_whose_threads_are_bound_starts_every_batch_on_its_own_thread():
    device = _Recorder()
    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=2,
                      thread_start=lambda: None, run_batch_later=device.run_later)
    try:
        assert _in_thread("request-1", batcher.submit, "a", 1).result(5) == "aa"
    finally:
        batcher.close()
    assert device.started == [(["a"], "batcher-m-0")]  # run_batch_later may need the bound thread


@pytest.mark.parametrize("estimate", [True, False], ids=["busy_until", "without"])
def test_a_batch_gathered_while_another_is_in_flight_waits_until_the_device_is_about_to_be_free(estimate):
    """A GPU pipeline queues its batches behind one another (``busy_until``): a batch gathered while
    another is in flight, with nobody else announced, keeps gathering until the device is about to
    be free, so that a request coming meanwhile joins it; without the estimate it goes at once, alone.
    The first batch (nothing in flight) goes at once either way."""
    device = _Recorder(hold=True)
    busy = [0.0]
    batcher = Batcher("m", _blocking, max_batch_size=8, max_queue_delay_us=2_000_000, concurrency=2,
                      thread_start=lambda: None, run_batch_later=device.run_later,
                      busy_until=(lambda: busy[0]) if estimate else None)
    try:
        first = batcher.submit_later("a", 1)
        _until(lambda: len(device.started) == 1)  # went at once
        busy[0] = time.perf_counter() + 0.4
        began = time.perf_counter()
        b = batcher.submit_later("b", 1)
        time.sleep(0.1)
        c = batcher.submit_later("c", 1)
        _until(lambda: len(device.started) >= 2)
        went = time.perf_counter() - began
        device._hold = False  # noqa: SLF001 - from now on each batch is answered at once
        device.release()
        assert first.result(5) == "aa" and b.result(5) == "bb" and c.result(5) == "cc"
    finally:
        device.release()
        batcher.close()
    batches = [items for items, _ in device.started]
    if estimate:
        assert batches == [["a"], ["b", "c"]] and went >= 0.3
    else:
        assert batches == [["a"], ["b"], ["c"]] and went < 0.3


def test_a_batch_held_for_a_busy_device_goes_at_once_when_the_batch_before_lands():
    """The estimate may be long: the batch before landing sooner lets the waiting batch go then."""
    device = _Recorder(hold=True)
    batcher = Batcher("m", _blocking, max_batch_size=8, max_queue_delay_us=5_000_000, concurrency=2,
                      thread_start=lambda: None, run_batch_later=device.run_later,
                      busy_until=lambda: time.perf_counter() + 30)
    try:
        first = batcher.submit_later("a", 1)
        _until(lambda: len(device.started) == 1)
        b = batcher.submit_later("b", 1)
        time.sleep(0.1)
        assert len(device.started) == 1  # held: the device is busy
        released = time.perf_counter()
        device.release()
        _until(lambda: len(device.started) == 2)
        assert time.perf_counter() - released < 1.0
        device.release()
        assert first.result(5) == "aa" and b.result(5) == "bb"
    finally:
        device.release()
        batcher.close()


def test_with_two_launchers_one_starts_a_batch_while_the_other_is_held_up_starting_its_own():
    """A GPU model's instance_count gives its batcher that many bound threads (``launchers``): while
    one is held up inside ``run_batch_later`` (the JPEG engines' decode call waits for them), the
    other gathers the next batch and starts it. Each thread ran ``thread_start`` once, on itself."""
    device = _Recorder()
    bound: list[str] = []
    first_in, let_go = threading.Event(), threading.Event()

    def run_later(items: Sequence[str]) -> Future[list[str]]:
        if items == ["a"]:
            first_in.set()
            assert let_go.wait(5), "the second batch never started while the first was being started"
        return device.run_later(items)

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, concurrency=4,
                      thread_start=lambda: bound.append(threading.current_thread().name),
                      run_batch_later=run_later, launchers=2)
    try:
        a = batcher.submit_later("a", 1)
        assert first_in.wait(5)
        b = batcher.submit_later("b", 1)
        _until(lambda: len(device.started) == 1)  # b started while a's start is still held up
        let_go.set()
        assert a.result(5) == "aa" and b.result(5) == "bb"
    finally:
        let_go.set()
        batcher.close()
    assert sorted(bound) == ["batcher-m-0", "batcher-m-1"]
    assert device.started[0][0] == ["b"] and {device.started[0][1], device.started[1][1]} == set(bound)


def test_a_launcher_with_its_share_of_batches_on_their_way_leaves_the_next_to_another():
    """Each of several launchers has its share of the batches on their way (``concurrency`` 4 over 2
    threads: 2 each, its stream's landing slots): while one thread is held up starting "a", the
    other starts "b" and "c" and then, at its share, leaves "d" queued (gathered, it would wait for
    a slot of its own while the first thread may be free); "d" goes with the first thread."""
    device = _Recorder(hold=True)
    first_in, let_go = threading.Event(), threading.Event()

    def run_later(items: Sequence[str]) -> Future[list[str]]:
        if items == ["a"]:
            first_in.set()
            assert let_go.wait(5)
        return device.run_later(items)

    batcher = Batcher("m", _blocking, max_batch_size=1, max_queue_delay_us=0, concurrency=4,
                      thread_start=lambda: None, run_batch_later=run_later, launchers=2)
    try:
        futures = [batcher.submit_later("a", 1)]
        assert first_in.wait(5)
        for n, item in enumerate("bc", start=1):
            futures.append(batcher.submit_later(item, 1))
            _until(lambda: len(device.started) == n)
        futures.append(batcher.submit_later("d", 1))
        time.sleep(0.2)
        assert [items for items, _ in device.started] == [["b"], ["c"]]  # "d" waits for the held-up thread
        let_go.set()
        _until(lambda: len(device.held) == 4)  # (``started`` is noted before ``held``)
        device.release()
        assert [f.result(5) for f in futures] == ["aa", "bb", "cc", "dd"]
    finally:
        let_go.set()
        device._hold = False  # noqa: SLF001
        device.release()
        batcher.close()
    by = {tuple(items): thread for items, thread in device.started}
    assert by[("b",)] == by[("c",)] != by[("a",)] == by[("d",)]
    assert batcher._queue.in_flight == 0 and not any(batcher._queue.mine.values())  # noqa: SLF001


def test_a_failed_requests_error_keeps_no_frame_of_the_errors_it_came_from_alive():
    """A request's error lives on in its Future: the frames of the error it was raised from (a CUDA
    error's cause, say, in the frame that held the batch's decoded images) are cleared too, so what
    they held goes now, not whenever the Future does."""
    import gc
    import weakref

    class Held:
        pass

    held: list[weakref.ref[Held]] = []

    def run_later(items: Sequence[str]) -> Future[list[str]]:
        def deeper() -> None:
            thing = Held()
            held.append(weakref.ref(thing))
            raise ValueError("deeper")

        try:
            deeper()
        except ValueError as exc:
            raise RuntimeError("mapped") from exc
        raise AssertionError("not reached")

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, thread_start=lambda: None,
                      run_batch_later=run_later)
    try:
        future = batcher.submit_later("a", 1)
        with pytest.raises(RuntimeError, match="mapped"):
            future.result(5)
    finally:
        batcher.close()
    gc.collect()
    assert held and held[0]() is None


def test_a_failed_requests_item_goes_while_its_error_lives_on():
    """A batch that fails on its way (``run_batch_later`` raises): the request's error lives on in
    its Future, its item (decoded images, say) does not, though the frame that started the batch
    (still running when the error's frames were cleared) saw it."""
    import gc
    import weakref

    class Item:
        pass

    item = Item()
    gone = weakref.ref(item)

    def run_later(items: Sequence[Any]) -> Future[list[str]]:
        raise ValueError("refused")

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, thread_start=lambda: None,
                      run_batch_later=run_later)
    try:
        future = batcher.submit_later(item, 1)
        del item
        with pytest.raises(ValueError, match="refused"):
            future.result(5)
    finally:
        batcher.close()
    gc.collect()
    assert future.exception() is not None and gone() is None


def test_a_landed_batchs_items_go_while_the_batcher_waits_for_the_next():
    """A bound batcher's thread that started a batch and waits for the next keeps nothing of it: once
    the batch has landed and been answered, its items (views of a request worker's arena, on the
    device) go, with no further batch (helper-74: the thread's loop held the last batch)."""
    import weakref

    class Item:
        pass

    landed: queue.SimpleQueue[Future[list[str]]] = queue.SimpleQueue()

    def run_later(items: Sequence[Any]) -> Future[list[str]]:
        future: Future[list[str]] = Future()
        landed.put(future)
        return future

    batcher = Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, thread_start=lambda: None,
                      run_batch_later=run_later, land_answers=True)
    try:
        item = Item()
        gone = weakref.ref(item)
        answer = batcher.submit_later(item, 1)
        del item
        started = landed.get(timeout=5)
        threading.Thread(target=started.set_result, args=(["x"],), name="landing").start()  # as a landing's
        assert answer.result(5) == "x"
        del started
        deadline = time.monotonic() + 2
        while gone() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone() is None, "the batcher's thread still holds the landed batch's items"
    finally:
        batcher.close()


def test_launchers_must_be_at_least_one():
    with pytest.raises(ValueError, match="launchers"):
        Batcher("m", _blocking, max_batch_size=4, max_queue_delay_us=0, thread_start=lambda: None,
                run_batch_later=_Recorder().run_later, launchers=0)
