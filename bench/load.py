"""The shim's batching metrics (for the GPU benchmark's throughput section); run as a program, the
load-and-fault test of the shim:

    python bench/load.py --clients 8 --seconds 30 [--kill-every 5]   (or: python -m bench load ...)

N client threads of two tenants call a fresh loopback shim (its own ``--tokens`` and
``--state-dir``) back to back for T seconds over a mix of ops: noop, gemm, classify, and buffer
put + get. With ``--kill-every S`` the shim is SIGKILLed every S seconds and started again on the
same port, socket and state dir. It reports requests done, errors by kind, p50/p99 latency and the
shim's RSS at start and end, and checks that every call either succeeded or raised an explicit
``accel`` error, and that every acknowledged buffer write is still readable, byte for byte.
Results go to ``bench/results/<date>-<device>-load.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, md_table, percentiles, write_results  # noqa: E402
from bench.procs import CHILD_TIMEOUT_S, cat_jpeg, child_env, rss_mib, run_threads  # noqa: E402


def metrics_text(url: str) -> str:
    """The shim's Prometheus text (``url`` is its http://host:port)."""
    with urllib.request.urlopen(url + "/metrics", timeout=20) as resp:
        return resp.read().decode("utf-8", "replace")


#: the dynamic batchers' histograms in /metrics: rows per device run, seconds per device run, and
#: how long an item waited for its batch (all labelled by op)
BATCH_METRICS = ("accelshim_batch_size", "accelshim_batch_seconds", "accelshim_queue_seconds")


def batch_histogram(text: str) -> dict[str, float]:
    """The samples (buckets, sums, counts) of the batchers' histograms (``BATCH_METRICS``)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("#") and line.split("{")[0].split(" ")[0].startswith(BATCH_METRICS):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def histogram_mean(before: dict[str, float], after: dict[str, float],
                   metric: str = "accelshim_batch_size") -> tuple[float | None, float]:
    """The mean of histogram ``metric`` between two scrapes (summed over labels), and its count."""
    def total(suffix: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k.split("{")[0] == f"{metric}{suffix}")

    count = total("_count")
    return (total("_sum") / count if count > 0 else None), count


# --- the load-and-fault test --------------------------------------------------------------------
TENANTS = {"tenant-a": "load-tenant-a-" + "0" * 16, "tenant-b": "load-tenant-b-" + "1" * 16}
OPS = ("noop", "gemm", "classify", "buffer")


class LoadShim:
    """``accelshim serve`` on loopback with tokens and a state dir; ``kill9`` + ``start`` restart it
    on the same port, socket and state."""

    def __init__(self, work: Path, models: Path, device: str) -> None:
        from shim.auth import hash_token

        self.work, self.models, self.device = work, models, device
        (work / "tokens").write_text("".join(f"{t}: {hash_token(v)}\n" for t, v in TENANTS.items()))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.unix_url = f"unix://{work / 'shim.sock'}"
        self.proc: subprocess.Popen | None = None
        self._log = open(work / "shim.log", "ab")

    def start(self, timeout: float = CHILD_TIMEOUT_S) -> float:
        """Start the shim; returns the seconds until it answered ready."""
        import accel

        cmd = [sys.executable, "-m", "shim", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--unix", str(self.work / "shim.sock"), "--device", self.device, "--models", str(self.models),
               "--tokens", str(self.work / "tokens"), "--state-dir", str(self.work / "state")]
        start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=child_env())
        probe = accel.Client(self.url, timeout=2.0)
        while not probe.ready():
            if self.proc.poll() is not None or time.monotonic() - start > timeout:
                raise RuntimeError(f"the shim did not start (exit {self.proc.poll()}); see {self.work / 'shim.log'}")
            time.sleep(0.05)
        return time.monotonic() - start

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode if self.proc is not None else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(clients: int, seconds: float, kill_every: float | None, models: Path, device: str = "cpu",
             timeout: float = 30.0) -> dict[str, Any]:
    """The load-and-fault test (see the module docstring); returns its figures."""
    import numpy as np

    import accel

    jpeg = cat_jpeg()
    a, b = np.random.default_rng(0).standard_normal((2, 64, 64), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="accelshim-load-") as tmp:
        shim = LoadShim(Path(tmp), models, device)
        startup_s = shim.start()
        rss_start = rss_mib(shim.proc.pid)  # type: ignore[union-attr]
        stop = threading.Event()
        latencies: dict[str, list[float]] = {op: [] for op in OPS}
        errors: Counter = Counter()
        unexplained: list[str] = []
        acked: dict[tuple[str, str], bytes] = {}
        lock = threading.Lock()

        def client_loop(i: int) -> None:
            tenant = sorted(TENANTS)[i % 2]
            client = accel.Client(shim.unix_url if i % 2 else shim.url, timeout=timeout, token=TENANTS[tenant])
            n = 0
            while not stop.is_set():
                op, n = OPS[(i + n) % len(OPS)], n + 1
                t = time.perf_counter()
                try:
                    if op == "noop":
                        client.noop(x=np.arange(256, dtype=np.int32))
                    elif op == "gemm":
                        np.testing.assert_allclose(client.gemm(a, b), a @ b, rtol=1e-3, atol=1e-3)
                    elif op == "classify":
                        client.classify(jpeg, top_k=1)
                    else:
                        key, data = f"c{i}-{n}", os.urandom(1024 + 97 * (n % 64))
                        client.put_buffer(key, data)
                        with lock:
                            acked[(tenant, key)] = data
                        if client.get_buffer(key) != data:
                            raise AssertionError(f"buffer {key} read back different bytes")
                except accel.AccelError as exc:  # an explicit answer: allowed, counted
                    with lock:
                        errors[f"{type(exc).__name__} {exc.status}"] += 1
                    continue
                except Exception as exc:  # noqa: BLE001 - a silent failure: the test fails
                    with lock:
                        unexplained.append(f"{op}: {type(exc).__name__}: {exc}")
                    continue
                latencies[op].append(time.perf_counter() - t)

        kills: list[float] = []

        def killer() -> None:
            while kill_every and not stop.wait(kill_every):
                shim.kill9()
                kills.append(shim.start())

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
        threads.append(threading.Thread(target=killer, daemon=True))
        began = time.monotonic()
        run_threads(threads, seconds, stop, timeout + 60)
        elapsed = time.monotonic() - began
        rss_end = rss_mib(shim.proc.pid)  # type: ignore[union-attr]
        lost = []
        for tenant, token in TENANTS.items():
            reader = accel.Client(shim.url, timeout=timeout, token=token)
            for (owner, key), data in sorted(acked.items()):
                if owner == tenant:
                    try:
                        if reader.get_buffer(key) != data:
                            lost.append(key)
                    except accel.AccelError:
                        lost.append(key)
        exit_code = shim.stop()
    done = sum(len(v) for v in latencies.values())
    everything = [x for v in latencies.values() for x in v]
    return {
        "clients": clients, "seconds": round(elapsed, 2), "kill_every_s": kill_every, "device": device,
        "requests_done": done, "requests_per_s": done / elapsed, "errors": dict(errors),
        "unexplained_failures": len(unexplained), "first_unexplained": unexplained[:5],
        "latency": percentiles(everything) if everything else {},
        "latency_by_op": {op: percentiles(v) for op, v in latencies.items() if v},
        "kills": len(kills), "restart_to_ready_s": [round(k, 2) for k in kills], "startup_s": round(startup_s, 2),
        "acknowledged_writes": len(acked), "lost_writes": len(lost), "first_lost": lost[:5],
        "rss_mib_start": rss_start, "rss_mib_end": rss_end, "shim_exit_on_sigterm": exit_code,
    }


def _markdown(r: dict[str, Any]) -> str:
    lat = r["latency"]
    lines = [f"# accelshim load and fault test ({r['device']})", "",
             f"{r['clients']} clients for {r['seconds']} s over noop, gemm 64x64, classify and buffer put+get; "
             + (f"shim killed with SIGKILL every {r['kill_every_s']} s." if r["kill_every_s"] else "no kills."), "",
             md_table(["clients", "requests", "req/s", "p50 ms", "p99 ms", "kills survived", "acked writes", "lost",
                       "unexplained failures", "RSS start MiB", "RSS end MiB"],
                      [[r["clients"], r["requests_done"], r["requests_per_s"], lat.get("p50_ms", 0.0),
                        lat.get("p99_ms", 0.0), r["kills"], r["acknowledged_writes"], r["lost_writes"],
                        r["unexplained_failures"], r["rss_mib_start"] or 0.0, r["rss_mib_end"] or 0.0]]),
             md_table(["op", "n", "p50 ms", "p99 ms"],
                      [[op, v["n"], v["p50_ms"], v["p99_ms"]] for op, v in r["latency_by_op"].items()]),
             "Errors by kind (explicit answers): " + (", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"),
             ""]
    if r["kills"]:
        lines.append(f"Restart to ready after each kill: {r['restart_to_ready_s']} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python bench/load.py``: exit 0 when no call failed silently and no acknowledged write was lost."""
    parser = argparse.ArgumentParser(prog="python bench/load.py", description=__doc__.split("\n\n")[1])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--kill-every", type=float, default=None, metavar="S", help="SIGKILL the shim every S s")
    parser.add_argument("--models", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--timeout", type=float, default=30.0, help="each client call's timeout, retries included")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 3600:
        parser.error("--clients 1..256, --seconds up to 3600")
    result = run_load(args.clients, args.seconds, args.kill_every, args.models, args.device, args.timeout)
    result["environment"] = environment()
    md = _markdown(result)
    paths = write_results("load" if not args.kill_every else "load-kill", result, md, args.out)
    print(md)
    print("wrote " + " ".join(str(p) for p in paths))
    return 0 if result["unexplained_failures"] == 0 and result["lost_writes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
