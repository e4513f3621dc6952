"""Round-trip overhead of the shim: client over TCP and unix socket vs the same work in-process.

    python bench/overhead.py [--device cpu|cuda|auto] [--out DIR] [--quick]

Cases: noop (empty, 1 MiB), gemm FP32 n=64/256/1024, classify batch 1 (the cat photo as JPEG);
plus the time of ``python -c "import accel"`` against a bare interpreter, and of a fresh process's
first ``classify``. Prints a table; writes JSON + Markdown to bench/results/.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (ROOT, ShimProcess, environment, fresh_process_seconds, md_table, percentiles,  # noqa: E402
                          time_calls, write_results)


def cat_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    out = io.BytesIO()
    Image.fromarray(data.chelsea()).save(out, format="JPEG", quality=90)
    return out.getvalue()


def in_process_ops(device: str, models: Path) -> dict[str, Callable[..., Any]]:
    """The same ops without the shim: the backend and op objects called directly."""
    from shim.config import Settings
    from shim.service import build_service

    svc = build_service(Settings(device=device, models_dir=models))
    svc.load()
    classify = svc.registry.get("classify")
    gemm = svc.backend.gemm
    return {
        "noop": lambda **arrays: dict(arrays),
        "gemm": lambda a, b: gemm(a, b, None, 1.0, 0.0),
        "classify": lambda jpeg: classify.run({"image": np.array([jpeg], dtype=object)}, {"top_k": 5}),
        "backend": svc.backend.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    import accel

    n = 100 if args.quick else 1000
    jpeg = cat_jpeg()
    rng = np.random.default_rng(0)
    mats = {k: (rng.random((k, k), dtype=np.float32), rng.random((k, k), dtype=np.float32)) for k in (64, 256, 1024)}
    mib = rng.random(1 << 18, dtype=np.float32)  # 1 MiB
    local = in_process_ops(args.device, args.models)
    cases: list[tuple[str, int, Callable[[Any], Any], Callable[[], Any]]] = [
        ("noop empty", n, lambda c: c.noop(), lambda: local["noop"]()),
        ("noop 1 MiB", n // 4, lambda c: c.noop(x=mib), lambda: local["noop"](x=mib)),
    ]
    for k, (a, b) in mats.items():
        cases.append((f"gemm FP32 n={k}", n // (1 if k < 1024 else 10), lambda c, a=a, b=b: c.gemm(a, b),
                      lambda a=a, b=b: local["gemm"](a, b)))
    cases.append(("classify batch 1", n // 10, lambda c: c.classify(jpeg), lambda: local["classify"](jpeg)))

    rows, results = [], []
    with ShimProcess(args.device, args.models) as shim:
        clients = {"tcp": accel.Client(shim.tcp_url), "unix": accel.Client(shim.unix_url)}
        for name, iters, remote, inproc in cases:
            entry: dict[str, Any] = {"case": name, "in_process": percentiles(time_calls(inproc, iters))}
            for transport, client in clients.items():
                entry[transport] = percentiles(time_calls(lambda: remote(client), iters))
            results.append(entry)
            ip, un, tc = entry["in_process"]["p50_ms"], entry["unix"]["p50_ms"], entry["tcp"]["p50_ms"]
            rows.append([name, ip, un, entry["unix"]["p99_ms"], tc, entry["tcp"]["p99_ms"], un - ip,
                         f"{un / ip:.2f}x" if ip > 0.001 else "-"])
            print(f"{name:18s} in-process {ip:8.3f} ms | unix p50 {un:8.3f} p99 {entry['unix']['p99_ms']:8.3f} | "
                  f"tcp p50 {tc:8.3f} p99 {entry['tcp']['p99_ms']:8.3f}", flush=True)

        bare = fresh_process_seconds("pass", 20)
        imported = fresh_process_seconds("import accel", 20)
        first = fresh_process_seconds(
            f"import sys, accel; accel.Client({shim.unix_url!r}).classify(sys.stdin.buffer.read())", 10, stdin=jpeg)
        ready = shim.ready_seconds
    cold = {"bare_interpreter_s": bare, "import_accel_s": imported, "import_accel_extra_ms": (imported - bare) * 1e3,
            "fresh_process_first_classify_s": first, "shim_start_to_ready_s": ready}
    print(f"bare python {bare * 1e3:.1f} ms, python -c 'import accel' {imported * 1e3:.1f} ms "
          f"(+{(imported - bare) * 1e3:.1f} ms), fresh process first classify {first * 1e3:.1f} ms, "
          f"shim start to ready {ready:.2f} s")
    data = {"benchmark": "overhead", "backend": local["backend"],
            "environment": environment(), "cases": results, "cold": cold}
    md = (f"# accelshim overhead ({data['environment']['date']}, {data['environment'].get('gpu') or data['environment']['processor']}, "
          f"{data['environment']['cpus']} CPUs, backend {local['backend']})\n\n"
          + md_table(["case", "in-process p50 ms", "unix p50 ms", "unix p99 ms", "tcp p50 ms", "tcp p99 ms",
                      "unix overhead ms", "unix / in-process"], rows)
          + f"\n- bare interpreter {bare * 1e3:.1f} ms; `python -c \"import accel\"` {imported * 1e3:.1f} ms "
            f"(+{(imported - bare) * 1e3:.1f} ms)\n- fresh process, import + first classify over the unix socket: "
            f"{first * 1e3:.1f} ms\n- shim process start to ready (load + warm-up): {ready:.2f} s\n")
    for path in write_results("overhead", data, md, args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
