"""The buffer store: named byte strings per tenant, bounded in bytes, optionally persistent.

With a ``state_dir`` every acknowledged ``put`` is on disk first (write-ahead): the bytes go to a
temporary file that is fsync'ed, renamed over ``<state_dir>/<tenant>/<key>``, and the folder is
fsync'ed, before the store (and the HTTP answer) says it is there. A restarted store reloads the
folder, so a ``kill -9`` loses no acknowledged put.

An entry may also be *pending*: a kernel output that is still only on the device (dirty in the
GPU cache); it counts against the bounds, and its bytes come when the cache writes it back.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from accel.errors import InsufficientStorage, OpNotFound

from ..names import check_name

from .model import KEY

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
_TMP = ".tmp-"

#: tenant -> its byte quota (None: only the store's bound applies); auth plugs its own in
QuotaHook = Callable[[str], "int | None"]


@dataclass(frozen=True)
class Entry:
    size: int
    data: bytes | None  # None: pending, the bytes are on the device


class BufferStore:
    """Bytes by ``(tenant, key)``.

    Args:
        capacity_bytes: the bound on all tenants' bytes together (InsufficientStorage, 507, above).
        state_dir: where to persist (None: in memory only).
        quota: per-tenant byte quota hook (InsufficientStorage, 507, above).
    """

    def __init__(self, capacity_bytes: int, state_dir: Path | None = None, quota: QuotaHook | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._quota = quota or (lambda tenant: None)
        self._entries: dict[tuple[str, str], Entry] = {}
        self._tenant_bytes: dict[str, int] = {}
        self._used = 0
        self._lock = threading.Lock()
        if self.state_dir is not None:
            self._reload()

    @property
    def persistent(self) -> bool:
        return self.state_dir is not None

    # --- reading ------------------------------------------------------------------------
    def size_of(self, key: str, tenant: str = DEFAULT_TENANT) -> int | None:
        """The size of ``key``'s value, or None when there is none (pending entries included)."""
        entry = self._entries.get((tenant, key))
        return None if entry is None else entry.size

    def get(self, key: str, tenant: str = DEFAULT_TENANT) -> bytes | None:
        """The bytes of ``key`` (None when pending on the device); raises OpNotFound when absent."""
        entry = self._entries.get((_check(tenant, "tenant"), _check(key, "key")))
        if entry is None:
            raise OpNotFound(f"no buffer {key!r}")
        return entry.data

    def keys(self, tenant: str = DEFAULT_TENANT) -> list[tuple[str, int, bool]]:
        """``(key, size, pending)`` of every buffer of ``tenant``, sorted by key."""
        with self._lock:
            return sorted((k, e.size, e.data is None) for (t, k), e in self._entries.items() if t == tenant)

    def used_bytes(self, tenant: str | None = None) -> int:
        return self._used if tenant is None else self._tenant_bytes.get(tenant, 0)

    # --- writing ------------------------------------------------------------------------
    def put(self, key: str, data: bytes, tenant: str = DEFAULT_TENANT) -> None:
        """Store ``data`` under ``key`` (durably first, with a state_dir).

        Raises:
            InvalidInput: a bad key or tenant name.
            InsufficientStorage: over the store's bound.
            InsufficientStorage: also over the tenant's quota.
        """
        self._put(_check(tenant, "tenant"), _check(key, "key"), Entry(len(data), bytes(data)))

    def put_pending(self, key: str, size: int, tenant: str = DEFAULT_TENANT) -> None:
        """Account ``size`` bytes for ``key`` whose bytes stay on the device until written back."""
        self._put(_check(tenant, "tenant"), _check(key, "key"), Entry(size, None))

    def check_room(self, sizes: dict[str, int], tenant: str = DEFAULT_TENANT) -> None:
        """Raise InsufficientStorage unless ``key -> new size`` all fit at once."""
        with self._lock:
            delta = sum(size - self._old(tenant, key) for key, size in sizes.items())
            self._check_bounds(tenant, delta)

    def delete(self, key: str, tenant: str = DEFAULT_TENANT) -> None:
        """Remove ``key`` (durably, with a state_dir); raises OpNotFound when absent."""
        item = (_check(tenant, "tenant"), _check(key, "key"))
        with self._lock:
            entry = self._entries.get(item)
            if entry is None:
                raise OpNotFound(f"no buffer {key!r}")
            if self.state_dir is not None:
                path = self._path(tenant, key)
                if path.exists():
                    path.unlink()
                    _fsync_dir(path.parent)
            del self._entries[item]
            self._account(tenant, -entry.size)

    # --- internals ----------------------------------------------------------------------
    def _put(self, tenant: str, key: str, entry: Entry) -> None:
        with self._lock:
            self._check_bounds(tenant, entry.size - self._old(tenant, key))
            if self.state_dir is not None and entry.data is not None:
                self._write(tenant, key, entry.data)
            old = self._entries.get((tenant, key))
            self._entries[(tenant, key)] = entry
            self._account(tenant, entry.size - (old.size if old else 0))

    def _old(self, tenant: str, key: str) -> int:
        old = self._entries.get((tenant, key))
        return old.size if old else 0

    def _check_bounds(self, tenant: str, delta: int) -> None:
        if delta <= 0:
            return
        if self._used + delta > self.capacity_bytes:
            raise InsufficientStorage(f"the buffer store is full: {delta} more bytes would make "
                                      f"{self._used + delta} of {self.capacity_bytes}; delete buffers first")
        quota = self._quota(tenant)
        used = self._tenant_bytes.get(tenant, 0)
        if quota is not None and used + delta > quota:
            raise InsufficientStorage(f"tenant {tenant!r} would hold {used + delta} bytes of buffers, over its "
                                      f"buffer quota of {quota}; delete buffers first")

    def _account(self, tenant: str, delta: int) -> None:
        self._used += delta
        self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + delta

    def _path(self, tenant: str, key: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / tenant / key

    def _write(self, tenant: str, key: str, data: bytes) -> None:
        path = self._path(tenant, key)
        new_dir = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        if new_dir:
            _fsync_dir(path.parent.parent)
        tmp = path.with_name(f"{_TMP}{key}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def _reload(self) -> None:
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for tenant_dir in sorted(p for p in self.state_dir.iterdir() if p.is_dir()):
            if not _valid(tenant_dir.name):
                continue
            for path in sorted(tenant_dir.iterdir()):
                if path.name.startswith(_TMP):  # a put that died before its rename: never acknowledged
                    path.unlink()
                elif path.is_file() and _valid(path.name):
                    data = path.read_bytes()
                    self._entries[(tenant_dir.name, path.name)] = Entry(len(data), data)
                    self._account(tenant_dir.name, len(data))
        if self._entries:
            log.info("buffer store: reloaded %d buffers (%d bytes) from %s", len(self._entries), self._used,
                     self.state_dir)
        if self._used > self.capacity_bytes:
            log.warning("buffer store: %d bytes reloaded, over the bound of %d; puts get 507 until some are deleted",
                        self._used, self.capacity_bytes)


def _check(name: str, what: str) -> str:
    return check_name(name, f"buffer {what}")


def _valid(name: str) -> bool:
    return bool(KEY.match(name)) and ".." not in name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
