"""Kernel-as-a-Service: what graphs, resident const buffers and a warm shim buy.

    python -m bench kaas [--device auto|cuda|cpu] [--out DIR] [--quick]

1. graph: a 100-kernel graph (axpy, y io) in one request vs the same kernels as 100 requests.
2. const: a request whose const input (an NxN matrix, sgemm) is resident in the GPU cache vs the
   same request after a PUT of that matrix (the request uploads it).
3. jacobi: a Jacobi solve (A const and resident; b and x sent, x read back) via KaaS vs in-process
   cupy (numpy with ``--device cpu``) on an A that is already on the device: written with array
   ops (``A @ x``), and launching the KaaS kernel itself (its numpy reference on the CPU).

All through a real ``accelshim serve`` over its unix socket, medians of repeated runs; bounded to
well under 2 minutes. Writes ``<date>-<device>-kaas.json`` and ``.md`` under ``--out``
(default bench/results/).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, ShimProcess, environment, md_table, time_calls, write_results  # noqa: E402

# per device: vector length, sgemm n, jacobi n and steps, repeats
SIZES = {"cuda": {"vec": 1 << 16, "gemm": 2048, "jacobi": 2048, "steps": 500, "reps": 20},
         "cpu": {"vec": 1 << 14, "gemm": 256, "jacobi": 256, "steps": 100, "reps": 10}}


def _resolve(device: str) -> str:
    if device != "auto":
        return device
    import importlib.util

    return "cuda" if shutil.which("nvidia-smi") and importlib.util.find_spec("cupy") else "cpu"


def _buf(name: str, size: int | None = None, **kw: Any) -> dict[str, Any]:
    return {"name": name, **({"size": size} if size is not None else {}), **kw}


def _median_ms(fn: Callable[[], Any], reps: int, budget_s: float = 15.0) -> float:
    return statistics.median(time_calls(fn, reps, warmup=2, budget_s=budget_s)) * 1e3


def graph_vs_requests(client: Any, n: int, reps: int) -> dict[str, Any]:
    """100 axpy launches: one request with 100 kernels vs 100 one-kernel requests."""
    client.put_buffer("bx", np.ones(n, np.float32))
    client.put_buffer("by", np.zeros(n, np.float32))
    axpy = {"library": "elementwise", "kernel": "axpy", "literals": [{"type": "Q", "val": n}, {"type": "f", "val": 1e-3}],
            "arguments": [[_buf("x", key="bx", const=True), "i"], [_buf("y", key="by"), "io"]], "nGrid": 256,
            "nBlock": 256}
    one_graph = {"kernels": [axpy] * 100}
    single = {"kernels": [axpy]}
    graph_ms = _median_ms(lambda: client.kaas(one_graph), reps)
    requests_ms = _median_ms(lambda: [client.kaas(single) for _ in range(100)], max(3, reps // 4))
    kernels_ms = sum(k["ms"] for k in client.kaas(one_graph)["timings_ms"]["kernels"])
    return {"vector": n, "one_request_100_kernels_ms": graph_ms, "100_requests_ms": requests_ms,
            "device_kernel_ms": kernels_ms, "ratio": requests_ms / graph_ms}


def const_resident_vs_upload(client: Any, n: int, reps: int) -> dict[str, Any]:
    """C = A @ B with A const (n x n): A resident vs A re-uploaded by the request."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    client.put_buffer("cA", a)
    client.put_buffer("cB", rng.standard_normal((n, 16), dtype=np.float32))
    request = {"kernels": [{
        "library": "blas", "kernel": "sgemm", "literals": [{"type": "i", "val": v} for v in (n, 16, n)],
        "arguments": [[_buf("A", key="cA", const=True), "i"], [_buf("B", key="cB"), "i"],
                      [_buf("C", n * 16 * 4, key="cC"), "o"]], "nGrid": [1, (n + 15) // 16], "nBlock": [16, 16]}]}
    resident_ms = _median_ms(lambda: client.kaas(request), reps)
    put_times, upload_times = [], []
    for _ in range(max(3, reps // 2)):
        t = time.perf_counter()
        client.put_buffer("cA", a)  # invalidates the device copy: the next request uploads A
        put_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = client.kaas(request)
        upload_times.append(time.perf_counter() - t)
        assert result["cache"]["misses"] >= 1
    upload_ms = statistics.median(upload_times) * 1e3
    return {"n": n, "const_bytes": a.nbytes, "resident_ms": resident_ms, "uploaded_ms": upload_ms,
            "put_ms": statistics.median(put_times) * 1e3, "ratio": upload_ms / resident_ms}


def jacobi_kaas_vs_inprocess(client: Any, device: str, n: int, steps: int, reps: int) -> dict[str, Any]:
    """A Jacobi solve: send b and x0, ``steps`` steps, read x back."""
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    a[np.diag_indices(n)] = np.abs(a).sum(axis=1) + 1.0
    b = rng.uniform(-1, 1, n).astype(np.float32)
    client.put_buffer("jA", a)
    lit = [{"type": "i", "val": n}]
    args = lambda src, dst: [[_buf("A", key="jA", const=True), "i"], [_buf("b", key="jb"), "i"],  # noqa: E731
                             [src, "i"], [dst, "o"]]
    x, xn = _buf("x", key="jx"), _buf("xn", n * 4, ephemeral=True)
    step = lambda src, dst: {"library": "jacobi", "kernel": "jacobi_step", "literals": lit,  # noqa: E731
                             "arguments": args(src, dst), "nGrid": min(4096, (n + 3) // 4), "nBlock": 128}
    request = {"kernels": [step(x, xn), step(xn, x)], "nIter": steps // 2}

    def via_kaas() -> np.ndarray:
        client.put_buffer("jb", b)
        client.put_buffer("jx", np.zeros(n, np.float32))
        client.kaas(request)
        return client.get_buffer("jx", dtype=np.float32)

    if device == "cuda":
        import cupy as xp
    else:
        xp = np
    a_dev = xp.asarray(a)
    diag = xp.diagonal(a_dev).copy()

    def in_process() -> np.ndarray:
        b_dev, x_dev = xp.asarray(b), xp.zeros(n, xp.float32)
        for _ in range(steps):
            x_dev = (b_dev - (a_dev @ x_dev - diag * x_dev)) / diag
        return xp.asnumpy(x_dev) if xp is not np else x_dev

    same_kernel = _same_kernel_solver(device, xp, a_dev, b, n, steps)
    exact = np.linalg.solve(a.astype(np.float64), b.astype(np.float64))
    solvers = (("kaas", via_kaas), ("in_process", in_process), ("in_process_same_kernel", same_kernel))
    errors = {name: float(np.linalg.norm(fn() - exact) / np.linalg.norm(exact)) for name, fn in solvers}
    ms = {name: _median_ms(fn, reps) for name, fn in solvers}
    return {"n": n, "steps": steps, "kaas_ms": ms["kaas"], "in_process_ms": ms["in_process"],
            "in_process_same_kernel_ms": ms["in_process_same_kernel"], "ratio": ms["kaas"] / ms["in_process"],
            "ratio_same_kernel": ms["kaas"] / ms["in_process_same_kernel"], "rel_error": errors}


def _same_kernel_solver(device: str, xp: Any, a_dev: Any, b: np.ndarray, n: int, steps: int) -> Callable[[], np.ndarray]:
    """The KaaS jacobi_step kernel itself, launched in-process (its numpy reference on the CPU)."""
    from shim.kaas.library import BUILTIN_DIR, load_library

    lib = load_library(BUILTIN_DIR / "jacobi")
    if device == "cuda":
        step = xp.RawModule(code=lib.source, options=("-std=c++14",)).get_function("jacobi_step")
        grid, nn = (min(4096, (n + 3) // 4),), np.int32(n)

        def run() -> np.ndarray:
            b_dev, x, xn = xp.asarray(b), xp.zeros(n, xp.float32), xp.empty(n, xp.float32)
            for _ in range(steps // 2):
                step(grid, (128,), (nn, a_dev, b_dev, x, xn))
                step(grid, (128,), (nn, a_dev, b_dev, xn, x))
            return xp.asnumpy(x)
        return run
    reference = lib.kernels["jacobi_step"].reference
    flat = np.ascontiguousarray(a_dev).ravel()

    def run_cpu() -> np.ndarray:
        x, xn = np.zeros(n, np.float32), np.empty(n, np.float32)
        for _ in range(steps // 2):
            reference(n, flat, b, x, xn)
            reference(n, flat, b, xn, x)
        return x
    return run_cpu


def markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    g, c, j = data.get("graph"), data.get("const"), data.get("jacobi")
    lines = [f"# KaaS ({data['device']}, {env['date']}, {env.get('gpu') or env['processor']}, {env['cpus']} CPUs)\n"]
    rows = []
    if g:
        rows.append([f"{g['vector']}-element axpy x100: 100 requests vs 1 request of 100 kernels",
                     g["100_requests_ms"], g["one_request_100_kernels_ms"], f"{g['ratio']:.1f}x"])
    if c:
        rows.append([f"sgemm, const A {c['n']}x{c['n']} ({c['const_bytes'] / 2**20:.1f} MiB): uploaded vs resident",
                     c["uploaded_ms"], c["resident_ms"], f"{c['ratio']:.1f}x"])
    if j:
        lib = "cupy" if data["device"] == "cuda" else "numpy"
        rows.append([f"Jacobi n={j['n']}, {j['steps']} steps: KaaS vs in-process {lib} (A @ x)", j["kaas_ms"],
                     j["in_process_ms"], f"{j['ratio']:.2f}x"])
        rows.append([f"Jacobi n={j['n']}, {j['steps']} steps: KaaS vs in-process {lib}, the same kernel", j["kaas_ms"],
                     j["in_process_same_kernel_ms"], f"{j['ratio_same_kernel']:.2f}x"])
    lines.append(md_table(["case", "A ms (p50)", "B ms (p50)", "A / B"], rows))
    if g:
        lines.append(f"- device time of the 100 kernels (first iteration, events): {g['device_kernel_ms']:.3f} ms")
    if c:
        lines.append(f"- the PUT of A itself: {c['put_ms']:.2f} ms")
    if j:
        lines.append("- relative error vs a float64 solve: " + ", ".join(f"{k} {v:.2e}" for k, v in j["rel_error"].items()))
    for key in ("errors",):
        for name, err in data.get(key, {}).items():
            lines.append(f"- {name} failed: {err}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = _resolve(args.device)
    sizes = dict(SIZES[device])
    if args.quick:
        sizes["reps"] = max(3, sizes["reps"] // 4)
    import accel

    data: dict[str, Any] = {"benchmark": "kaas", "device": device, "sizes": sizes,
                            "environment": environment({"device_arg": args.device}), "errors": {}}
    start = time.perf_counter()
    with ShimProcess(device, args.models, "--classify-model", "") as shim:
        data["shim_ready_s"] = shim.ready_seconds
        client = accel.Client(shim.unix_url, timeout=120)
        sections = {"graph": lambda: graph_vs_requests(client, sizes["vec"], sizes["reps"]),
                    "const": lambda: const_resident_vs_upload(client, sizes["gemm"], sizes["reps"]),
                    "jacobi": lambda: jacobi_kaas_vs_inprocess(client, device, sizes["jacobi"], sizes["steps"],
                                                               sizes["reps"])}
        for name, run in sections.items():
            try:
                data[name] = run()
                print(name, json.dumps(data[name]), flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded; the other sections go on
                data["errors"][name] = f"{type(exc).__name__}: {exc}"
                print(name, "failed:", data["errors"][name], file=sys.stderr, flush=True)
    data["seconds"] = time.perf_counter() - start
    text = markdown(data)
    print(text)
    for path in write_results("kaas", data, text, args.out):
        print("wrote", path)
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
