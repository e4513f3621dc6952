"""Probes of the request path behind the GPU benchmark, for A/B runs on the GPU machine.

    python bench/worker_ab.py throughput LABEL   # the shim with --workers 8: 1, 32, 128 clients, 5 s each
    python bench/worker_ab.py latency LABEL N    # the shim with --workers N (1: one process): classify
                                                 # batch 1 p50/p99, and a 12 MiB region's register and gemms

An A/B run starts the probe once on the code as it is and once on a variant (for worker-side
batching: ``shim/workers/front.py`` building its ops without a BatchingFactory), minutes apart on
the same machine; bench/results/NOTES.md records which.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, ShimProcess  # noqa: E402
from bench.loop import process_closed_loop  # noqa: E402
from bench.procs import cat_jpeg  # noqa: E402


def quantiles(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {1e3 * xs[len(xs) // 2]:.2f} p99 {1e3 * xs[int(len(xs) * 0.99)]:.2f} ms"


def throughput(label: str) -> None:
    jpeg = cat_jpeg()
    with ShimProcess("cuda", ROOT / "models", workers=8) as shim:
        process_closed_loop(("accel", shim.unix_url), jpeg, 32, 2.0, 16)  # warm
        for clients in (1, 32, 128):
            out = process_closed_loop(("accel", shim.unix_url), jpeg, clients, 5.0, min(clients, 16))
            print(label, clients, f"{out['images_per_s']:.0f} img/s p50 {out.get('p50_ms', 0):.1f} "
                  f"p99 {out.get('p99_ms', 0):.1f}", "errors", out["errors"], flush=True)


def latency(label: str, workers: int) -> None:
    import accel

    jpeg, n = cat_jpeg(), 1024
    with ShimProcess("cuda", ROOT / "models", workers=workers) as shim:
        client = accel.Client(shim.unix_url)
        for _ in range(50):
            client.classify(jpeg)
        times = []
        for _ in range(400):
            t = time.perf_counter()
            client.classify(jpeg)
            times.append(time.perf_counter() - t)
        print(label, "classify b1", quantiles(times), flush=True)
        register, first, second = [], [], []
        for i in range(5):
            with accel.SharedMemory(f"probe{i}", 3 * n * n * 4 + 4096) as region:
                a, b = region.tensor("A", (n, n)), region.tensor("B", (n, n))
                a.raw[:], b.raw[:] = bytes(n * n * 4), bytes(n * n * 4)
                t0 = time.perf_counter()
                client.register_shm(region.name, region.key, region.byte_size)
                client._shm_registered[region.name] = region.key  # noqa: SLF001 - so gemm does not register again
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["throughput"]:
        throughput(sys.argv[2])
    elif sys.argv[1:2] == ["latency"]:
        latency(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
