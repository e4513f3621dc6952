"""Shared benchmark helpers: timing, percentiles, environment, a shim subprocess, result files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99/mean/min in milliseconds."""
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]  # noqa: E731
    return {"p50_ms": pick(0.5) * 1e3, "p99_ms": pick(0.99) * 1e3, "mean_ms": statistics.fmean(s) * 1e3,
            "min_ms": s[0] * 1e3, "n": len(s)}


def time_calls(fn: Callable[[], Any], n: int, warmup: int = 5, budget_s: float = 20.0) -> list[float]:
    """Wall time of ``n`` calls of ``fn`` after ``warmup`` calls (stops early past ``budget_s``)."""
    for _ in range(warmup):
        fn()
    samples = []
    stop = time.perf_counter() + budget_s
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        if time.perf_counter() > stop and len(samples) >= 10:
            break
    return samples


def fresh_process_seconds(code: str, runs: int = 10, env: dict[str, str] | None = None,
                          stdin: bytes | None = None) -> float:
    """Median wall time of ``python -c code`` in a fresh interpreter."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], input=stdin, check=True, env=env,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
    }
    for mod in ("numpy", "onnxruntime", "cupy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("ACCELSHIM_")}
    if settings:  # the shims it starts read them: a run's settings are its flags and these
        info["shim_environment"] = settings
    info.update(extra or {})
    return info


class ShimProcess:
    """``accelshim serve`` on a free TCP port and a unix socket, for the length of a ``with``.

    ``workers`` > 1: ``--workers N`` (N request processes in front of the one device process).
    """

    def __init__(self, device: str = "cpu", models: Path = ROOT / "models", *extra: str, workers: int = 1) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="accelbench-")
        self.sock = f"{self.dir}/shim.sock"
        self.cmd = [sys.executable, "-m", "shim", "serve", "--port", str(self.port), "--unix", self.sock,
                    "--device", device, "--models", str(models), "--log-level", "WARNING", *extra]
        if workers > 1:
            self.cmd += ["--workers", str(workers)]
        self.tcp_url, self.unix_url = f"http://127.0.0.1:{self.port}", f"unix://{self.sock}"

    def __enter__(self) -> "ShimProcess":
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def launch(self) -> None:
        """Start the shim without waiting for it (``wait_ready``; ``__exit__`` stops it)."""
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd)

    def wait_ready(self, timeout: float = 300) -> None:
        """Wait until the shim says it is ready, giving up as soon as it exits (a shim that cannot
        start, e.g. for a missing package, fails the benchmark at once instead of after ``timeout``)."""
        import accel

        client, deadline = accel.Client(self.tcp_url, timeout=10), time.monotonic() + timeout
        while not client.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the shim exited with {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the shim was not ready in {timeout:.0f} s")
            time.sleep(0.05)
        self.ready_seconds = time.perf_counter() - self.started

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def probe_device() -> str:
    """The device of a probe's shim: ``PROBE_DEVICE`` (cpu on a machine without a GPU), else cuda."""
    return os.environ.get("PROBE_DEVICE", "cuda")


def probe_shim(*flags: str, workers: int = 1) -> ShimProcess:
    """A probe's shim, not started yet: on ``probe_device()``, with our models, ``flags`` and ``workers``."""
    return ShimProcess(probe_device(), ROOT / "models", *flags, workers=workers)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: Path | None = None) -> list[Path]:
    """Write ``<date>-<device>-<name>.json`` and ``.md``; returns the paths."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = data.get("environment", {})
    device = slug(env.get("gpu", "").split(",")[0] or f"cpu{env.get('cpus', '')}")
    stem = f"{env.get('date', '')[:10]}-{device}-{name}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown)
    return paths


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
