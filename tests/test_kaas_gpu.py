"""KaaS on the GPU (``pytest -m gpu``): every CUDA kernel against its numpy reference on random
inputs, whole graphs, the GPU cache keeping const buffers resident (hit counts in /metrics), and a
faulting kernel failing its request."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

from shim.kaas import KaasService
from shim.kaas.signature import Kernel
from tests.conftest import ROOT
from tests.kaas_util import buf, jacobi_request, jacobi_system, kernel, new_kaas, rel_err, sgemm_kernel

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

# (library, kernel, literals, grid, block): sizes that are not multiples of the tile or the block, and
# grids smaller than the problem (the kernels loop), so the edges and the strides are exercised
LAUNCHES: list[tuple[str, str, list[tuple[str, Any]], Any, Any]] = [
    ("blas", "sgemm", [("i", 77), ("i", 65), ("i", 129)], [5, 5], [16, 16]),
    ("blas", "sgemm", [("i", 300), ("i", 257), ("i", 64)], [3, 2], [16, 16]),
    ("jacobi", "jacobi_step", [("i", 300)], 7, 96),
    ("jacobi", "residual", [("i", 513)], 1000, 128),
    *[("elementwise", name, lits, 40, 256) for name, lits in [
        ("axpy", [("Q", 100_003), ("f", 1.7)]), ("scale", [("Q", 100_003), ("f", -0.3)]),
        ("relu", [("Q", 100_003)]), ("add", [("Q", 100_003)]), ("mul", [("Q", 100_003)]),
        ("fill", [("Q", 100_003), ("f", 3.25)]), ("copy", [("Q", 100_003)])]],
]


@pytest.fixture(scope="module")
def gpu() -> KaasService:
    return new_kaas("cuda")


@pytest.fixture(scope="module")
def cpu() -> KaasService:
    return new_kaas("cpu")


def _inputs(kernel_def: Kernel, literals: list[tuple[str, Any]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = kernel_def.literal_values([v for _, v in literals])
    arrays = {}
    for arg, expr in zip(kernel_def.args, kernel_def.counts):
        count = expr.evaluate(values)
        if arg.name == "A" and kernel_def.name in ("jacobi_step", "residual"):
            arrays[arg.name] = jacobi_system(int(values["N"]), seed)[0].ravel()
        else:
            arrays[arg.name] = rng.standard_normal(count).astype(arg.dtype)
    return arrays


def _run(kaas: KaasService, library: str, name: str, literals: list[tuple[str, Any]], grid: Any, block: Any,
         inputs: dict[str, np.ndarray], tag: str) -> dict[str, np.ndarray]:
    kernel_def = kaas.libraries.kernel(library, name)
    args = []
    for arg in kernel_def.args:
        key = f"{tag}-{arg.name}"
        if arg.access != "o":
            kaas.put_buffer(key, inputs[arg.name].tobytes())
        args.append((buf(arg.name, inputs[arg.name].nbytes, key=key), arg.access))
    kaas.run({"kernels": [kernel(library, name, args, literals, grid, block)]})
    return {a.name: np.frombuffer(kaas.get_buffer(f"{tag}-{a.name}"), a.dtype)
            for a in kernel_def.args if a.access != "i"}


@pytest.mark.parametrize("library, name, literals, grid, block", LAUNCHES,
                         ids=[f"{c[0]}.{c[1]}-{c[2][0][1]}" for c in LAUNCHES])
def test_each_cuda_kernel_matches_its_numpy_reference(gpu, cpu, library, name, literals, grid, block):
    inputs = _inputs(gpu.libraries.kernel(library, name), literals, seed=len(name))
    tag = f"{library}-{name}-{literals[0][1]}"
    got = _run(gpu, library, name, literals, grid, block, inputs, tag)
    want = _run(cpu, library, name, literals, grid, block, inputs, tag)
    for out in got:
        assert got[out].shape == want[out].shape
        assert rel_err(got[out], want[out]) < 1e-5, (out, rel_err(got[out], want[out]))
    if name == "sgemm":
        m, n, k = (v for _, v in literals)
        exact = inputs["A"].reshape(m, k).astype(np.float64) @ inputs["B"].reshape(k, n)
        assert rel_err(got["C"].reshape(m, n), exact) < 1e-5


def test_jacobi_solve_on_the_gpu(gpu):
    n = 512
    a, b = jacobi_system(n, seed=11)
    gpu.put_buffer("jA", a.tobytes())
    gpu.put_buffer("jb", b.tobytes())
    gpu.put_buffer("jx", np.zeros(n, np.float32).tobytes())
    result = gpu.run(jacobi_request(n, 200, a_key="jA", b_key="jb", x_key="jx", grid=64))
    assert result.device == "cuda" and result.launches == 200 and result.kernels[0].ms > 0
    x = np.frombuffer(gpu.get_buffer("jx"), np.float32)
    assert rel_err(x, np.linalg.solve(a.astype(np.float64), b.astype(np.float64))) < 1e-5


def test_sgemm_chain_and_offsets_on_the_gpu(gpu, cpu):
    rng = np.random.default_rng(4)
    m, k, n, p = 130, 70, 33, 90
    data = {"ga": rng.standard_normal((m, k), dtype=np.float32), "gb": rng.standard_normal((k, n), dtype=np.float32),
            "gc": rng.standard_normal((n, p), dtype=np.float32)}
    # gb and gc live in one store object; the request picks them by offset
    packed = np.concatenate([data["gb"].ravel(), data["gc"].ravel()])
    outs = []
    for kaas in (gpu, cpu):
        kaas.put_buffer("ga", data["ga"].tobytes())
        kaas.put_buffer("gbc", packed.tobytes())
        ab = buf("ab", m * n * 4, ephemeral=True)
        kaas.run({"kernels": [
            sgemm_kernel(m, n, k, buf("ga"), buf("gb", k * n * 4, key="gbc"), ab),
            sgemm_kernel(m, p, n, ab, buf("gc", n * p * 4, key="gbc", offset=k * n * 4), buf("gd", m * p * 4)),
        ]})
        outs.append(np.frombuffer(kaas.get_buffer("gd"), np.float32).reshape(m, p))
    want = (data["ga"].astype(np.float64) @ data["gb"]) @ data["gc"]
    assert rel_err(outs[0], want) < 1e-5 and rel_err(outs[0], outs[1]) < 1e-5


def test_the_gpu_cache_keeps_const_buffers_resident(tmp_path):
    """Through the whole shim on ``device=cuda``: A is uploaded once, then hit; /metrics counts it."""
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device="cuda", models_dir=tmp_path, classify_model=""))
    svc.load()
    assert svc.kaas is not None and svc.kaas.device == "cuda"
    http = svc.app.test_client()
    n = 256
    a, b = jacobi_system(n, seed=2)
    for key, v in (("A", a), ("b", b), ("x", np.zeros(n, np.float32))):
        assert http.put(f"/v1/buffers/{key}", data=v.tobytes()).status_code == 200
    import json

    caches = [http.post("/v1/kaas", data=json.dumps(jacobi_request(n, 10))).get_json()["cache"] for _ in range(4)]
    assert caches == [{"hits": 0, "misses": 3}] + [{"hits": 3, "misses": 0}] * 3
    metrics = http.get("/metrics").data.decode()
    assert 'accelshim_kaas_cache_hits_total{kind="const"} 3.0' in metrics
    assert 'accelshim_kaas_cache_misses_total{kind="const"} 1.0' in metrics
    entry = svc.kaas.buffers.cache.get("default", "A")
    assert entry is not None and entry.const and isinstance(entry.buf, cupy.ndarray)
    listing = {b["key"]: b for b in http.get("/v1/buffers").get_json()["buffers"]}
    assert listing["A"]["location"] == "store+gpu" and listing["A"]["const"] is True


FAULTY = '''
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from prometheus_client import CollectorRegistry
from shim.faults import DeviceLost
from shim.kaas import build_kaas
kaas = build_kaas("cuda", CollectorRegistry(), kernels_dir=Path({lib!r}))
kaas.load()
kaas.put_buffer("x", bytes(64))
try:
    kaas.run({{"kernels": [{{"library": "faulty", "kernel": "wild", "arguments": [[{{"name": "x"}}, "io"]],
                           "literals": [{{"type": "i", "val": 16}}], "nGrid": 1, "nBlock": 32}}]}})
except DeviceLost as exc:
    print("DeviceLost:", exc.status, exc.message)
    print("store unchanged:", kaas.buffers.store.get("x") == bytes(64))
'''


def test_a_faulting_kernel_fails_its_request_and_loses_the_device(tmp_path):
    """In a child process: the fault is sticky and would spoil this process's CUDA context."""
    lib = tmp_path / "faulty"
    lib.mkdir()
    (lib / "kernels.cu").write_text('extern "C" __global__ void wild(int n, float* x) {\n'
                                    '    x[(size_t)threadIdx.x << 40] = 1.0f;  // far outside any allocation\n}\n')
    (lib / "reference.py").write_text(textwrap.dedent('''
        from shim.kaas.signature import Arg, Kernel

        def wild(n, x):
            raise MemoryError("out of bounds")

        KERNELS = [Kernel("wild", "n:i", [Arg("x", "io", "float32", "n")], wild)]
    '''))
    code = FAULTY.format(root=str(ROOT), lib=str(lib))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    # sticky (an illegal address): DeviceLost, a 503 that makes the shim restart; nothing was written
    assert "DeviceLost: 503" in out.stdout and "CUDA error 700" in out.stdout, out.stdout + out.stderr
    assert "store unchanged: True" in out.stdout


def test_a_buffer_the_gpu_cannot_hold_is_a_503_to_retry_and_the_runner_goes_on():
    from accel.errors import NotReady
    from shim.backends.kaas_cuda import CudaKernelRunner

    runner = CudaKernelRunner()
    with pytest.raises(NotReady, match="retry") as got:
        runner.alloc(1 << 45)  # 32 TiB
    assert type(got.value) is NotReady and got.value.status == 503 and got.value.retry_after
    assert runner.download(runner.upload(b"\x01\x02\x03")) == b"\x01\x02\x03"
