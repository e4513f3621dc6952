"""Dynamic batching: concurrent requests for one model coalesced into one run on the device.

A request ``submit``s its item (``rows`` rows: images, or a tensor's batch axis) and waits. A
batcher thread takes the oldest item and adds more while the batch has room and requests are *on
their way*: a request announces itself with ``incoming()`` before its CPU work (decoding images),
so the thread waits for those being decoded, up to ``max_queue_delay_us`` after the oldest
arrived, never for traffic that does not exist (a lone request runs at once). A batch waits only
for the requests announced before its oldest was queued: those are part way through their
decode, while one announced after it has all of its decode ahead and goes in the next batch (on
the H200 a worker's gather, which waited for every request announced meanwhile, took 1.9 ms of
its 2 ms limit on average). Results are split
back out per request; if a batch of several fails, each of its requests runs again alone, so that
one request's failure fails that request only.

With ``concurrency`` above 1 (a model's ``instance_count``), that many batches may be in flight,
as Triton's model instances; one thread gathers at a time, so a batch that could form is not
split. With ``busy_until`` (a GPU pipeline that queues its batches behind one another), a batch
gathered while another is in flight waits for more requests, rather than go with nobody else
announced, until the device is about to be free (within ``max_queue_delay_us`` still): going
earlier would only queue it, smaller. Each batcher thread first runs ``thread_start`` (a device
pipeline binding it to a CUDA stream of its own and to sessions captured on it, so that a batch
runs where it was gathered).

With ``run_batch_later`` (a request worker's batchers: the device call goes over the link; a GPU
pipeline's, queued on a bound stream) a batch is only started: its results come in a Future and are
split back out on the thread that sets it (the link's reader, a landing thread), up to
``concurrency`` batches on their way; a failed batch of several goes back to the batcher's threads,
to rerun alone. Such a batcher has one thread, or with ``thread_start`` ``launchers`` of them (a
model's ``instance_count`` on the GPU: each bound to a stream, a JPEG decoder and captured sessions
of its own), taking turns to gather: while one is held up starting its batch the next gathers and
starts another. Each keeps to its share of ``concurrency`` (its stream's landing slots): at its
share it leaves the gathering to the others. On the H200 two were 12-14% slower than one at 32
clients (one more thread wanting the interpreter lock, which the JPEG engines' decode call in a
batch's start lets go of and waits to take back; and each thread's hold-back for a busy GPU then
read its own stream's work only, so the batches shrank from 9.6 to 5.7 images); with the hold-back
reading every stream's, still about 8% slower on average (bench/results/NOTES.md, seventeenth
session).

Without ``thread_start``, the last request expected (nobody announced before the batch's oldest is
still decoding, and a batch may go) starts the batch on its own thread, taking what is queued and
what the batcher's thread was gathering, rather than wake that thread for it (on the H200 a woken
thread waits 0.3-0.6 ms for the interpreter lock). The batcher's thread starts the rest: batches
that waited ``max_queue_delay_us``, those held back while ``concurrency`` were on their way, and the
reruns.

``submit_later`` queues an item without waiting: its Future is set (its callbacks run: a reply
over the link, say) on the batcher's reply thread, while the batcher goes on to the next batch (on
the H200 a batch's replies took 0.4-0.5 ms of a 3.5 ms cycle). With ``land_answers`` (a GPU
pipeline whose batches land on a thread of their own, where callbacks that never block, like the
link's posted replies, hold up nothing else) they are set on the thread that lands the batch: one
hand-off between threads fewer per batch, each 0.3-0.75 ms on the H200 hosts. ``submit``'s results are set on
the thread that ran the batch: a waiting thread wakes, no more.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from prometheus_client import Histogram

from accel.errors import NotReady

from .futures import Replier

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
START_TIMEOUT_S = 120.0  # per thread, for its ``thread_start`` (a CUDA stream, the model's sessions captured on it)
QUEUE_BUCKETS = (.00005, .0001, .00025, .0005, .001, .002, .005, .01, .025, .05, .1)


class _Job(Generic[Item, Result]):
    __slots__ = ("item", "rows", "arrived", "future", "later", "after")

    def __init__(self, item: Item, rows: int, later: bool = False, after: int = 0) -> None:
        self.item: Item | None = item
        self.rows, self.arrived = rows, time.perf_counter()
        self.future: Future[Result] = Future()
        self.later = later  # submitted with ``submit_later``: its result is set on the reply thread (or where it lands)
        self.after = after  # the announcements made before it was queued: those below this number


class Batcher(Generic[Item, Result]):
    """Coalesces concurrent ``submit`` calls into calls of ``run_batch(items) -> results``.

    Args:
        name: the model's name (metrics label, thread name).
        run_batch: runs items of several requests together; returns one result per item.
        max_batch_size: rows per batch (a larger single request runs alone).
        max_queue_delay_us: how long the oldest request may wait for others on their way.
        batch_sizes, queue_seconds, batch_seconds: histograms (label ``op``) of rows per run, time
            queued and time per run.
        concurrency: batches that may run at once (worker threads; with ``run_batch_later``, batches
            on their way at once).
        thread_start: run first on each worker thread (its failure is logged; the thread goes on).
        run_batch_later: starts a batch and returns at once, its results to come in a Future; given,
            it runs every batch and ``run_batch`` (its blocking twin) is not called. Without
            ``thread_start`` it may be called from a request's thread too.
        launchers: with ``run_batch_later`` and ``thread_start``, the threads that start batches
            (each gathers in turn); else unused (without ``run_batch_later``, ``concurrency``
            threads run the batches).
        busy_until: called on the gathering thread while other batches are in flight: the
            ``time.perf_counter()`` until which a batch started now would only wait behind them
            (None: no estimate).
        land_answers: ``submit_later``'s results of a batch started with ``run_batch_later`` are set
            where its Future is, not on the reply thread (a Future done already at the start still
            goes through the reply thread: the batcher's thread goes on to gather).
    """

    def __init__(self, name: str, run_batch: Callable[[Sequence[Item]], Sequence[Result]], max_batch_size: int,
                 max_queue_delay_us: int, batch_sizes: Histogram | None = None,
                 queue_seconds: Histogram | None = None, batch_seconds: Histogram | None = None,
                 concurrency: int = 1, thread_start: Callable[[], None] | None = None,
                 run_batch_later: Callable[[Sequence[Item]], Future[Sequence[Result]]] | None = None,
                 busy_until: Callable[[], float | None] | None = None, land_answers: bool = False,
                 launchers: int = 1) -> None:
        if max_batch_size < 1 or max_queue_delay_us < 0 or concurrency < 1 or launchers < 1:
            raise ValueError(f"model {name}: max_batch_size and instance_count (batches, launchers) must be >= 1 and "
                             "max_queue_delay_us >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_us / 1e6
        self._run_batch = run_batch
        self._run_later = run_batch_later
        self._busy_until = busy_until
        self._land_answers = land_answers
        threads = concurrency if run_batch_later is None else launchers if thread_start is not None else 1
        self._cap = max(concurrency, threads) if run_batch_later is not None else 0  # batches on their way, at most
        self._start_anywhere = run_batch_later is not None and thread_start is None  # on a request's thread too
        self._in_flight = 0
        # with several launchers, each has its share of ``_cap`` (its stream's landing slots): a thread
        # at its share leaves the gathering to the others rather than gather a batch it cannot queue
        self._share = self._cap // threads if run_batch_later is not None and threads > 1 else 0
        self._mine: dict[int, int] = {}  # batches on their way, by the launcher thread that started them
        self._alone: deque[_Job[Item, Result]] = deque()  # of a failed batch, each to run again alone
        self._batch_sizes = batch_sizes.labels(name) if batch_sizes is not None else None
        self._queue_seconds = queue_seconds.labels(name) if queue_seconds is not None else None
        self._batch_seconds = batch_seconds.labels(name) if batch_seconds is not None else None
        self._queue: deque[_Job[Item, Result]] = deque()
        self._announced = 0  # announcements so far: each gets the next number
        self._decoding: set[int] = set()  # the numbers of those not yet queued (or given up)
        self._cond = threading.Condition()
        self._closed = False
        self._gathering = False  # a worker is gathering a batch: the others wait their turn
        self._forming: list[_Job[Item, Result]] | None = None  # the batch being gathered (run_batch_later)
        # results of ``submit_later`` jobs, set (their callbacks run) on a thread of their own
        self._replier = Replier(f"replies-{name}")
        started = threading.Barrier(threads + 1)
        self._threads = [threading.Thread(target=self._loop, args=(thread_start, started),
                                          name=f"batcher-{name}-{i}", daemon=True) for i in range(threads)]
        try:
            for thread in self._threads:
                thread.start()
            started.wait(START_TIMEOUT_S * threads)  # the threads' starts may take turns (captures do)
        except BaseException as exc:
            self.close(join=False)  # the threads that did start end
            started.abort()
            if isinstance(exc, threading.BrokenBarrierError):
                raise RuntimeError(f"model {name}: the batcher's threads did not start within "
                                   f"{START_TIMEOUT_S * threads:.0f} s") from None
            raise

    @contextmanager
    def incoming(self) -> Iterator[Callable[[Item, int], Result]]:
        """Announce a request that will submit soon (while it decodes its inputs); yields its
        ``submit``, which ends the announcement as it queues the item."""
        with self._cond:
            announced = [self._announced]
            self._decoding.add(self._announced)
            self._announced += 1

        def submit(item: Item, rows: int) -> Result:
            return self._submit(item, rows, announced)

        try:
            yield submit
        finally:
            with self._cond:
                if self._unannounce(announced):
                    self._cond.notify_all()

    def _unannounce(self, announced: list[int | None]) -> bool:
        """Ends ``announced``'s announcement, if still on (holding the condition's lock); whether it was."""
        number, announced[0] = announced[0], None
        if number is None:
            return False
        self._decoding.discard(number)
        return True

    @property
    def _incoming(self) -> int:
        """Requests announced and not yet queued."""
        return len(self._decoding)

    def _awaited(self, oldest: _Job[Item, Result]) -> bool:
        """Whether a request announced before ``oldest`` was queued is still decoding."""
        return bool(self._decoding) and min(self._decoding) < oldest.after

    def submit(self, item: Item, rows: int) -> Result:
        """Queue ``item`` and wait for its result; raises what running it raised."""
        return self._submit(item, rows, [None])

    def submit_later(self, item: Item, rows: int) -> Future[Result]:
        """Queue ``item``; its result (or what running it raised) comes in the Future returned, set
        on the batcher's reply thread (with ``land_answers``, where its batch lands)."""
        return self._queued(item, rows, [None], later=True).future

    def _submit(self, item: Item, rows: int, announced: list[int | None]) -> Result:
        return self._queued(item, rows, announced).future.result()

    def _queued(self, item: Item, rows: int, announced: list[int | None], later: bool = False) -> _Job[Item, Result]:
        with self._cond:
            if self._closed:
                raise NotReady(f"the batcher of {self.name} is closed (the shim is stopping); retry", retry_after=1.0)
            self._unannounce(announced)
            job: _Job[Item, Result] = _Job(item, rows, later, self._announced)
            self._queue.append(job)
            batch = None if later else self._ready()
            if batch is None or self._queue:  # the batcher's thread decides, or gathers what is left
                self._cond.notify_all()
        if batch is not None:
            self._start_here(batch)
        return job

    def _start_here(self, batch: list[_Job[Item, Result]]) -> None:
        """Start ``batch`` (``_ready``'s) on this thread; should that fail, its requests get the error."""
        began = time.perf_counter()
        try:
            started = self._begin(batch, began)
        except BaseException as exc:  # noqa: BLE001 - nobody else would answer them
            for job in batch:
                if not job.future.done():
                    self._fail(job, exc)
            self._landed_one()
            raise
        if started:
            self._launch(batch, began)

    def _ready(self) -> list[_Job[Item, Result]] | None:
        """With ``run_batch_later``, the batch the calling thread may start now: what the batcher's
        thread was gathering and what is queued, once nobody announced before its oldest request
        is still decoding; None when the batcher's thread is to decide (called holding the
        condition's lock)."""
        if not self._start_anywhere or self._alone:
            return None
        oldest = self._forming[0] if self._forming is not None else self._queue[0] if self._queue else None
        if oldest is None or self._awaited(oldest):
            return None
        if self._forming is not None:  # taken over: its thread counted it on its way, and goes back
            batch, self._forming, self._gathering = self._forming, None, False
        elif self._full():
            return None
        else:
            self._in_flight += 1
            batch = [self._queue.popleft()]
        self._fill(batch)
        return batch

    def close(self, join: bool = True) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads if join else ():
            thread.join(timeout=5)
        self._replier.close(join)  # after the batches' replies: those go first

    # --- the worker ---------------------------------------------------------------------------
    def _take(self) -> list[_Job[Item, Result]] | None:
        me = threading.get_ident()
        with self._cond:
            while True:
                while not (self._queue or self._alone) or self._gathering or self._full() or self._at_share(me):
                    # closed: once nothing is queued and no batch is on its way (its requests may come back)
                    if self._closed and (self._gathering or not (self._queue or self._alone)) and not self._in_flight:
                        return None
                    self._cond.wait()
                if self._cap:
                    self._in_flight += 1
                    if self._share:
                        self._mine[me] = self._mine.get(me, 0) + 1
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
        return bool(self._cap) and self._in_flight >= self._cap

    def _at_share(self, thread: int) -> bool:
        """Whether launcher ``thread`` has its share of the batches on their way (several launchers)."""
        return bool(self._share) and self._mine.get(thread, 0) >= self._share

    def _gather(self) -> list[_Job[Item, Result]] | None:
        """The oldest job and those that join it, or None if a request's thread took the batch over
        (called holding the condition's lock)."""
        batch = [self._queue.popleft()]
        self._forming = batch
        deadline = batch[0].arrived + self.max_delay
        while True:
            rows = self._fill(batch)
            now = time.perf_counter()
            left = deadline - now
            if rows >= self.max_batch_size or self._queue or left <= 0 or self._closed:
                break  # full (the next does not fit), or waited enough
            if not self._awaited(batch[0]):  # nobody else on the way: go, unless the device stays busy a while
                busy = self._device_busy_until()
                if busy is None or busy <= now:
                    break
                left = min(left, busy - now)
            self._cond.wait(left)
            if self._forming is not batch:
                return None
        self._forming = None
        return batch

    def _device_busy_until(self) -> float | None:
        """While another batch is in flight, until when it keeps the device busy (``busy_until``)."""
        if self._busy_until is None or self._in_flight < 2:  # the batch being gathered is counted too
            return None
        try:
            return self._busy_until()
        except Exception:  # noqa: BLE001 - only an estimate: the batch goes as it would without, from now on
            log.exception("model %s: busy_until failed; batches no longer wait for the device", self.name)
            self._busy_until = None
            return None

    def _fill(self, batch: list[_Job[Item, Result]]) -> int:
        """Queued jobs onto ``batch`` while they fit in ``max_batch_size`` rows; its rows."""
        rows = sum(job.rows for job in batch)
        while self._queue and rows + self._queue[0].rows <= self.max_batch_size:
            job = self._queue.popleft()
            batch.append(job)
            rows += job.rows
        return rows

    def _loop(self, thread_start: Callable[[], None] | None, started: threading.Barrier) -> None:
        try:
            if thread_start is not None:
                thread_start()
        except Exception:  # noqa: BLE001 - the thread still serves, the way it would without
            log.exception("model %s: a batcher thread could not start as asked", self.name)
        finally:
            try:
                started.wait()
            except threading.BrokenBarrierError:
                pass  # the batcher failed to start: closed, this thread ends below
        while (batch := self._take()) is not None:
            began = time.perf_counter()
            rerun = len(batch) == 1 and batch[0].future.running()  # a request of a failed batch, alone
            if not rerun and not self._begin(batch, began):
                continue
            if self._run_later is not None:
                self._launch(batch, began)
                continue
            self._run(batch)
            if self._batch_seconds is not None:
                self._batch_seconds.observe(time.perf_counter() - began)
            for job in batch:  # answered: the items go now, not when this thread next gathers (a
                job.item = None  # failed job's error keeps its frame, and the batch, alive)
            del batch

    def _begin(self, batch: list[_Job[Item, Result]], began: float) -> bool:
        """Marks a batch's jobs running (dropping the cancelled ones, in place) and observes their
        time queued; False if none is left (the batch is then done with)."""
        batch[:] = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            self._landed_one(threading.get_ident())
            return False
        if self._queue_seconds is not None:
            try:
                for job in batch:
                    self._queue_seconds.observe(began - job.arrived)
            except Exception:  # noqa: BLE001 - the batch still runs (here, on a request's thread too)
                log.exception("model %s: the time queued could not be observed", self.name)
        return True

    def _run(self, batch: list[_Job[Item, Result]]) -> None:
        try:
            results = self._one_each(self._run_batch([job.item for job in batch]), batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the callers
            if len(batch) > 1:
                for job in batch:  # isolate: only the requests that fail alone get an error
                    self._run([job])
                return
            self._fail(batch[0], exc)
            return
        self._answer(batch, results)

    def _one_each(self, results: Sequence[Result], batch: list[_Job[Item, Result]]) -> Sequence[Result]:
        """``results``, checked to hold one result per request of ``batch``."""
        if len(results) != len(batch):
            raise RuntimeError(f"model {self.name}: {len(results)} results for {len(batch)} requests")
        return results

    def _answer(self, batch: list[_Job[Item, Result]], results: Sequence[Result], here: bool = False) -> None:
        """Each request its result: ``submit``'s here, ``submit_later``'s on the reply thread
        (here too with ``here``)."""
        if self._batch_sizes is not None:
            self._batch_sizes.observe(sum(job.rows for job in batch))
        later: list[tuple[Future[Result], Result]] = []
        for job, result in zip(batch, results):
            if job.later and not here:
                later.append((job.future, result))
            else:
                job.future.set_result(result)
        if later:
            self._replier.results(later)

    def _fail(self, job: _Job[Item, Result], exc: BaseException) -> None:
        """A request its error: ``submit``'s here, ``submit_later``'s on the reply thread."""
        # the error outlives the batch (in the Future): its frames' locals, the items, do not, nor
        # those of the errors it was raised from (a CUDA error's cause holds the frame that read the
        # batch's decoded images, which must go before their stream)
        seen: set[int] = set()
        link: BaseException | None = exc
        while link is not None and id(link) not in seen:
            seen.add(id(link))
            traceback.clear_frames(link.__traceback__)
            link = link.__cause__ or link.__context__
        job.item = None  # its last step: a frame still running when cleared (``_launch``'s) keeps the batch
        if job.later:
            self._replier.error(job.future, exc)
        else:
            job.future.set_exception(exc)

    def _launch(self, batch: list[_Job[Item, Result]], began: float) -> None:
        """Start ``batch`` with ``run_batch_later``; ``_landed`` answers it when its Future is set."""
        launcher = threading.get_ident()  # a Future done already is answered as before, on the reply thread
        try:
            future = self._run_later([job.item for job in batch])  # type: ignore[misc]
            future.add_done_callback(lambda done: self._landed(
                batch, began, done, here=self._land_answers and threading.get_ident() != launcher, launcher=launcher))
        except BaseException as exc:  # noqa: BLE001 - answered like a batch that failed on its way
            failed: Future[Sequence[Result]] = Future()
            failed.set_exception(exc)
            self._landed(batch, began, failed, launcher=launcher)

    def _landed(self, batch: list[_Job[Item, Result]], began: float, done: Future[Sequence[Result]],
                here: bool = False, launcher: int | None = None) -> None:
        """A started batch's results (on the thread that set them) to its requests; a failed batch
        of several goes back to the batcher's thread, to run each request alone."""
        try:
            exc = done.exception()
            if exc is None:
                try:
                    results = self._one_each(done.result(), batch)
                except Exception as wrong:  # noqa: BLE001 - not a sequence, or not one per request
                    exc = wrong
            if exc is not None and len(batch) > 1:
                with self._cond:
                    self._alone.extend(batch)
                return
            if exc is not None:
                self._fail(batch[0], exc)
                return
            if self._batch_seconds is not None:
                self._batch_seconds.observe(time.perf_counter() - began)
            self._answer(batch, results, here=here)
        except BaseException as exc:  # noqa: BLE001 - nobody would answer them: they get the error
            log.exception("model %s: a batch's results could not be handed out", self.name)
            for job in batch:
                if not job.future.done():
                    self._fail(job, exc)
        finally:
            self._landed_one(launcher)

    def _landed_one(self, launcher: int | None = None) -> None:
        """A batch taken is done with (answered, sent back to run alone, or all of it cancelled); its
        launcher's, when that is one of several launcher threads."""
        if self._cap:
            with self._cond:
                self._in_flight -= 1
                if launcher in self._mine:
                    self._mine[launcher] -= 1
                self._cond.notify_all()


class BatchingFactory:
    """What the composition root hands the ops: whether to batch, and the metrics to report to."""

    def __init__(self, batch_sizes: Histogram | None = None, queue_seconds: Histogram | None = None,
                 batch_seconds: Histogram | None = None, concurrency: int | None = None) -> None:
        """``concurrency``, when given, is every batcher's, whatever its model's instance_count says."""
        self._batch_sizes, self._queue_seconds, self._batch_seconds = batch_sizes, queue_seconds, batch_seconds
        self._concurrency = concurrency

    def make(self, name: str, run_batch: Callable[[Sequence[Item]], Sequence[Result]], max_batch_size: int,
             max_queue_delay_us: int, concurrency: int = 1, thread_start: Callable[[], None] | None = None,
             run_batch_later: Callable[[Sequence[Item]], Future[Sequence[Result]]] | None = None,
             busy_until: Callable[[], float | None] | None = None, land_answers: bool = False,
             launchers: int = 1) -> Batcher[Item, Result]:
        return Batcher(name, run_batch, max_batch_size, max_queue_delay_us, self._batch_sizes, self._queue_seconds,
                       self._batch_seconds, self._concurrency or concurrency, thread_start, run_batch_later,
                       busy_until, land_answers, launchers)
