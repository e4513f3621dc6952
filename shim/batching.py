"""Dynamic batching: concurrent requests for one model coalesced into one run on the device.

A request ``submit``s its item (``rows`` rows: images, or a tensor's batch axis) and waits, or
``submit_later``s it and gets a Future. The batcher's threads take batches from its queue
(``batch_queue``: which requests go together, and how long a batch waits for requests on their
way) and run them; the results are split back out per request (``batch_answers``). If a batch of
several fails, each of its requests runs again alone, so that one request's failure fails that
request only.

With ``run_batch_later`` (a request worker's batchers: the device call goes over the link; a GPU
pipeline's, queued on a bound stream) a batch is only started: its results come in a Future and are
split back out on the thread that sets it (the link's reader, a landing thread).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from prometheus_client import Histogram

from .batch_answers import Answers
from .batch_queue import BatchQueue, Job

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
START_TIMEOUT_S = 120.0  # per thread, for its ``thread_start`` (a CUDA stream, the model's sessions captured on it)
QUEUE_BUCKETS = (.00005, .0001, .00025, .0005, .001, .002, .005, .01, .025, .05, .1)


class Batcher(Generic[Item, Result]):
    """Coalesces concurrent ``submit`` calls into calls of ``run_batch(items) -> results``.

    Args:
        name: the model's name (metrics label, thread name).
        run_batch: runs items of several requests together; returns one result per item.
        max_batch_size: rows per batch (a larger single request runs alone).
        max_queue_delay_us: how long the oldest request may wait for others on their way.
        batch_sizes, queue_seconds, batch_seconds: histograms (label ``op``) of rows per run, time
            queued and time per run.
        concurrency: batches that may run at once (worker threads, as Triton's model instances; with
            ``run_batch_later``, batches on their way at once).
        thread_start: run first on each worker thread (its failure is logged; the thread goes on):
            a GPU pipeline binding it to a CUDA stream of its own and to sessions captured on it, so
            that a batch runs where it was gathered.
        run_batch_later: starts a batch and returns at once, its results to come in a Future; given,
            it runs every batch and ``run_batch`` (its blocking twin) is not called. Without
            ``thread_start`` it may be called from a request's thread too: the last request
            expected starts the batch on its own thread (``BatchQueue.put``).
        launchers: with ``run_batch_later`` and ``thread_start``, the threads that start batches
            (a model's ``instance_count`` on the GPU: each bound to a stream, a JPEG decoder and
            captured sessions of its own), taking turns to gather, each keeping to its share of
            ``concurrency``; else unused (without ``run_batch_later``, ``concurrency`` threads run
            the batches; without ``thread_start``, one thread starts them). On the H200 two were
            about 8% slower than one at 32 clients (bench/results/NOTES.md, seventeenth session).
        busy_until: called on the gathering thread while other batches are in flight: the
            ``time.perf_counter()`` until which a batch started now would only wait behind them
            (None: no estimate); a batch with nobody else announced waits for more until then.
        land_answers: ``submit_later``'s results of a batch started with ``run_batch_later`` are set
            where its Future is (a GPU pipeline's landing thread, where callbacks that never block
            hold up nothing else: one hand-off between threads fewer per batch, each 0.3-0.75 ms on
            the H200 hosts), not on the reply thread (a Future done already at the start still
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
        self._land_answers = land_answers
        threads = concurrency if run_batch_later is None else launchers if thread_start is not None else 1
        self._queue: BatchQueue[Item, Result] = BatchQueue(
            name, max_batch_size, self.max_delay, cap=max(concurrency, threads) if run_batch_later is not None else 0,
            threads=threads, start_anywhere=run_batch_later is not None and thread_start is None,
            busy_until=busy_until)
        self._queue_seconds = queue_seconds.labels(name) if queue_seconds is not None else None
        self._batch_seconds = batch_seconds.labels(name) if batch_seconds is not None else None
        self._answers: Answers[Item, Result] = Answers(
            name, batch_sizes.labels(name) if batch_sizes is not None else None)
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
        announced = self._queue.announce()

        def submit(item: Item, rows: int) -> Result:
            return self._submit(item, rows, announced)

        try:
            yield submit
        finally:
            self._queue.withdraw(announced)

    def submit(self, item: Item, rows: int) -> Result:
        """Queue ``item`` and wait for its result; raises what running it raised."""
        return self._submit(item, rows, [None])

    def submit_later(self, item: Item, rows: int) -> Future[Result]:
        """Queue ``item``; its result (or what running it raised) comes in the Future returned, set
        on the batcher's reply thread (with ``land_answers``, where its batch lands)."""
        return self._queued(item, rows, [None], later=True).future

    def _submit(self, item: Item, rows: int, announced: list[int | None]) -> Result:
        return self._queued(item, rows, announced).future.result()

    def _queued(self, item: Item, rows: int, announced: list[int | None], later: bool = False) -> Job[Item, Result]:
        job, batch = self._queue.put(item, rows, announced, later)
        if batch is not None:
            self._start_here(batch)
        return job

    def _start_here(self, batch: list[Job[Item, Result]]) -> None:
        """Start ``batch`` (``put``'s) on this thread; should that fail, its requests get the error."""
        began = time.perf_counter()
        try:
            started = self._begin(batch, began)
        except BaseException as exc:  # noqa: BLE001 - nobody else would answer them
            self._answers.fail_unanswered(batch, exc)
            self._queue.done_with()
            raise
        if started:
            self._launch(batch, began)

    def close(self, join: bool = True) -> None:
        self._queue.close()
        for thread in self._threads if join else ():
            thread.join(timeout=5)
        self._answers.close(join)  # after the batches' replies: those go first

    # --- the worker ---------------------------------------------------------------------------
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
        while (batch := self._queue.take()) is not None:
            began = time.perf_counter()
            rerun = len(batch) == 1 and batch[0].future.running()  # a request of a failed batch, alone
            if not rerun and not self._begin(batch, began):
                continue
            if self._run_later is not None:
                self._launch(batch, began)
                del batch  # its items go once it has landed (its Future holds it), not when this thread next gathers
                continue
            self._run(batch)
            if self._batch_seconds is not None:
                self._batch_seconds.observe(time.perf_counter() - began)
            for job in batch:  # answered: the items go now, not when this thread next gathers (a
                job.item = None  # failed job's error keeps its frame, and the batch, alive)
            del batch

    def _begin(self, batch: list[Job[Item, Result]], began: float) -> bool:
        """Marks a batch's jobs running (dropping the cancelled ones, in place) and observes their
        time queued; False if none is left (the batch is then done with)."""
        batch[:] = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not batch:
            self._queue.done_with(threading.get_ident())
            return False
        if self._queue_seconds is not None:
            try:
                for job in batch:
                    self._queue_seconds.observe(began - job.arrived)
            except Exception:  # noqa: BLE001 - the batch still runs (here, on a request's thread too)
                log.exception("model %s: the time queued could not be observed", self.name)
        return True

    def _run(self, batch: list[Job[Item, Result]]) -> None:
        try:
            results = self._answers.one_each(self._run_batch([job.item for job in batch]), batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the callers
            if len(batch) > 1:
                for job in batch:  # isolate: only the requests that fail alone get an error
                    self._run([job])
                return
            self._answers.fail(batch[0], exc)
            return
        self._answers.answer(batch, results)

    # --- batches answered later (``run_batch_later``) -----------------------------------------
    def _launch(self, batch: list[Job[Item, Result]], began: float) -> None:
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

    def _landed(self, batch: list[Job[Item, Result]], began: float, done: Future[Sequence[Result]],
                here: bool = False, launcher: int | None = None) -> None:
        """A started batch's results (on the thread that set them) to its requests; a failed batch
        of several goes back to the batcher's threads, to run each request alone."""
        try:
            exc = done.exception()
            if exc is None:
                try:
                    results = self._answers.one_each(done.result(), batch)
                except Exception as wrong:  # noqa: BLE001 - not a sequence, or not one per request
                    exc = wrong
            if exc is not None and len(batch) > 1:
                self._queue.rerun_alone(batch)
                return
            if exc is not None:
                self._answers.fail(batch[0], exc)
                return
            if self._batch_seconds is not None:
                self._batch_seconds.observe(time.perf_counter() - began)
            self._answers.answer(batch, results, here=here)
        except BaseException as exc:  # noqa: BLE001 - nobody would answer them: they get the error
            log.exception("model %s: a batch's results could not be handed out", self.name)
            self._answers.fail_unanswered(batch, exc)
        finally:
            self._queue.done_with(launcher)


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
