"""Prefaulting a new shared-memory mapping (``shim.prefault``): the pages of the object are there, with
the bytes the function wrote, before the first request touches them; failures cost nothing."""
from __future__ import annotations

import ctypes
import mmap
import os
import time

import numpy as np
import pytest

import accel
from shim.backends.cpu import CpuBackend
from shim.config import Settings
from shim.prefault import Prefaulter
from shim.service import build_shm

SIZE = 6 << 20


def _allocated(key: str) -> int:
    """Bytes of shared memory object ``key`` that tmpfs holds pages for."""
    return os.stat(f"/dev/shm/{key.lstrip('/')}").st_blocks * 512


def _address(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@pytest.fixture()
def prefaulter():
    p = Prefaulter(threads=3, chunk_bytes=1 << 20)
    if not p.supported:
        pytest.skip("no madvise here")
    yield p
    p.close()


def test_prefaulting_fills_the_mapping_and_keeps_what_was_written(prefaulter):
    with accel.SharedMemory("pf", SIZE) as region:
        head = region.array(1024, np.float32)
        head[:] = np.arange(1024)
        assert _allocated(region.key) < SIZE // 2  # only what the function wrote so far
        with open(f"/dev/shm/{region.key}", "r+b") as f, mmap.mmap(f.fileno(), SIZE) as mapping:
            address = _address(mapping)
            prefaulter.start(address, SIZE)
            deadline = time.monotonic() + 5.0
            while _allocated(region.key) < SIZE and time.monotonic() < deadline:
                time.sleep(0.01)
            prefaulter.wait(address)
            assert _allocated(region.key) >= SIZE
            view = np.frombuffer(mapping, np.float32)
            assert view[:1024].tolist() == list(range(1024)) and not view[1024:].any()
            del view
        del head


def test_a_truncated_object_fails_quietly(prefaulter):
    with accel.SharedMemory("pft", SIZE) as region:
        with open(f"/dev/shm/{region.key}", "r+b") as f, mmap.mmap(f.fileno(), SIZE) as mapping:
            os.truncate(f"/dev/shm/{region.key}", 4096)  # touching the rest now would be SIGBUS
            address = _address(mapping)
            prefaulter.start(address, SIZE)
            prefaulter.wait(address)  # no signal, no exception: those pages would fault as before
            assert _allocated(region.key) <= 8192


def test_large_mappings_are_left_alone():
    p = Prefaulter(threads=1, max_bytes=1 << 20)
    with accel.SharedMemory("pfl", SIZE) as region:
        with open(f"/dev/shm/{region.key}", "r+b") as f, mmap.mmap(f.fileno(), SIZE) as mapping:
            p.start(_address(mapping), SIZE)
            p.wait(_address(mapping))
            assert _allocated(region.key) == 0
    p.close()
    with pytest.raises(ValueError):
        Prefaulter(threads=0)


@pytest.mark.parametrize("threads", [0, 2])
def test_the_shims_regions_are_prefaulted_at_registration(threads):
    registry = build_shm(Settings(shm_prefault_threads=threads), CpuBackend())
    assert registry is not None
    with accel.SharedMemory("pfs", SIZE) as region:
        registry.register("pfs", region.key, 0, SIZE, "t")  # returns at once; the prefault goes on
        deadline = time.monotonic() + (5.0 if threads else 0.3)
        while _allocated(region.key) < SIZE and time.monotonic() < deadline:
            time.sleep(0.01)
        prefaulted = _allocated(region.key) >= SIZE
        registry.unregister("pfs", "t")  # waits for a prefault in flight (drops chunks not begun)
    registry.close()
    assert prefaulted == (threads > 0 and Prefaulter().supported)


def test_waiting_drops_the_chunks_not_begun():
    """Unregistering right after registering does not wait for a whole prefault: chunks not begun go."""
    import threading

    p = Prefaulter(threads=1, chunk_bytes=64 << 10)
    if not p.supported:
        pytest.skip("no madvise here")
    busy = threading.Event()
    blocker = p._pool.submit(busy.wait, 10)  # noqa: SLF001 - holds the one thread: no chunk can begin
    with accel.SharedMemory("pfw", SIZE) as region:
        with open(f"/dev/shm/{region.key}", "r+b") as f, mmap.mmap(f.fileno(), SIZE) as mapping:
            address = _address(mapping)
            p.start(address, SIZE)
            p.wait(address)  # at once, though the thread is busy: nothing of it had begun
            assert _allocated(region.key) == 0
    busy.set()
    blocker.result()
    p.close()
