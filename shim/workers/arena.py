"""Shared memory through which a request worker lends the large buffers of its link calls.

A worker's ``LinkClient`` owns one ``Arena``: a sealed memfd (it can grow, never shrink), mapped
in the worker and, once its fd has crossed the link's socket, in the device process. A large
out-of-band buffer of a call (decoded pixels, an operand, a JPEG's bytes) is copied into a slot of the arena, and
the message carries the slot's place instead of the bytes; the device reads the buffer where it
lies, with no socket transfer and no allocation. The worker frees the slots of a call when the
call's reply has arrived: by then the device has done with them (handlers copy what they keep).
A buffer that finds no room goes over the socket as before.

The arena's first ``keep`` bytes are never given back to the system, so the device process may
pin them (``PeerArena``'s ``pin``: the CUDA backend registers them for DMA): pixels that lie there
go to the GPU straight from the arena, with no staging copy. The device unpins them only once no
view of the arena is left (a gone worker's calls may still be running).
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
import weakref
from typing import Callable

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
    def or_none(cls, pinned: bool = False) -> "Arena | None":
        """An arena, or None (logged) where none can be made: the link then uses its socket alone."""
        try:
            return cls(pinned=pinned)
        except OSError as exc:
            log.warning("no link arena (%s): large buffers cross the socket", exc)
            return None

    def __init__(self, size: int = ARENA_BYTES, keep: int = KEEP_BYTES, pinned: bool = False) -> None:
        """``pinned``: offered to the device for pinning its kept bytes (``LinkClient``): then no
        slot straddles their end."""
        self.keep = min(keep, size) // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages: what the device may pin
        self.pinned = pinned
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
        """Copy ``data`` (contiguous bytes) into a free slot; its offset, or None when none fits.

        In a ``pinned`` arena no slot straddles the end of the kept bytes: the device pins them, and
        CUDA refuses a copy that starts in pinned memory and runs past it."""
        need = _slot_bytes(data.nbytes)
        bound = self.keep if self.pinned else 0
        with self._lock:
            for i, (offset, length) in enumerate(self._free):
                start = bound if offset < bound < offset + need else offset
                end = offset + length
                if start + need <= end:  # what is left of the run on either side stays free
                    self._free[i:i + 1] = [(a, b - a) for a, b in ((offset, start), (start + need, end)) if b > a]
                    break
            else:
                return None
        # numpy copies without the interpreter lock (a memoryview assignment would hold it)
        np.copyto(np.frombuffer(self._map, np.uint8, data.nbytes, start), np.frombuffer(data, np.uint8))
        return start

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
    """The device's side: a worker's arena, mapped from the fd it sent, read where it lies.

    With ``pin`` and ``unpin``, its first ``keep`` bytes (those the worker never gives back to the system) are
    pinned at once, ``pin(address, nbytes)``, and unpinned, ``unpin(address)``, once the arena is
    closed and no view of it is left, before the mapping goes. A view is a slice of one uint8 array
    of the whole arena, which every array made from it (what unpickling builds) keeps alive: that
    array going is the sign that the last view went (one finalizer per arena, none per view).
    """

    def __init__(self, fd: int, keep: int = 0, pin: Callable[[int, int], None] | None = None,
                 unpin: Callable[[int], None] | None = None) -> None:
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
        # mapped while this holds it (until unpinned) or a view does: unmapped when the last goes
        self._mapping: mmap.mmap | None = mapping
        self._whole: np.ndarray | None = np.frombuffer(memoryview(mapping), np.uint8)
        self.address = self._whole.ctypes.data
        self.pinned = min(max(keep, 0), self.size) // mmap.PAGESIZE * mmap.PAGESIZE if pin and unpin else 0
        self._unpin = unpin
        self._closing = threading.Lock()  # one ``close`` lets go
        if self.pinned:
            try:
                pin(self.address, self.pinned)  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - the arena still serves, read through staging copies
                log.warning("could not pin a request worker's link arena", exc_info=True)
                self.pinned = 0

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes ``[offset, offset + nbytes)`` of the arena, as a uint8 array.

        Raises:
            ValueError: outside the arena, or the arena closed.
        """
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"a link buffer at {offset} of {nbytes} bytes lies outside the arena "
                             f"of {self.size}")
        whole = self._whole
        if whole is None:
            raise ValueError("the link arena is closed")
        return whole[offset:offset + nbytes]

    def close(self) -> None:
        """Let go of the mapping: unpinned and unmapped now, or once the last view a call still
        holds goes (then on a thread of its own: the collector may run anywhere, inside locks that
        ``unpin`` takes)."""
        with self._closing:
            whole, self._whole = self._whole, None
        if whole is None:
            return
        last = weakref.ref(whole)
        del whole  # the array goes now if no view holds it
        whole = last()
        if whole is None:
            self._release()
            return
        weakref.finalize(whole, self._released_later).atexit = False

    def _released_later(self) -> None:
        """Unpin and unmap on a thread of its own; where none can start, here, rather than pinned and
        mapped for good (should this thread hold a lock ``unpin`` takes, it then waits for good: a
        process out of threads is in trouble already)."""
        try:
            threading.Thread(target=self._release, name="arena-unpin", daemon=True).start()
        except RuntimeError:
            self._release()

    def _release(self) -> None:
        """Unpin (the mapping is still there: this holds it), then let the mapping go."""
        pinned, self.pinned = self.pinned, 0
        try:
            if pinned and self._unpin is not None:
                self._unpin(self.address)
        except Exception:  # noqa: BLE001 - logged: the arena goes anyway
            log.warning("could not unpin a request worker's link arena", exc_info=True)
        finally:
            self._mapping = None
