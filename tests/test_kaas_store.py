"""The buffer store (bounds, tenants, persistence) and the GPU cache (LRU, const, dirty, pins)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from accel.errors import InsufficientStorage, InvalidInput, OpNotFound
from shim.kaas import BufferStore
from tests.conftest import ROOT
from tests.kaas_util import buf, jacobi_request, jacobi_system, kernel, new_kaas


# --- the store ----------------------------------------------------------------------------------
def test_round_trip_list_and_delete():
    store = BufferStore(1000)
    store.put("a", b"hello")
    store.put("b.2", b"")
    assert store.get("a") == b"hello" and store.get("b.2") == b""
    assert store.keys() == [("a", 5, False), ("b.2", 0, False)] and store.used_bytes() == 5
    store.put("a", b"hi")
    assert store.used_bytes() == 2
    store.delete("a")
    with pytest.raises(OpNotFound):
        store.get("a")
    with pytest.raises(OpNotFound):
        store.delete("a")


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden", "x" * 129, "a..b", "-a"])
def test_invalid_keys_are_400(key):
    with pytest.raises(InvalidInput):
        BufferStore(100).put(key, b"x")


def test_the_bound_is_507_and_replacing_counts_the_difference():
    store = BufferStore(10)
    store.put("a", b"x" * 6)
    with pytest.raises(InsufficientStorage, match="store is full"):
        store.put("b", b"x" * 5)
    store.put("a", b"x" * 10)  # a replacement needs only the difference
    store.delete("a")
    store.put("b", b"x" * 10)
    assert store.keys() == [("b", 10, False)]


def test_tenants_have_their_own_keys_and_quotas():
    store = BufferStore(100, quota=lambda tenant: 8 if tenant == "small" else None)
    store.put("k", b"one", tenant="alice")
    store.put("k", b"two!", tenant="small")
    assert store.get("k", tenant="alice") == b"one" and store.get("k", tenant="small") == b"two!"
    with pytest.raises(OpNotFound):
        store.get("k")  # the default tenant has none
    with pytest.raises(InsufficientStorage, match="tenant 'small'.*quota of 8"):
        store.put("k2", b"12345", tenant="small")
    store.put("k2", b"12345", tenant="alice")
    assert store.used_bytes("small") == 4 and store.used_bytes("alice") == 8 and store.used_bytes() == 12


def test_persistence_reloads_puts_and_deletes(tmp_path):
    store = BufferStore(1000, tmp_path)
    store.put("a", b"alpha")
    store.put("b", b"beta", tenant="t1")
    store.put("c", b"gamma")
    store.delete("c")
    (tmp_path / "default" / ".tmp-a.1.2").write_bytes(b"half a put")  # died before its rename
    again = BufferStore(1000, tmp_path)
    assert again.keys() == [("a", 5, False)] and again.keys("t1") == [("b", 4, False)]
    assert again.get("a") == b"alpha" and again.used_bytes() == 9
    assert not list(tmp_path.rglob(".tmp-*"))


def test_no_acknowledged_put_is_lost_to_kill_9(tmp_path):
    """A child acknowledges puts on stdout as fast as it can and is SIGKILLed mid-way."""
    code = textwrap.dedent(f"""
        import sys
        from shim.kaas.store import BufferStore
        store = BufferStore(1 << 30, {str(tmp_path)!r})
        for i in range(100000):
            store.put(f"k{{i}}", bytes([i % 256]) * (1000 + i))
            print(i, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    acked = -1
    assert child.stdout is not None
    for line in child.stdout:
        acked = int(line)
        if acked >= 30:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    store = BufferStore(1 << 30, tmp_path)
    for i in range(acked + 1):
        assert store.get(f"k{i}") == bytes([i % 256]) * (1000 + i)
    assert all(len(store.get(k)) == 1000 + int(k[1:]) for k, _, _ in store.keys())  # no torn value


def test_persistence_across_a_rebuilt_service(tmp_path):
    n = 24
    a, b = jacobi_system(n)
    kaas = new_kaas("cpu", state_dir=tmp_path)
    for key, v in (("A", a), ("b", b), ("x", np.zeros(n, np.float32))):
        kaas.put_buffer(key, v.tobytes())
    kaas.run(jacobi_request(n, 10))  # outputs are written through with a state_dir
    x = kaas.get_buffer("x")
    assert {i.key: i.dirty for i in kaas.list_buffers()} == {"A": False, "b": False, "x": False}
    rebuilt = new_kaas("cpu", state_dir=tmp_path)
    assert rebuilt.get_buffer("x") == x and rebuilt.get_buffer("A") == a.tobytes()
    rebuilt.run(jacobi_request(n, 10))
    assert rebuilt.get_buffer("x") != x


# --- the GPU cache ------------------------------------------------------------------------------
def _vec_request(n: int, x: str, y: str, const: bool = True) -> dict:
    """y = 2 x: x an input (const by default), y a new output."""
    return {"kernels": [kernel("elementwise", "scale", [(buf("x", key=x, const=const), "i"), (buf("y", n * 4, key=y), "o")],
                               [("Q", n), ("f", 2.0)])]}


def test_const_buffers_are_shared_across_requests():
    kaas = new_kaas("cpu")
    kaas.put_buffer("A", np.ones(64, np.float32).tobytes())
    first = kaas.run(_vec_request(64, "A", "y1"))
    second = kaas.run(_vec_request(64, "A", "y2"))
    third = kaas.run(_vec_request(64, "A", "y3"))
    assert (first.cache, second.cache, third.cache) == ({"hits": 0, "misses": 1}, {"hits": 1, "misses": 0},
                                                         {"hits": 1, "misses": 0})
    text = _metrics(kaas)
    assert 'accelshim_kaas_cache_hits_total{kind="const"} 2.0' in text
    assert 'accelshim_kaas_cache_misses_total{kind="const"} 1.0' in text


def test_lru_evicts_regular_before_const_and_writes_dirty_back():
    n = 64  # 256-byte vectors
    kaas = new_kaas("cpu", cache_bytes=1024)
    cache = kaas.buffers.cache
    kaas.put_buffer("c", np.arange(n, dtype=np.float32).tobytes())
    kaas.put_buffer("r", np.ones(n, np.float32).tobytes())
    kaas.run(_vec_request(n, "c", "out1"))             # resident: c (const), out1 (dirty)
    assert [i.location for i in kaas.list_buffers() if i.key == "out1"] == ["gpu"]
    kaas.run(_vec_request(n, "r", "out2", const=False))  # + r, out2: full (1024)
    kaas.run(_vec_request(n, "r", "out3", const=False))  # out3 needs room: the LRU regular one, out1, goes
    assert cache.get("default", "c") is not None and cache.get("default", "out1") is None
    assert cache.evictions == 1 and "accelshim_kaas_cache_writebacks_total 1.0" in _metrics(kaas)
    np.testing.assert_array_equal(np.frombuffer(kaas.buffers.store.get("out1"), np.float32),
                                  2 * np.arange(n, dtype=np.float32))
    kaas.put_buffer("big", b"\0" * 512)
    kaas.run({"kernels": [kernel("elementwise", "copy", [(buf("big"), "i"), (buf("o4", 512), "o")],
                                 [("Q", 128)])]})   # room for 1024 bytes: every regular entry goes, then the const one
    assert cache.get("default", "c") is None
    assert 'accelshim_kaas_cache_evictions_total{kind="const"} 1.0' in _metrics(kaas)
    for key, want in (("out2", 2.0), ("out3", 2.0)):
        np.testing.assert_array_equal(np.frombuffer(kaas.get_buffer(key), np.float32), np.full(n, want, np.float32))


def test_get_of_a_dirty_output_writes_it_back_and_put_replaces_the_device_copy():
    kaas = new_kaas("cpu")
    kaas.put_buffer("x", np.ones(8, np.float32).tobytes())
    kaas.run(_vec_request(8, "x", "y", const=False))
    assert kaas.buffers.store.get("y") is None  # pending: only on the device
    assert np.frombuffer(kaas.get_buffer("y"), np.float32).tolist() == [2.0] * 8
    assert [(i.location, i.dirty) for i in kaas.list_buffers() if i.key == "y"] == [("store+gpu", False)]
    kaas.put_buffer("x", np.full(8, 5, np.float32).tobytes())  # a new value: the cached copy must not serve
    kaas.run(_vec_request(8, "x", "y", const=False))
    assert np.frombuffer(kaas.get_buffer("y"), np.float32).tolist() == [10.0] * 8
    kaas.delete_buffer("y")
    assert "y" not in {i.key for i in kaas.list_buffers()} and kaas.buffers.cache.get("default", "y") is None


def test_pinned_buffers_are_not_evicted_within_a_request():
    """Four 256-byte buffers in a 1024-byte cache: each load must evict others' entries, never this request's."""
    n = 64
    kaas = new_kaas("cpu", cache_bytes=1024)
    for key in ("p", "q", "s"):
        kaas.put_buffer(key, np.full(n, 3, np.float32).tobytes())
    kaas.run(_vec_request(n, "s", "s2", const=False))  # s and s2 resident, unpinned afterwards
    result = kaas.run({"kernels": [kernel("elementwise", "add", [(buf("p"), "i"), (buf("q"), "i"), (buf("z", n * 4), "o")],
                                          [("Q", n)]),
                                   kernel("elementwise", "mul", [(buf("z", n * 4), "i"), (buf("p"), "i"),
                                                                 (buf("w", n * 4), "o")], [("Q", n)])]})
    assert result.cache == {"hits": 0, "misses": 2}
    np.testing.assert_array_equal(np.frombuffer(kaas.get_buffer("w"), np.float32), np.full(n, 18, np.float32))
    np.testing.assert_array_equal(np.frombuffer(kaas.get_buffer("s2"), np.float32), np.full(n, 6, np.float32))


def _metrics(kaas) -> str:
    from prometheus_client import generate_latest

    return generate_latest(kaas.metrics.registry).decode()
