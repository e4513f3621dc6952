"""System shared memory regions (Triton's ``system_shared_memory`` extension): the registry.

A caller on the same host creates a POSIX shared memory object (``/dev/shm/<key>``), registers
``byte_size`` bytes of it at ``offset`` under a region name, and then names the region in the
``parameters`` of infer inputs and outputs instead of sending their bytes over HTTP. The shim maps
each region once, at registration, and hands out memoryviews of the mapping.

Safety: the key is one strict name (no path), resolved in one directory (``shm_dir``, per tenant
when ``tenant_dirs``), opened with ``O_NOFOLLOW`` and accepted only as a regular file large enough
for ``offset + byte_size``. Region names are per tenant: a tenant never sees another's regions.
Each tenant holds at most ``max_regions`` regions and ``max_bytes`` mapped bytes.

Hook for a device backend (e.g. the CUDA backend pinning regions with ``cudaHostRegister`` so that
uploads from them are DMA): the composition root passes ``on_register(address, nbytes)`` and
``on_unregister(address, nbytes)``. ``address`` is the first byte of the mapping (page-aligned;
the region itself starts ``offset % PAGESIZE`` bytes later) and ``nbytes`` its length; both
callbacks get exactly the same pair for one mapping. ``on_register`` runs before the region can
be used (an exception from it fails the registration, 507); ``on_unregister`` runs once no request
uses the region any more, just before it is unmapped. Neither runs under the registry's lock.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from accel.errors import AccelError, InsufficientStorage, InvalidInput, NotReady, OpNotFound, QuotaExceeded

from .names import check_name

log = logging.getLogger(__name__)

KEY = re.compile(r"/?[A-Za-z0-9_.-]{1,200}")
#: (address of the mapping's first byte, length of the mapping)
MappingHook = Callable[[int, int], None]


@dataclass
class Region:
    """One registered region: the mapping of ``byte_size`` bytes at ``offset`` of object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    tenant: str
    _map: mmap.mmap = field(repr=False)
    _start: int = field(repr=False)        # where the region begins in the mapping (offset % page)
    _fd: int = field(repr=False)           # kept open to see a truncation before touching the pages
    address: int = field(repr=False, default=0)
    users: int = field(repr=False, default=0)
    removed: bool = field(repr=False, default=False)

    @property
    def mapped_bytes(self) -> int:
        return len(self._map)

    def status(self) -> dict[str, object]:
        """The region as the status endpoints show it (Triton's ``name``/``key``/``offset``/``byte_size``)."""
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SharedMemoryRegistry:
    """Regions by tenant and name; thread-safe.

    Args:
        shm_dir: where keys resolve (``/dev/shm``).
        max_regions: regions per tenant (429 above).
        max_bytes: mapped bytes per tenant (507 above).
        tenant_dirs: resolve a tenant's keys in ``shm_dir/<tenant>/`` instead (a tenant can only name
            objects that its own functions can create there; see docs/shared-memory.md).
        on_register, on_unregister: the device backend's hook (see the module docstring).
    """

    def __init__(self, shm_dir: Path = Path("/dev/shm"), *, max_regions: int = 64, max_bytes: int = 1 << 32,
                 tenant_dirs: bool = False, on_register: MappingHook | None = None,
                 on_unregister: MappingHook | None = None) -> None:
        self.shm_dir = Path(shm_dir)
        self.max_regions, self.max_bytes, self.tenant_dirs = max_regions, max_bytes, tenant_dirs
        self.on_register, self.on_unregister = on_register, on_unregister
        self._regions: dict[tuple[str, str], Region] = {}
        self._pending: dict[tuple[str, str], Region] = {}  # mapped, the backend not yet told
        self._lock = threading.Lock()

    # --- register / unregister --------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int, tenant: str) -> Region:
        """Map ``byte_size`` bytes at ``offset`` of shared memory object ``key`` as region ``name``.

        Raises:
            InvalidInput: a bad name, key, offset or size; no such object; out of its bounds; the name
                is taken (as Triton, 400).
            QuotaExceeded: the tenant holds ``max_regions`` regions already (429).
            InsufficientStorage: over the tenant's ``max_bytes`` (507), or the backend hook refused it.
        """
        check_name(name, "shared memory region name")
        for what, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"shared memory region {name!r}: {what} must be a non-negative integer, "
                                   f"got {value!r}")
        if byte_size == 0:
            raise InvalidInput(f"shared memory region {name!r}: byte_size must be at least 1")
        path = self._path(key, tenant)
        region = self._map(name, key, path, offset, byte_size, tenant)  # first: a bad key is a 400, whatever else
        with self._lock:
            try:
                self._check_room(name, byte_size, tenant)
            except AccelError:
                self._finish(region, registered=False)
                raise
            self._pending[(tenant, name)] = region  # counted, not yet usable
        try:
            if self.on_register is not None:
                self.on_register(region.address, region.mapped_bytes)
        except Exception as exc:
            with self._lock:
                del self._pending[(tenant, name)]
            self._finish(region, registered=False)
            log.warning("the backend refused shared memory region %r: %s", name, exc)
            raise InsufficientStorage(f"shared memory region {name!r} cannot be used by the device: {exc}") from None
        with self._lock:
            self._regions[(tenant, name)] = self._pending.pop((tenant, name))
        return region

    def ensure(self, name: str, key: str, offset: int, byte_size: int, tenant: str) -> Region:
        """Region ``name`` registered just so, pinned for the caller (``release`` it): registered now
        unless it already is (what an infer request that names its region's object asks). Checked
        and pinned in one step, so the request uses the object it named, whoever takes the name over
        meanwhile.

        Raises:
            What ``register`` raises; InvalidInput (400) when the name is registered otherwise (another
            key, offset or size) or its object was truncated; NotReady (503) while another request is
            registering it.
        """
        region = self._pin_if_same(name, key, offset, byte_size, tenant)
        if region is not None:
            return region
        try:
            self.register(name, key, offset, byte_size, tenant)
        except InvalidInput as exc:  # another request registered the name meanwhile: judged as if it came first
            if "already registered" not in exc.message:
                raise
        region = self._pin_if_same(name, key, offset, byte_size, tenant)
        if region is None:
            raise NotReady(f"shared memory region {name!r} was unregistered while this request registered it; retry")
        return region

    def _pin_if_same(self, name: str, key: str, offset: int, byte_size: int, tenant: str) -> Region | None:
        """Region ``name``, pinned, if it is registered just so, the very object ``key`` names now
        (None: not registered)."""
        with self._lock:
            known = self._regions.get((tenant, name))
            if known is None:
                if (tenant, name) in self._pending:
                    raise NotReady(f"shared memory region {name!r} is being registered by another request; retry")
                return None
            same_key = isinstance(key, str) and known.key.lstrip("/") == key.lstrip("/")
            if not same_key or (known.offset, known.byte_size) != (offset, byte_size):
                raise InvalidInput(f"shared memory region {name!r} is already registered, with another key, "
                                   "offset or size; unregister it first")
            known.users += 1
        # the key may name a new object now (the old one unlinked, another made under its name)
        return self._whole(known, f"shared memory region {name!r}", self._path(key, tenant))

    def unregister(self, name: str | None, tenant: str) -> list[str]:
        """Unregister region ``name`` of ``tenant`` (None: all its regions); the names unregistered.

        An unknown name is no error (as in Triton). A region in use by a request is unmapped when
        that request ends.
        """
        with self._lock:
            keys = [k for k in self._regions if k[0] == tenant and (name is None or k[1] == name)]
            regions = [self._regions.pop(k) for k in keys]
            finished = []
            for region in regions:
                region.removed = True
                if region.users == 0:
                    finished.append(region)
        for region in finished:
            self._finish(region)
        return [r.name for r in regions]

    def close(self) -> None:
        """Unregister every region of every tenant (the shim is stopping)."""
        for tenant in {t for t, _ in list(self._regions)}:
            self.unregister(None, tenant)

    # --- lookup -----------------------------------------------------------------------------
    def status(self, name: str | None, tenant: str) -> list[dict[str, object]]:
        """The status of region ``name`` (None: of all the tenant's regions).

        Raises:
            OpNotFound: no region ``name`` for this tenant (404, as Triton's NOT_FOUND).
        """
        with self._lock:
            if name is None:
                return [r.status() for (t, _), r in sorted(self._regions.items()) if t == tenant]
            return [self._get(name, tenant).status()]

    def usage(self, tenant: str) -> tuple[int, int]:
        """(regions, mapped bytes) that ``tenant`` holds."""
        with self._lock:
            mine = [r for (t, _), r in self._regions.items() if t == tenant]
            return len(mine), sum(r.byte_size for r in mine)

    def pin(self, name: str, tenant: str, tensor: str) -> Region:
        """Region ``name``, kept mapped until ``release``: one request's use of it.

        Raises:
            OpNotFound: no such region for this tenant (404, as Triton's NOT_FOUND); ``tensor`` is named.
        """
        with self._lock:
            region = self._regions.get((tenant, name))
            if region is None:
                raise OpNotFound(f"tensor {tensor!r}: no shared memory region {name!r} is registered")
            region.users += 1
        return self._whole(region, f"tensor {tensor!r}: shared memory region {name!r}")

    def _whole(self, region: Region, what: str, path: Path | None = None) -> Region:
        """``region`` (pinned by the caller) if its object still holds it all (and, given ``path``, is
        the object ``path`` names); else released, InvalidInput."""
        try:
            held = os.fstat(region._fd)
            size = held.st_size
        except OSError:
            held, size = None, -1
        if path is not None:
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if held is None or now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                self.release(region)
                raise InvalidInput(f"{what} is already registered, with another object under key {region.key!r} "
                                   "(the one it mapped was unlinked); unregister it first")
        if size < region.offset + region.byte_size:
            # touching pages past the end of a shrunk object is SIGBUS: the whole shim would die
            self.release(region)
            raise InvalidInput(f"{what} is no longer usable: its object {region.key!r} was truncated to {size} bytes")
        return region

    def release(self, region: Region) -> None:
        """End one use of ``region`` (from ``pin``)."""
        with self._lock:
            region.users -= 1
            done = region.removed and region.users == 0
        if done:
            self._finish(region)

    @staticmethod
    def view(region: Region, offset: int, nbytes: int, tensor: str) -> memoryview:
        """Bytes ``[offset, offset + nbytes)`` of a pinned ``region`` (writable).

        Raises:
            InvalidInput: outside the region; the message names ``tensor``.
        """
        if offset < 0 or nbytes < 0 or offset > region.byte_size or nbytes > region.byte_size - offset:
            raise InvalidInput(f"tensor {tensor!r}: shared_memory_offset {offset} + shared_memory_byte_size {nbytes} "
                               f"is outside region {region.name!r} of {region.byte_size} bytes")
        start = region._start + offset
        return memoryview(region._map)[start:start + nbytes]

    def regions(self) -> Iterator[Region]:
        """Every registered region (a snapshot), e.g. for a backend that starts after registrations."""
        with self._lock:
            return iter(list(self._regions.values()))

    # --- internals --------------------------------------------------------------------------
    def _get(self, name: str, tenant: str) -> Region:
        region = self._regions.get((tenant, name))
        if region is None:
            raise OpNotFound(f"Unable to find system shared memory region: {name!r}")
        return region

    def _check_room(self, name: str, byte_size: int, tenant: str) -> None:
        if (tenant, name) in self._regions or (tenant, name) in self._pending:
            raise InvalidInput(f"shared memory region {name!r} is already registered; unregister it first")
        mine = [r for (t, _), r in [*self._regions.items(), *self._pending.items()] if t == tenant]
        if len(mine) >= self.max_regions:
            raise QuotaExceeded(f"tenant {tenant!r} holds {len(mine)} shared memory regions, the most it may; "
                                "unregister some first")
        held = sum(r.byte_size for r in mine)
        if held + byte_size > self.max_bytes:
            raise InsufficientStorage(f"shared memory region {name!r} of {byte_size} bytes would take tenant "
                                      f"{tenant!r} to {held + byte_size} mapped bytes, over its limit of {self.max_bytes}")

    def _path(self, key: str, tenant: str) -> Path:
        """The file of ``key``: a bare name in the tenant's directory, never a path."""
        if not isinstance(key, str) or not KEY.fullmatch(key) or ".." in key or key.lstrip("/") in (".",):
            shown = key[:80] if isinstance(key, str) else key
            raise InvalidInput(f"invalid shared memory key {shown!r}: use '/' then 1 to 200 of A-Z a-z 0-9 _ . - "
                               "(a POSIX shared memory name, no other '/', no '..')")
        base = self.shm_dir / check_name(tenant, "tenant") if self.tenant_dirs else self.shm_dir
        return base / key.lstrip("/")

    def _map(self, name: str, key: str, path: Path, offset: int, byte_size: int, tenant: str) -> Region:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise InvalidInput(f"unable to open shared memory key {key!r} for region {name!r}: "
                               f"{exc.strerror or exc}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"shared memory key {key!r} is not a shared memory object")
            if offset > info.st_size or byte_size > info.st_size - offset:
                raise InvalidInput(f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is "
                                   f"past the end of key {key!r} ({info.st_size} bytes)")
            start = offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapping = mmap.mmap(fd, start + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                    offset=offset - start)
            except (OSError, ValueError, OverflowError) as exc:
                raise InvalidInput(f"unable to map shared memory region {name!r}: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        anchor = ctypes.c_char.from_buffer(mapping)
        address = ctypes.addressof(anchor)
        del anchor  # an exported buffer would keep the mapping from ever closing
        return Region(name, key, offset, byte_size, tenant, mapping, start, fd, address)

    def _finish(self, region: Region, registered: bool = True) -> None:
        """Unmap a region that is unregistered and unused (telling the backend first, if it was told of it)."""
        if registered and self.on_unregister is not None:
            try:
                self.on_unregister(region.address, region.mapped_bytes)
            except Exception:  # the region goes anyway; the backend logs its own trouble
                log.exception("on_unregister failed for shared memory region %r", region.name)
        os.close(region._fd)
        try:
            region._map.close()
        except BufferError:  # a view still lives (a response being written): unmapped when it is collected
            log.debug("shared memory region %r is unmapped when its last view goes", region.name)
