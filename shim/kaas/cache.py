"""The GPU-resident buffer cache in front of the buffer store.

LRU over whole store objects, keyed by ``(tenant, key)``, bounded in bytes. ``const`` entries are
evicted only when no other entry can go, and are shared by every request that names them. Dirty
entries (kernel outputs not yet in the store) are written back when evicted. Entries a request
uses are pinned until it ends. Temporaries of a request reserve room here too, since they occupy
the same device memory.

Not thread-safe on its own: the caller (:class:`~shim.kaas.buffers.Buffers`) holds ``lock``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from accel.errors import InsufficientStorage

from .metrics import KaasMetrics


class DeviceMemory(Protocol):
    """What the cache needs of a kernel runner's device memory (device arrays are uint8)."""

    def upload(self, data: bytes) -> Any: ...

    def download(self, buf: Any) -> bytes: ...

    def alloc(self, size: int) -> Any: ...


@dataclass(eq=False)
class CacheEntry:
    tenant: str
    key: str
    buf: Any
    size: int
    const: bool = False
    dirty: bool = False
    pins: int = 0

    @property
    def kind(self) -> str:
        return "const" if self.const else "regular"


class DeviceCache:
    """Device copies of store objects.

    Args:
        memory: the runner's device memory.
        capacity_bytes: the bound on resident entries plus reservations.
        writeback: ``(tenant, key, data)`` -> the store; called for dirty entries leaving the cache.
        metrics: hit/miss/eviction counters and the resident-bytes gauge.
    """

    def __init__(self, memory: DeviceMemory, capacity_bytes: int,
                 writeback: Callable[[str, str, bytes], None], metrics: KaasMetrics) -> None:
        self.memory = memory
        self.capacity_bytes = capacity_bytes
        self._writeback = writeback
        self._metrics = metrics
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()
        self._used = 0
        self._reserved = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.RLock()

    # --- lookups ------------------------------------------------------------------------
    def get(self, tenant: str, key: str) -> CacheEntry | None:
        return self._entries.get((tenant, key))

    def entries(self, tenant: str) -> dict[str, CacheEntry]:
        return {k: e for (t, k), e in self._entries.items() if t == tenant}

    @property
    def used_bytes(self) -> int:
        return self._used + self._reserved

    # --- a request's buffers ------------------------------------------------------------
    def acquire(self, tenant: str, key: str, load: Callable[[], bytes], const: bool) -> CacheEntry:
        """The pinned device copy of ``key``, uploaded from ``load()`` on a miss.

        Raises:
            InsufficientStorage: it cannot fit beside the pinned entries.
        """
        entry = self._entries.get((tenant, key))
        if entry is not None:
            self._entries.move_to_end((tenant, key))
            self.hits += 1
            self._metrics.cache_hits.labels("const" if const else "regular").inc()
        else:
            self.misses += 1
            self._metrics.cache_misses.labels("const" if const else "regular").inc()
            data = load()
            self._make_room(len(data))
            entry = CacheEntry(tenant, key, self.memory.upload(data), len(data))
            self._entries[(tenant, key)] = entry
            self._used += entry.size
        entry.const = const
        entry.pins += 1
        self._gauge()
        return entry

    def install(self, tenant: str, key: str, buf: Any, size: int) -> CacheEntry:
        """Make ``buf`` (allocated under a :meth:`reserve`) the dirty, pinned copy of ``key``."""
        old = self._entries.pop((tenant, key), None)
        if old is not None:
            self._used -= old.size
        self._reserved -= size
        entry = CacheEntry(tenant, key, buf, size, dirty=True, pins=1)
        self._entries[(tenant, key)] = entry
        self._used += size
        self._gauge()
        return entry

    def release(self, entry: CacheEntry) -> None:
        entry.pins -= 1

    def reserve(self, size: int) -> None:
        """Room for ``size`` bytes of temporaries or new outputs; raises InsufficientStorage."""
        self._make_room(size)
        self._reserved += size
        self._gauge()

    def unreserve(self, size: int) -> None:
        self._reserved -= size
        self._gauge()

    # --- consistency with the store ------------------------------------------------------
    def flush(self, entry: CacheEntry) -> None:
        """Write a dirty entry back to the store; it stays resident, clean."""
        if entry.dirty:
            self._writeback(entry.tenant, entry.key, self.memory.download(entry.buf))
            entry.dirty = False
            self._metrics.writebacks.inc()

    def flush_all(self) -> None:
        for entry in list(self._entries.values()):
            self.flush(entry)

    def invalidate(self, tenant: str, key: str) -> None:
        """Drop the device copy of ``key`` without writing it back (the store has newer bytes)."""
        entry = self._entries.pop((tenant, key), None)
        if entry is not None:
            self._used -= entry.size
            self._gauge()

    # --- eviction -----------------------------------------------------------------------
    def _make_room(self, size: int) -> None:
        if size > self.capacity_bytes:
            raise InsufficientStorage(f"a buffer of {size} bytes is larger than the GPU cache "
                                      f"({self.capacity_bytes} bytes)")
        while self.used_bytes + size > self.capacity_bytes:
            victim = self._victim()
            if victim is None:
                raise InsufficientStorage(
                    f"the GPU cache cannot fit {size} more bytes: {self.used_bytes} of {self.capacity_bytes} "
                    "are in use by this request's buffers")
            self.flush(victim)
            del self._entries[(victim.tenant, victim.key)]
            self._used -= victim.size
            self.evictions += 1
            self._metrics.cache_evictions.labels(victim.kind).inc()

    def _victim(self) -> CacheEntry | None:
        """The least recently used unpinned entry, non-const ones first."""
        fallback = None
        for entry in self._entries.values():
            if entry.pins:
                continue
            if not entry.const:
                return entry
            fallback = fallback or entry
        return fallback

    def _gauge(self) -> None:
        self._metrics.cache_bytes.set(self.used_bytes)
