"""A few costly things (the CUDA backend's device workers: a stream, a cuBLAS handle, pinned buffers)
lent to threads one job at a time, first come first served."""
from __future__ import annotations

import threading
from collections import deque
from typing import Generic, Iterable, TypeVar

from accel.errors import NotReady

T = TypeVar("T")


class Lender(Generic[T]):
    """Lends its ``items`` one at a time: ``borrow`` takes an idle one, or waits its turn; ``give_back``
    hands the item to the thread that has waited longest, so a thread that borrows again at once
    cannot take it from under the others (a plain condition lets it, and a busy thread then keeps
    the items while others wait for seconds)."""

    def __init__(self, items: Iterable[T], what: str = "device worker") -> None:
        self._idle: list[T] = list(items)
        self._what = what
        self._waiting: deque[list] = deque()  # [item or None, Event] per waiting thread, oldest first
        self._lock = threading.Lock()

    def idle(self) -> int:
        """Items not lent now."""
        with self._lock:
            return len(self._idle)

    def borrow(self, timeout: float | None = None) -> T:
        """An item of the caller's until it gives it back: the one given back last when some are idle
        and nobody waits (its memory is the warmest), else the next one given back.

        Raises:
            NotReady: none came within ``timeout`` seconds (503: retry).
        """
        with self._lock:
            if self._idle and not self._waiting:
                return self._idle.pop()
            turn: list = [None, threading.Event()]
            self._waiting.append(turn)
        try:
            given = turn[1].wait(timeout)
        except BaseException:  # interrupted while waiting: an item handed to this turn goes on
            with self._lock:
                if turn[1].is_set():
                    self._pass_on(turn[0])
                else:
                    self._waiting.remove(turn)
            raise
        if given:
            return turn[0]
        with self._lock:
            if turn[1].is_set():  # given just as the wait ended
                return turn[0]
            self._waiting.remove(turn)
        raise NotReady(f"every {self._what} stayed busy for {timeout:g} s; retry", retry_after=1.0)

    def give_back(self, item: T) -> None:
        with self._lock:
            self._pass_on(item)

    def _pass_on(self, item: T) -> None:
        """To the thread that has waited longest, else idle (call holding the lock)."""
        if self._waiting:
            turn = self._waiting.popleft()
            turn[0] = item
            turn[1].set()
        else:
            self._idle.append(item)
