"""The buffer API that routes and the executor use: the store and the GPU cache kept consistent.

Every operation holds the cache's lock, the same lock a KaaS request holds while it runs, so a
``put`` never races a request that is writing the same key.
"""
from __future__ import annotations

from dataclasses import dataclass

from accel.errors import InternalError

from .cache import DeviceCache
from .metrics import KaasMetrics
from .store import DEFAULT_TENANT, BufferStore


@dataclass(frozen=True)
class BufferInfo:
    """One buffer as ``GET /v1/buffers`` lists it."""

    key: str
    size: int
    location: str   # "store", "gpu" (only on the device: a kernel output not yet written back) or "store+gpu"
    const: bool
    dirty: bool

    def as_json(self) -> dict[str, object]:
        return {"key": self.key, "size": self.size, "location": self.location, "const": self.const,
                "dirty": self.dirty}


class Buffers:
    """Put, get, delete and list buffers of a tenant, through the store and the GPU cache."""

    def __init__(self, store: BufferStore, cache: DeviceCache, metrics: KaasMetrics) -> None:
        self.store = store
        self.cache = cache
        self.lock = cache.lock
        self._metrics = metrics
        metrics.store_bytes.set(store.used_bytes())

    def put(self, key: str, data: bytes, tenant: str = DEFAULT_TENANT) -> None:
        """Store ``data``; a device copy of the old value is dropped. Raises as BufferStore.put."""
        with self.lock:
            self.store.put(key, data, tenant)
            self.cache.invalidate(tenant, key)
            self._metrics.store_bytes.set(self.store.used_bytes())

    def get(self, key: str, tenant: str = DEFAULT_TENANT) -> bytes:
        """The bytes of ``key`` (written back first if a kernel left newer ones on the device)."""
        with self.lock:
            self.store.get(key, tenant)  # OpNotFound, InvalidInput
            entry = self.cache.get(tenant, key)
            if entry is not None:
                self.cache.flush(entry)
            return self.load(key, tenant)

    def load(self, key: str, tenant: str = DEFAULT_TENANT) -> bytes:
        """The store's bytes of ``key`` (the cache's loader on a miss)."""
        data = self.store.get(key, tenant)
        if data is None:  # pending entries live in the cache until written back: a bug if not
            raise InternalError(f"buffer {key!r} is pending on the device but not in the GPU cache")
        return data

    def delete(self, key: str, tenant: str = DEFAULT_TENANT) -> None:
        with self.lock:
            self.store.get(key, tenant)
            self.cache.invalidate(tenant, key)
            self.store.delete(key, tenant)
            self._metrics.store_bytes.set(self.store.used_bytes())

    def list(self, tenant: str = DEFAULT_TENANT) -> list[BufferInfo]:
        with self.lock:
            resident = self.cache.entries(tenant)
            out = []
            for key, size, pending in self.store.keys(tenant):
                entry = resident.get(key)
                location = "gpu" if pending else "store+gpu" if entry is not None else "store"
                out.append(BufferInfo(key, size, location, bool(entry and entry.const), bool(entry and entry.dirty)))
            return out

    def flush_all(self) -> None:
        """Write every dirty device buffer back to the store."""
        with self.lock:
            self.cache.flush_all()
