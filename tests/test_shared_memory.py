"""System shared memory (Triton's ``system_shared_memory`` extension): tritonclient's own API against a
live shim, the accel.Client convenience, every error case, tenants, and zero-copy on the shim side."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

import accel
from accel.shm import REGISTER_HEADER
from accel.tensor import Tensor
from shim.ops import Op
from tests.conftest import WSGITransport
from tests.conftest import tenant_service as make_tenant_service

tritonhttp = pytest.importorskip("tritonclient.http")
tshm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef0"


def _key(tag: str) -> str:
    return f"/accel_test_{tag}_{os.getpid()}_{os.urandom(3).hex()}"


@pytest.fixture()
def triton(live_shim):
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{live_shim.port}")
    yield client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture()
def regions():
    """tritonclient shared memory regions, destroyed after the test."""
    made: list[Any] = []

    def make(name: str, byte_size: int) -> tuple[Any, str]:
        key = _key(name)
        made.append(tshm.create_shared_memory_region(name, key, byte_size))
        return made[-1], key

    yield make
    for handle in made:
        tshm.destroy_shared_memory_region(handle)


# --- tritonclient, unchanged, against a live shim ------------------------------------------------
def test_server_metadata_announces_the_extension(triton):
    assert "system_shared_memory" in triton.get_server_metadata()["extensions"]


def test_tritonclient_gemm_inputs_and_output_in_shared_memory(triton, regions):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 48), np.float32), rng.standard_normal((48, 32), np.float32)
    handle_in, key_in = regions("gemm_in", a.nbytes + b.nbytes)
    handle_out, key_out = regions("gemm_out", 64 * 32 * 4)
    tshm.set_shared_memory_region(handle_in, [a, b])
    triton.register_system_shared_memory("gemm_in", key_in, a.nbytes + b.nbytes)
    triton.register_system_shared_memory("gemm_out", key_out, 64 * 32 * 4)
    inputs = [tritonhttp.InferInput("A", [64, 48], "FP32"), tritonhttp.InferInput("B", [48, 32], "FP32")]
    inputs[0].set_shared_memory("gemm_in", a.nbytes)
    inputs[1].set_shared_memory("gemm_in", b.nbytes, offset=a.nbytes)
    output = tritonhttp.InferRequestedOutput("C")
    output.set_shared_memory("gemm_out", 64 * 32 * 4)
    result = triton.infer("gemm", inputs, outputs=[output])
    meta = result.get_output("C")
    assert "data" not in meta and "binary_data_size" not in meta.get("parameters", {})
    assert meta["shape"] == [64, 32] and meta["datatype"] == "FP32"
    c = tshm.get_contents_as_numpy(handle_out, np.float32, meta["shape"])
    np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)


def test_tritonclient_noop_output_region_equals_input(triton, regions):
    data = np.arange(1000, dtype=np.int32).reshape(10, 100)
    handle_in, key_in = regions("noop_in", data.nbytes)
    handle_out, key_out = regions("noop_out", data.nbytes + 8)
    tshm.set_shared_memory_region(handle_in, [data])
    triton.register_system_shared_memory("noop_in", key_in, data.nbytes)
    triton.register_system_shared_memory("noop_out", key_out, data.nbytes + 8)
    tensor = tritonhttp.InferInput("x", [10, 100], "INT32").set_shared_memory("noop_in", data.nbytes)
    out = tritonhttp.InferRequestedOutput("x")
    out.set_shared_memory("noop_out", data.nbytes + 4, offset=4)  # larger than needed is fine, as in Triton
    result = triton.infer("noop", [tensor], outputs=[out])
    assert "data" not in result.get_output("x")  # no data in the response: it is in the region
    np.testing.assert_array_equal(tshm.get_contents_as_numpy(handle_out, np.int32, [10, 100], offset=4), data)


def test_inputs_in_shared_memory_outputs_in_the_body(triton, regions):
    data = np.linspace(0, 1, 256, dtype=np.float64)
    handle, key = regions("mixed", data.nbytes)
    tshm.set_shared_memory_region(handle, [data])
    triton.register_system_shared_memory("mixed", key, data.nbytes)
    tensor = tritonhttp.InferInput("x", [256], "FP64").set_shared_memory("mixed", data.nbytes)
    result = triton.infer("noop", [tensor], outputs=[tritonhttp.InferRequestedOutput("x")])
    np.testing.assert_array_equal(result.as_numpy("x"), data)
    assert "shared_memory_region" not in result.get_output("x").get("parameters", {})


def test_bytes_input_in_shared_memory_classifies(triton, regions, chelsea):
    """BYTES through shared memory is supported: the region holds the serialized elements (4-byte length
    prefix each), exactly shared_memory_byte_size of them."""
    from tests.conftest import CAT_LABELS, encode
    from tritonclient.utils import serialize_byte_tensor

    serialized = serialize_byte_tensor(np.array([encode(chelsea, "JPEG")], dtype=np.object_))
    size = len(serialized.item())
    handle, key = regions("image", size)
    tshm.set_shared_memory_region(handle, [serialized])
    triton.register_system_shared_memory("image", key, size)
    image = tritonhttp.InferInput("image", [1], "BYTES").set_shared_memory("image", size)
    result = triton.infer("classify", [image], outputs=[tritonhttp.InferRequestedOutput("labels")])
    assert result.as_numpy("labels")[0][0].decode() in CAT_LABELS


def test_status_and_unregister_shapes(triton, regions):
    _, key = regions("st", 4096)
    assert triton.get_system_shared_memory_status() == []
    triton.register_system_shared_memory("st1", key, 1024)
    triton.register_system_shared_memory("st2", key, 2048, offset=1024)
    assert triton.get_system_shared_memory_status() == [
        {"name": "st1", "key": key, "offset": 0, "byte_size": 1024},
        {"name": "st2", "key": key, "offset": 1024, "byte_size": 2048}]
    assert triton.get_system_shared_memory_status("st2") == [{"name": "st2", "key": key, "offset": 1024,
                                                             "byte_size": 2048}]
    triton.unregister_system_shared_memory("st1")
    triton.unregister_system_shared_memory("never-registered")  # no error, as in Triton
    assert [r["name"] for r in triton.get_system_shared_memory_status()] == ["st2"]
    triton.unregister_system_shared_memory()
    assert triton.get_system_shared_memory_status() == []


def _fails(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return str(info.value.status()), info.value.message()


def test_register_errors(triton, regions, tmp_path):
    _, key = regions("err", 4096)
    triton.register_system_shared_memory("taken", key, 64)
    status, message = _fails(triton.register_system_shared_memory, "taken", key, 64)
    assert status == "400" and "already registered" in message
    status, message = _fails(triton.register_system_shared_memory, "oob", key, 4096, offset=1)
    assert status == "400" and "past the end" in message
    assert _fails(triton.register_system_shared_memory, "far", key, 8, offset=(1 << 64) - 4)[0] == "400"
    assert _fails(triton.register_system_shared_memory, "big", key, 1 << 62)[0] == "400"  # bounds before quota
    assert _fails(triton.register_system_shared_memory, "zero", key, 0)[0] == "400"
    for bad in ("/../etc/passwd", "a/b", "/a/b", "..", "../x", "/", "", "x" * 201, "/dev/shm/x", "a\x00b"):
        status, message = _fails(triton.register_system_shared_memory, "bad", bad, 8)
        assert status == "400" and "invalid shared memory key" in message, bad
    status, message = _fails(triton.register_system_shared_memory, "missing", _key("missing"), 8)
    assert status == "400" and "unable to open" in message
    link = Path("/dev/shm") / _key("link").lstrip("/")
    link.symlink_to(Path("/dev/shm") / key.lstrip("/"))
    try:  # a symlink in /dev/shm could point anywhere: refused
        assert _fails(triton.register_system_shared_memory, "link", "/" + link.name, 8)[0] == "400"
    finally:
        link.unlink()
    folder = Path("/dev/shm") / _key("dir").lstrip("/")
    folder.mkdir()
    try:
        assert _fails(triton.register_system_shared_memory, "dir", "/" + folder.name, 8)[0] == "400"
    finally:
        folder.rmdir()
    assert [r["name"] for r in triton.get_system_shared_memory_status()] == ["taken"]


def test_unknown_region_is_404(triton):
    status, message = _fails(triton.get_system_shared_memory_status, "nope")
    assert status == "404" and "nope" in message
    tensor = tritonhttp.InferInput("x", [4], "FP32").set_shared_memory("nope", 16)
    status, message = _fails(triton.infer, "noop", [tensor])
    assert status == "404" and "'nope'" in message and "'x'" in message


def test_infer_errors_name_the_tensor(triton, regions):
    handle, key = regions("small", 64)
    triton.register_system_shared_memory("small", key, 64)
    tensor = tritonhttp.InferInput("x", [16], "FP32").set_shared_memory("small", 64, offset=8)
    status, message = _fails(triton.infer, "noop", [tensor])  # 8 + 64 > 64
    assert status == "400" and "'x'" in message and "outside region" in message
    tensor = tritonhttp.InferInput("x", [16], "FP32").set_shared_memory("small", 60)  # not 16 x 4
    status, message = _fails(triton.infer, "noop", [tensor])
    assert status == "400" and "'x'" in message and "64 bytes" in message
    tensor = tritonhttp.InferInput("x", [16], "FP32").set_shared_memory("small", 64)
    out = tritonhttp.InferRequestedOutput("x")
    out.set_shared_memory("small", 32)
    status, message = _fails(triton.infer, "noop", [tensor], outputs=[out])
    assert status == "400" and "output 'x'" in message and "32" in message
    out = tritonhttp.InferRequestedOutput("x")
    out.set_shared_memory("small", 64, offset=32)
    status, message = _fails(triton.infer, "noop", [tensor], outputs=[out])
    assert status == "400" and "'x'" in message


def test_region_parameters_are_checked(live_shim):
    http = accel.Client(live_shim.tcp_url)
    bad = [{"shared_memory_region": "r"}, {"shared_memory_byte_size": 4}, {"shared_memory_offset": 4},
           {"shared_memory_region": "r", "shared_memory_byte_size": -1},
           {"shared_memory_region": 3, "shared_memory_byte_size": 4},
           {"shared_memory_region": "r", "shared_memory_byte_size": 4, "shared_memory_offset": "0"}]
    for params in bad:
        tensor = Tensor("x", "FP32", (1,), b"\0\0\0\0", params)
        with pytest.raises(accel.InvalidInput, match="shared_memory"):
            http.infer_tensors("noop", [tensor])


# --- accel.Client and accel.SharedMemory ------------------------------------------------------
def test_accel_gemm_through_a_shared_memory_region_copies_nothing(live_shim):
    rng = np.random.default_rng(1)
    with accel.Client(live_shim.unix_url) as client, accel.SharedMemory("acc-gemm", 1 << 20) as region:
        a = region.array((96, 64), np.float32)
        b = region.array((64, 80), np.float32)
        a[:], b[:] = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
        c = client.gemm(a, b, shm=region)
        np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)
        assert region.offset_of(c) is not None  # the result is a view of the region, not a copy
        assert region.offset_of(c) >= a.nbytes + b.nbytes  # and was not put over the operands
        assert client.shm_status("acc-gemm") == [{"name": "acc-gemm", "key": region.key, "offset": 0,
                                                  "byte_size": 1 << 20}]
        out = region.array((96, 80), np.float32)
        got = client.gemm(a, b, shm=region, out=out)
        assert region.offset_of(got) == region.offset_of(out)
        np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-4)
        x = rng.standard_normal((30, 30))  # not in the region: copied in, then the same path
        np.testing.assert_allclose(client.gemm(x, x, shm=region), x @ x)
        client.unregister_shm("acc-gemm")
        assert client.shm_status() == []
        del a, b, c, out, got


def test_accel_infer_mixes_body_and_region_outputs(live_shim):
    with accel.Client(live_shim.tcp_url) as client, accel.SharedMemory("acc-mix", 4096) as region:
        x = region.array(16, np.float64)
        x[:] = np.arange(16)
        out = client.infer("noop", {"x": x, "y": np.arange(3, dtype=np.int8), "s": np.array([b"hi"], dtype=object)},
                           shm=region, outputs={"x": x.nbytes, "y": None, "s": None})
        np.testing.assert_array_equal(out["x"], np.arange(16))
        assert out["y"].tolist() == [0, 1, 2] and out["s"].tolist() == [b"hi"]
        with pytest.raises(accel.InvalidInput, match="no room"):
            client.infer("noop", {"x": x}, shm=region, outputs={"x": 8192})
        client.unregister_shm()
        del x, out


def test_accel_client_registers_again_after_the_shim_forgot(live_shim):
    with accel.Client(live_shim.tcp_url) as client, accel.SharedMemory("acc-again", 4096) as region:
        v = region.array(4, np.int64)
        v[:] = [1, 2, 3, 4]
        assert client.infer("noop", {"v": v}, shm=region, outputs={"v": 32})["v"].tolist() == [1, 2, 3, 4]
        accel.Client(live_shim.tcp_url).unregister_shm("acc-again")  # as a restarted shim would have
        assert client.infer("noop", {"v": v}, shm=region, outputs={"v": 32})["v"].tolist() == [1, 2, 3, 4]
        client.unregister_shm()
        del v


# --- tenants and the shim side, in process -------------------------------------------------------
class PointerOp(Op):
    """Answers the address of its input's first byte: what the op computes on."""

    name = "pointer"
    inputs: list = []
    outputs: list = []

    def run(self, inputs: dict, parameters: Mapping[str, Any]) -> dict:
        return {"address": np.array([inputs["x"].ctypes.data], dtype=np.uint64)}


@pytest.fixture(scope="module")
def tenant_service(models_dir, tmp_path_factory):
    svc = make_tenant_service(tmp_path_factory.mktemp("shm"), {"alice": ALICE, "bob": BOB}, extra_ops=[PointerOp()],
                              models_dir=models_dir, shm_max_regions=3, shm_max_bytes=1 << 16)
    hooks: list[tuple[str, int, int]] = []
    svc.shm.on_register = lambda address, nbytes: hooks.append(("register", address, nbytes))
    svc.shm.on_unregister = lambda address, nbytes: hooks.append(("unregister", address, nbytes))
    svc.hooks = hooks
    return svc


def _client(svc, token: str) -> accel.Client:
    return accel.Client("http://in-process", transport=WSGITransport(svc.app), token=token, retries=0)


def test_regions_are_per_tenant(tenant_service):
    alice, bob = _client(tenant_service, ALICE), _client(tenant_service, BOB)
    with accel.SharedMemory("mine", 4096) as region:
        alice.register_shm("mine", region.key, 4096)
        assert bob.shm_status() == []
        with pytest.raises(accel.OpNotFound):
            bob.shm_status("mine")
        x = Tensor("x", "INT8", (4,), b"\1\2\3\4", {"shared_memory_region": "mine", "shared_memory_byte_size": 4})
        with pytest.raises(accel.OpNotFound, match="no shared memory region 'mine'"):
            bob.infer_tensors("noop", [x])
        bob.unregister_shm()  # unregisters bob's regions only
        bob.register_shm("mine", region.key, 4096)  # the name is free for bob: names are per tenant
        http = tenant_service.app.test_client()
        reply = http.get("/v2/systemsharedmemory/region/mine/status?tenant=alice",
                         headers={"Authorization": f"Bearer {BOB}"})
        assert reply.status_code == 403
        assert http.get("/v2/systemsharedmemory/status").status_code == 401
        assert [r["name"] for r in alice.shm_status()] == ["mine"]
        alice.unregister_shm()
        bob.unregister_shm()


def test_region_count_and_bytes_are_capped_per_tenant(tenant_service):
    alice, bob = _client(tenant_service, ALICE), _client(tenant_service, BOB)
    with accel.SharedMemory("cap", 1 << 17) as region:
        with pytest.raises(accel.InsufficientStorage, match="limit"):
            alice.register_shm("huge", region.key, (1 << 16) + 1)
        for i in range(3):
            alice.register_shm(f"r{i}", region.key, 1024, offset=1024 * i)
        with pytest.raises(accel.QuotaExceeded, match="3 shared memory regions"):
            alice.register_shm("r3", region.key, 1024)
        bob.register_shm("r3", region.key, 1024)  # another tenant's own count
        alice.unregister_shm()
        bob.unregister_shm()


def test_the_op_computes_on_the_mapping_itself_and_hooks_see_it(tenant_service):
    """Zero-copy on the shim side: the op's input array starts at the region's mapped address; the backend
    hook got that mapping at registration and gets it back at unregistration."""
    alice = _client(tenant_service, ALICE)
    tenant_service.hooks.clear()
    with accel.SharedMemory("zc", 3 * 4096) as region:
        alice.register_shm("zc", region.key, 4096, offset=4096 + 64)
        (_, base, nbytes), = tenant_service.hooks
        assert nbytes == 64 + 4096 and base % mmap_page() == 0
        x = Tensor("x", "FP32", (8,), bytes(32), {"shared_memory_region": "zc", "shared_memory_byte_size": 32,
                                                  "shared_memory_offset": 128})
        address = alice.infer_tensors("pointer", [x])["address"].numpy()[0]
        assert address == base + 64 + 128
        data = region.array(8, np.float32, offset=4096 + 64)
        data[:] = np.arange(8)
        same_place = {"shared_memory_region": "zc", "shared_memory_byte_size": 32}
        # noop with its output asked for where its input lies: the echo needs no copy and stays right
        out = alice.infer_tensors("noop", [Tensor("x", "FP32", (8,), bytes(32), same_place)],
                                  outputs=[accel.codec.RequestedOutput("x", False, same_place)],
                                  resolve=lambda name, ref: region.view(4096 + 64 + ref.offset, ref.byte_size))
        assert out["x"].numpy().tolist() == list(range(8))
        alice.unregister_shm("zc")
        assert tenant_service.hooks[-1] == ("unregister", base, nbytes)
        del data, out


def test_a_truncated_object_is_refused_not_a_crash(tenant_service):
    alice = _client(tenant_service, ALICE)
    region = accel.SharedMemory("trunc", 8192)
    try:
        alice.register_shm("trunc", region.key, 8192)
        os.truncate(Path("/dev/shm") / region.key, 100)  # touching the pages now would be SIGBUS
        x = Tensor("x", "INT8", (8,), bytes(8), {"shared_memory_region": "trunc", "shared_memory_byte_size": 8})
        with pytest.raises(accel.InvalidInput, match="truncated"):
            alice.infer_tensors("noop", [x])
        alice.unregister_shm()
    finally:
        region.close()


def test_shared_memory_can_be_turned_off(models_dir):
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cpu", models_dir=models_dir, classify_model="", shared_memory=False))
    svc.load()
    http = svc.app.test_client()
    assert "system_shared_memory" not in http.get("/v2").get_json()["extensions"]
    assert http.get("/v2/systemsharedmemory/status").status_code == 404
    reply = http.post("/v2/models/noop/infer", json={"inputs": [{"name": "x", "datatype": "INT8", "shape": [1],
                      "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 1}}]})
    assert reply.status_code == 400 and "serves no shared memory" in reply.get_json()["error"]
    reply = http.post("/v2/models/noop/infer", json={
        "inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}],
        "outputs": [{"name": "x", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 1}}]})
    assert reply.status_code == 400 and "serves no shared memory" in reply.get_json()["error"]
    reply = http.post("/v2/models/noop/infer", json={"inputs": [{"name": "x", "datatype": "INT8", "shape": [1],
                      "data": [1]}]}, headers={REGISTER_HEADER: '{"name": "r", "key": "/k", "byte_size": 1}'})
    assert reply.status_code == 400 and "serves no shared memory" in reply.get_json()["error"]


def test_tenant_dirs_resolve_keys_in_the_tenants_folder(tmp_path):
    from shim.shm import SharedMemoryRegistry

    registry = SharedMemoryRegistry(tmp_path, tenant_dirs=True)
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "obj").write_bytes(bytes(64))
    (tmp_path / "obj").write_bytes(bytes(64))
    registry.register("r", "/obj", 0, 64, "alice")
    with pytest.raises(accel.InvalidInput, match="unable to open"):
        registry.register("r", "/obj", 0, 64, "bob")  # bob's folder has no such object
    assert registry.unregister(None, "alice") == ["r"]


def mmap_page() -> int:
    import mmap

    return mmap.ALLOCATIONGRANULARITY


# --- the region object itself -----------------------------------------------------------------------
def test_a_region_is_unlinked_on_close_at_exit_and_when_collected(tmp_path):
    import gc
    import subprocess
    import sys

    region = accel.SharedMemory("life", 4096)
    path = Path("/dev/shm") / region.key
    assert path.stat().st_size == 4096 and path.stat().st_mode & 0o777 == 0o600  # the shim's user only
    region.close()
    assert not path.exists()
    region.close()  # twice is fine
    collected = accel.SharedMemory("life", 4096)
    path = Path("/dev/shm") / collected.key
    del collected
    gc.collect()
    assert not path.exists()
    child = "import accel, sys; r = accel.SharedMemory('left', 64); print(r.key)"  # never closed
    key = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout.strip()
    assert key.startswith("accel_left_") and not (Path("/dev/shm") / key).exists()
    # a forked child that exits normally leaves its parent's region alone
    forker = ("import accel, os, sys; r = accel.SharedMemory('fork', 64)\n"
              "pid = os.fork()\n"
              "if pid == 0: sys.exit(0)\n"
              "os.waitpid(pid, 0); print(os.path.exists('/dev/shm/' + r.key))")
    assert subprocess.run([sys.executable, "-c", forker], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def test_attaching_to_a_region_and_the_errors_of_making_one():
    with accel.SharedMemory("owner", 8192) as owner:
        owner.view(0, 4)[:] = b"abcd"
        attached = accel.SharedMemory("other", 0, key=owner.key, create=False)
        assert attached.byte_size == 8192 and bytes(attached.view(0, 4)) == b"abcd"
        attached.close()  # an attached region does not unlink the object
        assert (Path("/dev/shm") / owner.key).exists()
        with pytest.raises(accel.InvalidInput, match="exists already"):
            accel.SharedMemory("dup", 64, key=owner.key)
    with pytest.raises(accel.InvalidInput, match="no shared memory object"):
        accel.SharedMemory("gone", 0, key=owner.key, create=False)
    with pytest.raises(accel.InvalidInput, match="at least 1 byte"):
        accel.SharedMemory("empty", 0)
    with pytest.raises(accel.InvalidInput, match="invalid shared memory region name"):
        accel.SharedMemory("../x", 64)
    for key in ("../../tmp/escape", "a/b", "/", "..", "x" * 256):  # one object of /dev/shm, nothing else
        with pytest.raises(accel.InvalidInput, match="invalid shared memory key"):
            accel.SharedMemory("k", 64, key=key)
    umask = os.umask(0o022)
    try:
        with accel.SharedMemory("grp", 64, key=f"/accel_grp_{os.getpid()}", mode=0o660) as shared:
            assert (Path("/dev/shm") / shared.key.lstrip("/")).stat().st_mode & 0o777 == 0o640  # less the umask
    finally:
        os.umask(umask)


def test_registering_waits_until_the_shim_is_ready(models_dir):
    """A region registered while the shim warms up would be pinned beside a model's CUDA-graph
    capture on a GPU: until the shim is ready the answer is 503 (retry), then it registers."""
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cpu", models_dir=models_dir, classify_model=""))
    http = svc.app.test_client()
    with accel.SharedMemory("early", 4096) as region:
        body = {"key": region.key, "offset": 0, "byte_size": 4096}
        reply = http.post("/v2/systemsharedmemory/region/early/register", json=body)
        assert reply.status_code == 503 and "warming up" in reply.get_json()["error"]
        reply = http.post("/v2/models/noop/infer", json={"inputs": [{"name": "x", "datatype": "INT8", "shape": [1],
                          "data": [1]}]}, headers={REGISTER_HEADER: json.dumps({**body, "name": "early"})})
        assert reply.status_code == 503 and "warming up" in reply.get_json()["error"]  # on the way too
        assert http.get("/v2/systemsharedmemory/status").get_json() == []  # nothing was mapped
        svc.load()
        assert http.post("/v2/systemsharedmemory/region/early/register", json=body).status_code == 200
        assert [r["name"] for r in http.get("/v2/systemsharedmemory/status").get_json()] == ["early"]
        assert http.post("/v2/systemsharedmemory/unregister").status_code == 200


# --- registering a region on the way (accelshim's Accel-Shared-Memory-Register header) -----------
class _Recording(WSGITransport):
    """The in-process transport, noting each request's method, path and whether it registers on the way."""

    def __init__(self, app) -> None:
        super().__init__(app)
        self.calls: list[tuple[str, str, bool]] = []

    def request(self, method, path, body, headers, timeout):
        self.calls.append((method, path, REGISTER_HEADER in headers))
        return super().request(method, path, body, headers, timeout)


def test_a_first_call_through_a_region_registers_it_on_the_way(tenant_service):
    transport = _Recording(tenant_service.app)
    alice = accel.Client("http://in-process", transport=transport, token=ALICE, retries=0)
    rng = np.random.default_rng(3)
    with accel.SharedMemory("otw", 3 * 16 * 16 * 4 + 1024) as region:
        a, b = region.array((16, 16), np.float32), region.array((16, 16), np.float32)
        a[:], b[:] = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
        c = alice.gemm(a, b, shm=region)
        np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
        assert region.offset_of(c) is not None
        assert transport.calls == [("POST", "/v2/models/gemm/infer", True)]  # one request, no register
        assert alice.shm_status("otw") == [{"name": "otw", "key": region.key, "offset": 0,
                                            "byte_size": region.byte_size}]
        alice.gemm(a, b, shm=region)  # every call names its object: the shim checks it is the one
        assert transport.calls[-1] == ("POST", "/v2/models/gemm/infer", True) and len(transport.calls) == 3
        alice.unregister_shm()
        del a, b, c


def test_a_name_taken_by_another_object_is_taken_over_the_standard_way(tenant_service):
    first = _client(tenant_service, ALICE)
    transport = _Recording(tenant_service.app)
    second = accel.Client("http://in-process", transport=transport, token=ALICE, retries=0)
    with accel.SharedMemory("taken", 4096) as old, accel.SharedMemory("taken", 4096) as new:
        first.register_shm("taken", old.key, old.byte_size)  # left by an earlier instance of the function
        x = new.array(4, np.float32)
        x[:] = [1, 2, 3, 4]
        out = second.infer("noop", {"x": x}, shm=new)
        assert out["x"].tolist() == [1, 2, 3, 4]
        assert [path.rsplit("/", 1)[-1] for _, path, _ in transport.calls] == \
            ["infer", "register", "unregister", "register", "infer"]
        assert second.shm_status("taken")[0]["key"] == new.key
        second.unregister_shm()
        del x, out


@pytest.mark.parametrize(("header", "status", "message"), [
    ("{not json", 400, "Accel-Shared-Memory-Register header is not JSON"),
    ('["reg", "/k"]', 400, "must be a JSON object"),
    ('{"key": "/k", "byte_size": 64}', 400, "has no 'name'"),
    ('{"name": 7, "key": "/k", "byte_size": 64}', 400, "name must be a string"),
    ('{"name": "r", "key": "../etc/passwd", "byte_size": 64}', 400, "invalid shared memory key"),
    ('{"name": "r", "key": "/accel_test_absent_object", "byte_size": 64}', 400, "unable to open"),
])
def test_bad_registrations_on_the_way_are_400_and_register_nothing(tenant_service, header, status, message):
    alice = _client(tenant_service, ALICE)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]})
    r = tenant_service.app.test_client().post("/v2/models/noop/infer", data=body, headers={
        REGISTER_HEADER: header, "Authorization": f"Bearer {ALICE}"})
    assert r.status_code == status and message in r.get_json()["error"]
    assert alice.shm_status() == []


def test_registering_on_the_way_is_idempotent_refuses_another_key_and_counts_to_the_quota(tenant_service):
    alice = _client(tenant_service, ALICE)
    client = tenant_service.app.test_client()
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]})

    def infer(registration: dict) -> Any:
        return client.post("/v2/models/noop/infer", data=body, headers={
            REGISTER_HEADER: json.dumps(registration), "Authorization": f"Bearer {ALICE}"})

    regions = [accel.SharedMemory(f"q{i}", 4096) for i in range(4)]
    try:
        same = {"name": "q0", "key": regions[0].key, "byte_size": 4096}
        assert infer(same).status_code == 200 and infer(same).status_code == 200
        assert [r["key"] for r in alice.shm_status()] == [regions[0].key]
        other = infer({"name": "q0", "key": regions[1].key, "byte_size": 4096})
        assert other.status_code == 400 and "already registered" in other.get_json()["error"]
        smaller = infer({**same, "byte_size": 1024})
        assert smaller.status_code == 400 and "already registered" in smaller.get_json()["error"]
        for i in (1, 2):
            assert infer({"name": f"q{i}", "key": regions[i].key, "byte_size": 4096}).status_code == 200
        over = infer({"name": "q3", "key": regions[3].key, "byte_size": 4096})  # the tenant holds 3 at most
        assert over.status_code == 429
        assert len(alice.shm_status()) == 3
    finally:
        alice.unregister_shm()
        for region in regions:
            region.close()


def test_two_requests_registering_the_same_region_at_once_both_go_on(tmp_path):
    """Registering on the way is idempotent under a race too: the request that comes second while the
    first maps the region gets the region (or a 503 to retry), never a 400 that would make its client
    take the region over."""
    import threading
    import time

    from shim.shm import SharedMemoryRegistry

    class SlowToMap(SharedMemoryRegistry):  # widens the window between the check and the registration
        def _map(self, *args):
            time.sleep(0.05)
            return super()._map(*args)

    registry = SlowToMap(tmp_path)
    (tmp_path / "obj").write_bytes(bytes(4096))
    outcomes: list[str] = []
    held = []

    def ensure() -> None:
        try:
            held.append(registry.ensure("r", "/obj", 0, 4096, "t"))  # pinned for the caller
            outcomes.append("ok")
        except accel.NotReady:
            outcomes.append("retry")
        except accel.AccelError as exc:
            outcomes.append(f"{exc.status}: {exc.message}")

    threads = [threading.Thread(target=ensure) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) in (["ok", "ok"], ["ok", "retry"]), outcomes
    held.append(registry.ensure("r", "obj", 0, 4096, "t"))  # the same object, named without the leading '/'
    with pytest.raises(accel.InvalidInput, match="already registered"):
        registry.ensure("r", "/obj", 0, 2048, "t")
    assert len({id(r) for r in held}) == 1 and held[0].users == len(held)
    for region in held:
        registry.release(region)
    assert held[0].users == 0
    assert registry.unregister(None, "t") == ["r"] and held[0]._map.closed  # unmapped: nothing held it


def test_a_request_uses_the_object_its_header_named_whoever_takes_the_name_meanwhile(tmp_path):
    from accel.shm import SharedMemoryRef
    from shim.server.shm_routes import ShmScope
    from shim.shm import SharedMemoryRegistry

    registry = SharedMemoryRegistry(tmp_path)
    (tmp_path / "mine").write_bytes(b"MINE")
    (tmp_path / "theirs").write_bytes(b"THEM")
    with ShmScope(registry, "t") as scope:
        scope.register_on_the_way(json.dumps({"name": "r", "key": "/mine", "byte_size": 4}))
        registry.unregister("r", "t")  # another instance takes the name over...
        registry.register("r", "/theirs", 0, 4, "t")
        assert bytes(scope.input("x", SharedMemoryRef("r", 4))) == b"MINE"  # ...this request keeps its own
        with pytest.raises(accel.InvalidInput, match="one region per such request"):
            scope.input("y", SharedMemoryRef("other", 4))  # a region the header did not name
    assert [r["key"] for r in registry.status(None, "t")] == ["/theirs"]
    registry.close()


def test_an_object_made_anew_under_a_registered_key_is_not_confused_with_the_old_one(tenant_service):
    one, two = _client(tenant_service, ALICE), _client(tenant_service, ALICE)
    key = _key("anew")
    old = accel.SharedMemory("anew", 4096, key=key)
    x = old.array(4, np.float32)
    x[:] = 1
    assert one.infer("noop", {"x": x}, shm=old)["x"].tolist() == [1, 1, 1, 1]
    del x
    old.close()  # unlinked, never unregistered: the shim still maps the old object
    with accel.SharedMemory("anew", 4096, key=key) as new:
        y = new.array(4, np.float32)
        y[:] = 2
        assert two.infer("noop", {"x": y}, shm=new)["x"].tolist() == [2, 2, 2, 2]
        two.unregister_shm()
        del y


def test_instances_contending_for_one_region_name_never_get_each_others_data(tenant_service):
    """Concurrent calls of two instances that name their regions alike: a call may fail (the name moved
    more often than the client takes it back), but never answers from the other instance's object."""
    import threading

    wrong, failed, done = [], [], []
    regions = [accel.SharedMemory("shared", 4096) for _ in range(2)]
    arrays = []
    for i, region in enumerate(regions):
        arrays.append(region.array(4, np.float32))
        arrays[-1][:] = i + 1

    def instance(i: int) -> None:  # retrying 503s, as functions do
        client = accel.Client("http://in-process", transport=WSGITransport(tenant_service.app), token=ALICE,
                              timeout=10)
        for _ in range(40):
            try:
                got = client.infer("noop", {"x": arrays[i]}, shm=regions[i])["x"].tolist()
            except accel.AccelError as exc:
                failed.append(f"{type(exc).__name__}: {exc.message}")
                continue
            (done if got == [i + 1] * 4 else wrong).append(got)

    threads = [threading.Thread(target=instance, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and len(done) + len(failed) == 160 and len(done) > 80
    assert all("already registered" in message for message in failed), set(failed)
    _client(tenant_service, ALICE).unregister_shm()
    arrays.clear()  # the views go before their regions close
    for region in regions:
        region.close()


def test_two_instances_using_one_region_name_each_compute_on_their_own_object(tenant_service):
    """Two instances of one function (one tenant) that name their regions alike: the name goes back and
    forth between them, but each call computes on the object of the instance that made it."""
    one, two = _client(tenant_service, ALICE), _client(tenant_service, ALICE)
    with accel.SharedMemory("work", 4096) as mine, accel.SharedMemory("work", 4096) as theirs:
        x, y = mine.array(4, np.float32), theirs.array(4, np.float32)
        x[:], y[:] = [1, 2, 3, 4], [5, 6, 7, 8]
        for _ in range(3):  # alternating: each call finds the name taken by the other's object
            assert one.infer("noop", {"x": x}, shm=mine)["x"].tolist() == [1, 2, 3, 4]
            assert two.infer("noop", {"x": y}, shm=theirs)["x"].tolist() == [5, 6, 7, 8]
        x[:] = [9, 9, 9, 9]
        assert one.infer("noop", {"x": x}, shm=mine)["x"].tolist() == [9, 9, 9, 9]
        one.unregister_shm()
        del x, y
