"""Shared memory through which a request worker lends the large buffers of its link calls.

A worker's ``LinkClient`` owns one ``Arena``: a sealed memfd (it can grow, never shrink), mapped
in the worker and, once its fd has crossed the link's socket, in the device process. A large
out-of-band buffer of a call (decoded pixels, an operand) is copied into a slot of the arena, and
the message carries the slot's place instead of the bytes; the device reads the buffer where it
lies, with no socket transfer and no allocation. The worker frees the slots of a call when the
call's reply has arrived: by then the device has done with them (handlers copy what they keep).
A buffer that finds no room goes over the socket as before.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading

import numpy as np

ARENA_BYTES = 64 << 20      # per link connection; pages are only taken where slots have been used
MIN_LENT_BYTES = 32 << 10   # smaller buffers go over the socket: a slot would cost more than it saves
KEEP_BYTES = 16 << 20       # the first bytes stay resident; freed runs beyond go back to the system
_ALIGN = 64
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL

Lent = list[tuple[int, int]]  # (offset, bytes) of the slots a message took

log = logging.getLogger(__name__)


class Arena:
    """First-fit slots (64-byte aligned) of one shared mapping; thread-safe. What a burst used beyond
    the first ``keep`` bytes is given back to the system once free (a 12 MP photo takes 36 MB)."""

    @classmethod
    def or_none(cls) -> "Arena | None":
        """An arena, or None (logged) where none can be made: the link then uses its socket alone."""
        try:
            return cls()
        except OSError as exc:
            log.warning("no link arena (%s): large buffers cross the socket", exc)
            return None

    def __init__(self, size: int = ARENA_BYTES, keep: int = KEEP_BYTES) -> None:
        self.keep = keep
        self.fd = os.memfd_create("accelshim-link", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), by offset, never adjacent
        self._lock = threading.Lock()

    def lend(self, data: memoryview) -> int | None:
        """Copy ``data`` (contiguous bytes) into a free slot; its offset, or None when none fits."""
        need = _slot_bytes(data.nbytes)
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                if length >= need:
                    self._free[i:i + 1] = [(offset + need, length - need)] if length > need else []
                    break
            else:
                return None
        # numpy copies without the interpreter lock (a memoryview assignment would hold it)
        np.copyto(np.frombuffer(self._map, np.uint8, data.nbytes, offset), np.frombuffer(data, np.uint8))
        return offset

    def give_back(self, offset: int, nbytes: int) -> None:
        """Free the slot at ``offset`` that ``lend`` gave for ``nbytes`` bytes."""
        start, end = offset, offset + _slot_bytes(nbytes)
        with self._lock:
            free = self._free
            i = 0
            while i < len(free) and free[i][0] < start:
                i += 1
            if i > 0 and free[i - 1][0] + free[i - 1][1] == start:  # joins the free slot before it
                i -= 1
                start = free[i][0]
                del free[i]
            if i < len(free) and free[i][0] == end:  # and the one after it
                end += free[i][1]
                del free[i]
            free.insert(i, (start, end - start))
            low = -(-max(start, self.keep) // mmap.PAGESIZE) * mmap.PAGESIZE
            high = end // mmap.PAGESIZE * mmap.PAGESIZE
            if high - low >= 1 << 20:  # under the lock: nobody may take part of the run meanwhile
                self._map.madvise(mmap.MADV_REMOVE, low, high - low)

    def give_back_all(self, lent: Lent) -> None:
        """Free every slot of ``lent`` (what one message took)."""
        for offset, nbytes in lent:
            self.give_back(offset, nbytes)

    def free_bytes(self) -> int:
        """Bytes in free slots (all of them once every lent slot is back)."""
        with self._lock:
            return sum(length for _, length in self._free)

    def close(self) -> None:
        """Unmap and close (the worker is stopping; no call may be in flight)."""
        self._map.close()
        os.close(self.fd)


def _slot_bytes(nbytes: int) -> int:
    """The bytes a slot for ``nbytes`` takes (whole alignment units)."""
    return -(-nbytes // _ALIGN) * _ALIGN


class PeerArena:
    """The device's side: a worker's arena, mapped from the fd it sent, read where it lies."""

    def __init__(self, fd: int) -> None:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & _SEALS != _SEALS:  # an arena that could shrink could fault this process (SIGBUS)
                raise ValueError(f"the link arena is not sealed against shrinking (seals {seals:#x})")
            self.size = os.fstat(fd).st_size
            mapping = mmap.mmap(fd, self.size)
        except OSError as exc:  # not a memfd, say
            raise ValueError(f"the link arena cannot be mapped: {exc}") from None
        finally:
            os.close(fd)
        # only views hold the mapping: it is unmapped when the last of them goes (after ``close``)
        self._view: memoryview | None = memoryview(mapping)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes ``[offset, offset + nbytes)`` of the arena.

        Raises:
            ValueError: outside the arena.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"a link buffer at {offset} of {nbytes} bytes lies outside the arena "
                             f"of {self.size}")
        if self._view is None:
            raise ValueError("the link arena is closed")
        return self._view[offset:offset + nbytes]

    def close(self) -> None:
        """Let go of the mapping: unmapped now, or when the last view a call still holds goes."""
        if self._view is not None:
            self._view.release()
            self._view = None
