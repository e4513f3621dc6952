"""Future helpers: results set on a thread of their own (``Replier``), a Future mapped (``then``),
and several as one (``gathered``)."""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Sequence, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class _Failed:
    """An error on its way to the replier's thread."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Replier:
    """Sets Futures' results (or errors) on a thread of its own, so that their callbacks (a reply
    over the link, say) run there, bundle by bundle in the order given, and never on the thread
    that hands them over."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Sequence[tuple[Future[Any], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def results(self, pairs: Sequence[tuple[Future[Any], Any]]) -> None:
        """Each Future of ``pairs`` its result."""
        self._queue.put(pairs)

    def error(self, future: Future[Any], exc: BaseException) -> None:
        self._queue.put([(future, _Failed(exc))])

    def close(self, join: bool = True) -> None:
        """Ends the thread once what was handed over before is set."""
        self._queue.put(None)
        if join:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while (pairs := self._queue.get()) is not None:
            for future, result in pairs:
                try:
                    if isinstance(result, _Failed):
                        future.set_exception(result.error)
                    else:
                        future.set_result(result)
                except Exception:  # noqa: BLE001 - Future logs its callbacks' errors; this is anything else
                    log.exception("%s: a result could not be set", self.name)
            del pairs


def then(future: Future[In], fn: Callable[[In], Out]) -> Future[Out]:
    """A Future of ``fn`` of ``future``'s result (or of its error), set on the thread that sets
    ``future``."""
    out: Future[Out] = Future()
    out.set_running_or_notify_cancel()

    def done(got: Future[In]) -> None:
        try:
            out.set_result(fn(got.result()))
        except BaseException as exc:  # noqa: BLE001 - carried to whoever waits for ``out``
            out.set_exception(exc)

    future.add_done_callback(done)
    return out


def gathered(futures: Sequence[Future[In]]) -> Future[list[In]]:
    """A Future of ``futures``' results in order, set on the thread that sets the last of them; once
    all are done, the first one's error (in order) if any failed (CancelledError for a cancelled one)."""
    out: Future[list[In]] = Future()
    out.set_running_or_notify_cancel()
    left = [len(futures)]
    lock = threading.Lock()

    def done(_: Future[In]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        error = next((CancelledError() if f.cancelled() else f.exception() for f in futures
                      if f.cancelled() or f.exception() is not None), None)
        if error is not None:
            out.set_exception(error)
        else:
            out.set_result([f.result() for f in futures])

    if not futures:
        out.set_result([])
    for future in futures:
        future.add_done_callback(done)
    return out
