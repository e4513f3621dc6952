"""A batcher's queue: the jobs waiting, the requests announced (decoding their inputs, queued
soon), the batches on their way, and which jobs go together next (the gathering policy).

A batch waits for requests *on their way*, never for traffic that does not exist: a request
announces itself before its CPU work, and a batch waits for those announced before its oldest job
was queued, up to ``max_delay`` after that job arrived; a lone request goes at once. Those are part
way through their decode, while one announced after it has all of its decode ahead and goes in the
next batch (on the H200 a worker's gather, which waited for every request announced meanwhile, took
1.9 ms of its 2 ms limit on average).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

from accel.errors import NotReady

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Job(Generic[Item, Result]):
    """One request's item, queued; its Future carries the answer."""

    __slots__ = ("item", "rows", "arrived", "future", "later", "after")

    def __init__(self, item: Item, rows: int, later: bool = False, after: int = 0) -> None:
        self.item: Item | None = item
        self.rows, self.arrived = rows, time.perf_counter()
        self.future: Future[Result] = Future()
        self.later = later  # submitted with ``submit_later``: its result is set on the reply thread (or where it lands)
        self.after = after  # the announcements made before it was queued: those below this number


class BatchQueue(Generic[Item, Result]):
    """The jobs of one batcher and its batches on their way, under one lock; hands out the batches.

    The batcher's threads ``take`` batches, one of them gathering at a time, so that a batch that
    could form is not split. With ``start_anywhere`` a request's thread may take one too (``put``).

    Args:
        name: the model's name (messages).
        max_batch_size: rows per batch (a larger single request goes alone).
        max_delay: seconds the oldest job may wait for others on their way.
        cap: batches on their way at once (0: not counted, each thread runs the batch it took).
        threads: the batcher's threads that take batches; with several and a ``cap``, each keeps to
            its share of it.
        start_anywhere: whether ``put`` may return a batch for the calling thread to start.
        busy_until: called while other batches are in flight: the ``time.perf_counter()`` until
            which a batch started now would only wait behind them (None: no estimate).

    ``cap``, ``in_flight``, ``mine`` and ``forming`` are for reading only: the lock guards them.
    """

    def __init__(self, name: str, max_batch_size: int, max_delay: float, cap: int, threads: int,
                 start_anywhere: bool, busy_until: Callable[[], float | None] | None) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.cap = cap  # batches on their way, at most
        self.in_flight = 0
        # with several launchers, each has its share of ``cap`` (its stream's landing slots): a thread
        # at its share leaves the gathering to the others rather than gather a batch it cannot queue
        self._share = cap // threads if cap and threads > 1 else 0
        self.mine: dict[int, int] = {}  # batches on their way, by the launcher thread that started them
        self._start_anywhere = start_anywhere
        self._busy_until = busy_until
        self._waiting: deque[Job[Item, Result]] = deque()
        self._alone: deque[Job[Item, Result]] = deque()  # of a failed batch, each to run again alone
        self._announced = 0  # announcements so far: each gets the next number
        self._decoding: set[int] = set()  # the numbers of those not yet queued (or given up)
        self._cond = threading.Condition()
        self._closed = False
        self._gathering = False  # a thread is gathering a batch: the others wait their turn
        self.forming: list[Job[Item, Result]] | None = None  # the batch being gathered (``start_anywhere``)

    # --- requests -------------------------------------------------------------------------------
    def announce(self) -> list[int | None]:
        """A request on its way (decoding its inputs): its announcement, for ``put`` or ``withdraw``."""
        with self._cond:
            announced: list[int | None] = [self._announced]
            self._decoding.add(self._announced)
            self._announced += 1
        return announced

    def withdraw(self, announced: list[int | None]) -> None:
        """Ends ``announced``'s announcement, if ``put`` has not (its request gave up)."""
        with self._cond:
            if self._unannounce(announced) and self._gathering:  # (only a gathering thread waits on announcements)
                self._cond.notify_all()

    def _unannounce(self, announced: list[int | None]) -> bool:
        """Ends ``announced``'s announcement, if still on (holding the condition's lock); whether it was."""
        number, announced[0] = announced[0], None
        if number is None:
            return False
        self._decoding.discard(number)
        return True

    @property
    def incoming(self) -> int:
        """Requests announced and not yet queued."""
        return len(self._decoding)

    def _awaited(self, oldest: Job[Item, Result]) -> bool:
        """Whether a request announced before ``oldest`` was queued is still decoding."""
        return bool(self._decoding) and min(self._decoding) < oldest.after

    def put(self, item: Item, rows: int, announced: list[int | None],
            later: bool = False) -> tuple[Job[Item, Result], list[Job[Item, Result]] | None]:
        """Queues ``item``, ending ``announced``'s announcement; its job, and the batch the calling
        thread is to start (``_ready``'s; never for a job ``later``), if any.

        Raises:
            NotReady: the queue is closed.
        """
        with self._cond:
            if self._closed:
                raise NotReady(f"the batcher of {self.name} is closed (the shim is stopping); retry", retry_after=1.0)
            self._unannounce(announced)
            job: Job[Item, Result] = Job(item, rows, later, self._announced)
            self._waiting.append(job)
            batch = None if later else self._ready()
            if (batch is None or self._waiting) and self._may_move():  # the batcher's thread decides, or gathers
                self._cond.notify_all()                                # what is left
        return job, batch

    def _may_move(self) -> bool:
        """Whether a job queued now may move a thread waiting on the queue: one gathering, or one
        free to take a batch. While the batches on their way are at ``cap`` and nobody gathers, none
        may (``done_with`` wakes them): each put woke the batcher's thread for nothing, and a woken
        thread waits for the interpreter lock (called holding the condition's lock)."""
        return self._gathering or not self._full()

    def _ready(self) -> list[Job[Item, Result]] | None:
        """With ``start_anywhere``, the batch the calling thread may start now: what the batcher's
        thread was gathering and what is queued, once nobody announced before its oldest request
        is still decoding; None when the batcher's thread is to decide (called holding the
        condition's lock). The last request expected so starts the batch on its own thread rather
        than wake the batcher's thread for it (on the H200 a woken thread waits 0.3-0.6 ms for the
        interpreter lock); that thread starts the rest: batches that waited ``max_delay``, those held
        back while ``cap`` were on their way, and the reruns."""
        if not self._start_anywhere or self._alone:
            return None
        oldest = self.forming[0] if self.forming is not None else self._waiting[0] if self._waiting else None
        if oldest is None or self._awaited(oldest):
            return None
        if self.forming is not None:  # taken over: its thread counted it on its way, and goes back
            batch, self.forming, self._gathering = self.forming, None, False
        elif self._full():
            return None
        else:
            self.in_flight += 1
            batch = [self._waiting.popleft()]
        self._fill(batch)
        return batch

    def close(self) -> None:
        """No more jobs: ``take`` returns None once those queued are taken and no batch is on its way."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # --- the batcher's threads ------------------------------------------------------------------
    def take(self) -> list[Job[Item, Result]] | None:
        """The next batch for the calling thread (counted on its way), once there is one it may
        take; None once closed and done."""
        me = threading.get_ident()
        with self._cond:
            while True:
                while not (self._waiting or self._alone) or self._gathering or self._full() or self._at_share(me):
                    # closed: once nothing is queued and no batch is on its way (its requests may come back)
                    if self._closed and (self._gathering or not (self._waiting or self._alone)) and not self.in_flight:
                        return None
                    self._cond.wait()
                if self.cap:
                    self.in_flight += 1
                    if self._share:
                        self.mine[me] = self.mine.get(me, 0) + 1
                if self._alone:
                    return [self._alone.popleft()]
                self._gathering = True
                try:
                    batch = self._gather()
                finally:
                    self._gathering = False
                    self._cond.notify_all()
                if batch is not None:
                    return batch
                # taken over by a request's thread (``_ready``): gather again

    def _full(self) -> bool:
        return bool(self.cap) and self.in_flight >= self.cap

    def _at_share(self, thread: int) -> bool:
        """Whether launcher ``thread`` has its share of the batches on their way (several launchers)."""
        return bool(self._share) and self.mine.get(thread, 0) >= self._share

    def _gather(self) -> list[Job[Item, Result]] | None:
        """The oldest job and those that join it, or None if a request's thread took the batch over
        (called holding the condition's lock). With ``busy_until``, a batch with nobody else
        announced waits for more until the device is about to be free (within ``max_delay`` still):
        going earlier would only queue it, smaller."""
        batch = [self._waiting.popleft()]
        self.forming = batch
        deadline = batch[0].arrived + self.max_delay
        while True:
            rows = self._fill(batch)
            now = time.perf_counter()
            left = deadline - now
            if rows >= self.max_batch_size or self._waiting or left <= 0 or self._closed:
                break  # full (the next does not fit), or waited enough
            if not self._awaited(batch[0]):  # nobody else on the way: go, unless the device stays busy a while
                busy = self._device_busy_until()
                if busy is None or busy <= now:
                    break
                left = min(left, busy - now)
            self._cond.wait(left)
            if self.forming is not batch:
                return None
        self.forming = None
        return batch

    def _device_busy_until(self) -> float | None:
        """While another batch is in flight, until when it keeps the device busy (``busy_until``)."""
        if self._busy_until is None or self.in_flight < 2:  # the batch being gathered is counted too
            return None
        try:
            return self._busy_until()
        except Exception:  # noqa: BLE001 - only an estimate: the batch goes as it would without, from now on
            log.exception("model %s: busy_until failed; batches no longer wait for the device", self.name)
            self._busy_until = None
            return None

    def _fill(self, batch: list[Job[Item, Result]]) -> int:
        """Queued jobs onto ``batch`` while they fit in ``max_batch_size`` rows; its rows."""
        rows = sum(job.rows for job in batch)
        while self._waiting and rows + self._waiting[0].rows <= self.max_batch_size:
            job = self._waiting.popleft()
            batch.append(job)
            rows += job.rows
        return rows

    # --- batches taken --------------------------------------------------------------------------
    def rerun_alone(self, batch: list[Job[Item, Result]]) -> None:
        """A failed batch's jobs, each to be taken again alone (the batch stays on its way until
        ``done_with``)."""
        with self._cond:
            self._alone.extend(batch)

    def done_with(self, launcher: int | None = None) -> None:
        """A batch taken is done with (answered, sent back to run alone, or all of it cancelled); its
        launcher's, when that is one of several launcher threads."""
        if self.cap:
            with self._cond:
                self.in_flight -= 1
                if launcher in self.mine:
                    self.mine[launcher] -= 1
                self._cond.notify_all()
