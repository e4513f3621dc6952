"""A new shared-memory mapping's page tables, filled ahead of its first request, in parallel.

A function registers a region and sends its first request through it a millisecond later. Left as
it is, that request would take a page fault for each 4 KiB page it touches in the shim's fresh
mapping, one after another: about 4.5 ms for a 12 MiB region on a 2-core VM, more than the GEMM
itself. ``Prefaulter.start`` asks the kernel to populate the mapping (``MADV_POPULATE_WRITE``,
Linux 5.14+, which allocates what the function has not written yet and maps every page writable
without touching its bytes) in chunks on a few threads, and returns at once: by the time the
request arrives the work is done or under way on other cores. ``wait`` must be called before the
mapping goes. The cost is memory: every page of the region becomes resident at registration (in
the shim's memory cgroup, which touches them first), also those the function never uses, so only
mappings of up to ``MAX_BYTES`` are prefaulted; a tenant's regions are bounded by ``shm_max_bytes``.
A kernel without ``MADV_POPULATE_WRITE`` turns it off (logged once); a failure of one chunk (the
object was truncated meanwhile) only leaves those pages to fault as before.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
CHUNK_BYTES = 2 << 20         # one chunk per thread at a time (a page table's span)
MAX_BYTES = 256 << 20        # larger mappings are left to fault as used (see the module docstring)


class Prefaulter:
    """Populates mappings on ``threads`` threads (made on first use)."""

    def __init__(self, threads: int = 4, chunk_bytes: int = CHUNK_BYTES, max_bytes: int = MAX_BYTES) -> None:
        if threads < 1 or chunk_bytes < 1:
            raise ValueError("a Prefaulter needs at least one thread and a positive chunk size")
        self.chunk_bytes, self.max_bytes = chunk_bytes, max_bytes
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shm-prefault")
        self._madvise = _libc_madvise()
        self._pending: dict[int, list[Future[None]]] = {}
        self._lock = threading.Lock()

    @property
    def supported(self) -> bool:
        return self._madvise is not None

    def start(self, address: int, nbytes: int) -> None:
        """Begin populating ``nbytes`` at ``address`` (page-aligned) and return."""
        if self._madvise is None or nbytes > self.max_bytes:
            return
        chunks: list[Future[None]] = []
        with self._lock:  # recorded as they go: ``wait`` sees every chunk that was submitted
            self._pending[address] = chunks
            for at in range(0, nbytes, self.chunk_bytes):
                chunks.append(self._pool.submit(self._populate, address + at, min(self.chunk_bytes, nbytes - at)))

    def wait(self, address: int) -> None:
        """Until the populating of the mapping at ``address`` (if any) is over, the chunks not begun
        dropped: before unmapping it."""
        with self._lock:
            chunks = self._pending.pop(address, [])
        for chunk in chunks:
            if not chunk.cancel():
                chunk.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _populate(self, address: int, nbytes: int) -> None:
        madvise = self._madvise
        if madvise is None or madvise(address, nbytes, MADV_POPULATE_WRITE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EINVAL and self._madvise is not None:  # kernel before 5.14
            self._madvise = None
            log.info("this kernel has no MADV_POPULATE_WRITE: shared memory regions are not prefaulted")
        else:
            log.debug("prefaulting %d bytes at %#x failed: %s", nbytes, address, errno.errorcode.get(code, code))


def _libc_madvise() -> "ctypes._CFuncPtr | None":
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise  # ctypes calls it without the GIL
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
