"""Probes of single calls, timed one by one: classify at batch 1, and gemms through fresh 12 MiB
shared-memory regions (registering, the first call, the backend's pin). ``bench/worker_ab.py`` runs
them (``latency``, ``first``, ``region``) and says what each prints; ``PROBE_DEVICE=cpu`` runs them
on a machine without a GPU.
"""
from __future__ import annotations

import time

from bench.common import probe_device, probe_shim
from bench.procs import cat_jpeg


def _quantiles(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {1e3 * xs[len(xs) // 2]:.2f} p99 {1e3 * xs[int(len(xs) * 0.99)]:.2f} ms"


def latency(label: str, workers: int) -> None:
    """Classify at batch 1 (p50, p99), then a 12 MiB region's register and its first and second gemm."""
    import accel

    jpeg, n = cat_jpeg(), 1024
    with probe_shim(workers=workers) as shim:
        client = accel.Client(shim.unix_url)
        for _ in range(50):
            client.classify(jpeg)
        times = []
        for _ in range(400):
            t = time.perf_counter()
            client.classify(jpeg)
            times.append(time.perf_counter() - t)
        print(label, "classify b1", _quantiles(times), flush=True)
        register, first, second = [], [], []
        for i in range(5):
            with accel.SharedMemory(f"probe{i}", 3 * n * n * 4 + 4096) as region:
                a, b = region.tensor("A", (n, n)), region.tensor("B", (n, n))
                a.raw[:], b.raw[:] = bytes(n * n * 4), bytes(n * n * 4)
                t0 = time.perf_counter()
                client.register_shm(region.name, region.key, region.byte_size)
                t1 = time.perf_counter()
                client.gemm(a, b, shm=region)
                t2 = time.perf_counter()
                client.gemm(a, b, shm=region)
                t3 = time.perf_counter()
                register.append(t1 - t0), first.append(t2 - t1), second.append(t3 - t2)
                client.unregister_shm(region.name)
                del a, b
        print(label, "register 12MiB ms", [round(1e3 * x, 2) for x in register], "first gemm",
              [round(1e3 * x, 2) for x in first], "second", [round(1e3 * x, 2) for x in second], flush=True)


def first(workers: int) -> None:
    """A function's first gemm through a fresh 12 MiB region, registered on the way (one request) and
    the standard way (a register request, then the gemm): ms from making the region to the result,
    filling A and B left out, as in the cold-start benchmark."""
    import statistics

    import accel

    n = 1024
    with probe_shim(workers=workers) as shim:
        client = accel.Client(shim.unix_url)
        for _ in range(50):
            client.noop()
        times: dict[str, list[float]] = {"on the way": [], "register first": []}
        for i in range(12):
            for how, xs in times.items():
                t0 = time.perf_counter()
                region = accel.SharedMemory(f"first{i}{how[0]}", 3 * n * n * 4 + 4096)
                a, b = region.tensor("A", (n, n)), region.tensor("B", (n, n))
                t1 = time.perf_counter()
                a.raw[:], b.raw[:] = bytes(n * n * 4), bytes(n * n * 4)
                t2 = time.perf_counter()
                if how == "register first":
                    client.register_shm(region.name, region.key, region.byte_size)
                c = client.gemm(a, b, shm=region)
                xs.append(1e3 * (t1 - t0 + time.perf_counter() - t2))
                client.unregister_shm(region.name)
                del a, b, c
                region.close()
        for how, xs in times.items():
            print(f"workers={workers} first call, {how}: median {statistics.median(xs):.2f} ms, all "
                  f"{[round(x, 2) for x in xs]}", flush=True)


def region() -> None:
    """Three gemms through a fresh 12 MiB region in this process, with the shim's own hooks (the
    prefault and the backend's pin): ms each, as the shim does it, without the prefault, and with the
    pin waited for before the first."""
    import statistics

    import numpy as np

    import accel
    from shim.backends import select_backend
    from shim.config import Settings
    from shim.service import build_shm

    backend = select_backend(probe_device())
    n, nbytes = 1024, 1024 * 1024 * 4
    rng = np.random.default_rng(0)
    a0, b0 = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    variants = {"as the shim does": 4, "no prefault": 0, "pinned before the first": 4}
    results: dict[str, list[list[float]]] = {v: [] for v in variants}
    for i in range(5):
        for variant, threads in variants.items():
            shm = build_shm(Settings(shm_prefault_threads=threads), backend)
            assert shm is not None
            made = accel.SharedMemory(f"region{i}", 3 * nbytes + 4096)
            made.view(0, nbytes)[:], made.view(nbytes, nbytes)[:] = a0.tobytes(), b0.tobytes()
            mapping = shm.register("r", made.key, 0, made.byte_size, "t")
            if variant == "pinned before the first" and hasattr(backend, "pinned"):
                backend.pinned.wait(mapping.address)
            views = [np.frombuffer(shm.view(mapping, k * nbytes, nbytes, "x"), np.float32).reshape(n, n)
                     for k in range(3)]
            times = []
            for _ in range(3):
                t = time.perf_counter()
                backend.gemm(views[0], views[1], None, 1.0, 0.0, out=views[2])
                times.append(1e3 * (time.perf_counter() - t))
            results[variant].append(times)
            del views
            shm.close()
            made.close()
    for variant, runs in results.items():
        print(f"{variant}: gemm 1, 2, 3 (medians of {len(runs)}):",
              [round(statistics.median(r[k] for r in runs), 2) for k in range(3)], "ms", flush=True)
