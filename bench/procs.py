"""Processes of the GPU benchmark: function instances as children (naive or accelshim), the shim
with its output in a file, and the GPU memory that nvidia-smi sees."""
from __future__ import annotations

import ast
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ShimProcess

NAIVE = Path(__file__).resolve().parent / "naive.py"
CHILD_TIMEOUT_S = 180.0

# A function instance that uses accelshim: imports accel, makes a Client, then its first call.
# argv: op url (image path | n | inputs path) [hold], op classify | gemm | gemm-shm | gemm-raw.
# gemm and gemm-shm build their operands with numpy; gemm-shm passes them through shared memory:
# it makes an accel.SharedMemory region, builds A and B in it, and its first call (which registers
# the region) passes shm=region. gemm-raw is a gemm function without numpy, as one that forwards
# the bytes of its request is: it makes a region, reads A and B (raw FP32, as write_gemm_inputs
# lays them out) into region.tensor()s and passes them with shm=region; the result is a Tensor in
# the region. Making the region counts as part of the first call; filling it does not. Prints
# "BENCH {...}" like naive.py; on its way out it unregisters and unlinks its region, as a function would.
ACCEL_CHILD = r"""
import os, sys, time
t0 = time.perf_counter()
import accel
op, url, arg = sys.argv[1:4]
if op in ("gemm", "gemm-shm"):
    import numpy as np
client = accel.Client(url, timeout=120)
t1 = time.perf_counter()
region, region_s = None, 0.0
try:
    if op == "classify":
        data = open(arg, "rb").read()
        t2 = time.perf_counter()
        extra = {"top1": client.classify(data, top_k=5)[0].label}
    elif op == "gemm-raw":
        import struct
        n = int((os.stat(arg).st_size // 8) ** 0.5)
        region = accel.SharedMemory(f"cold-{os.getpid()}", 3 * n * n * 4 + 4096)
        a, b = region.tensor("A", (n, n)), region.tensor("B", (n, n))
        region_s = time.perf_counter() - t1
        with open(arg, "rb", buffering=0) as f:
            f.readinto(a.raw)
            f.readinto(b.raw)
        t2 = time.perf_counter()
        c = client.gemm(a, b, shm=region)
        extra = {"c00": struct.unpack_from("<f", c.raw)[0], "numpy_imported": "numpy" in sys.modules}
        del a, b, c
    else:
        n = int(arg)
        if op == "gemm-shm":
            t_region = time.perf_counter()
            region = accel.SharedMemory(f"cold-{os.getpid()}", 3 * n * n * 4 + 4096)
            a, b = region.array((n, n), np.float32), region.array((n, n), np.float32)
            region_s = time.perf_counter() - t_region
        else:
            a, b = np.empty((n, n), np.float32), np.empty((n, n), np.float32)
        rng = np.random.default_rng(0)  # making the inputs (numpy.random's import too) is not the call
        rng.random(dtype=np.float32, out=a)
        rng.random(dtype=np.float32, out=b)
        t2 = time.perf_counter()
        extra = {"c00": float(client.gemm(a, b, shm=region)[0, 0])}
    t3 = time.perf_counter()
    first = t3 - t2 + region_s
    out = {"op": op, "imports_s": t1 - t0, "inputs_s": t2 - t1 - region_s, "first_call_s": first,
           "first_result_s": first, "accel_file": accel.__file__}
    if region is not None:
        out["region_s"] = region_s
    out.update(extra)
    print("BENCH " + repr(out), flush=True)
    if len(sys.argv) > 4 and sys.argv[4] == "hold":
        sys.stdin.read()
finally:
    if region is not None:
        client.unregister_shm(region.name)
        region.close()
"""


def write_gemm_inputs(path: Path, n: int) -> Path:
    """A and B of ``naive.gemm_inputs(n)``, raw FP32 one after the other: what a gemm function is given."""
    import numpy as np

    from bench.naive import gemm_inputs

    with open(path, "wb") as f:
        for m in gemm_inputs(np, n):
            f.write(np.ascontiguousarray(m, dtype="<f4").tobytes())
    return path


def function_python(workdir: Path) -> tuple[str, str, bool]:
    """The interpreter of an accelshim function instance: a venv of this Python with only ``accel``
    in it, byte-compiled, as the template's image holds it (no CUDA stack); ``(path, what, whether
    accel is installed there)``. Where no venv can be made, this interpreter (accel on PYTHONPATH)."""
    target = workdir / "function-venv"
    python = target / "bin" / "python"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True, timeout=120,
                       capture_output=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, timeout=60, capture_output=True, text=True).stdout.strip()
        install_accel(Path(site), str(python))
        return str(python), "a venv with only accel in it, byte-compiled as in the template's image", True
    except (OSError, subprocess.SubprocessError) as exc:
        return sys.executable, f"the benchmark's own interpreter (no venv: {exc})", False


def install_accel(folder: Path, python: str | None = sys.executable) -> Path:
    """Our ``accel`` copied into ``folder`` and, unless ``python`` is None, byte-compiled by it as the
    template's Dockerfile does (checked by hash); the package's path."""
    import accel

    package = folder / "accel"
    shutil.rmtree(package, ignore_errors=True)  # a folder used before
    shutil.copytree(Path(accel.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    if python is not None:
        subprocess.run([python, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", str(package)],
                       check=True, timeout=120, capture_output=True)
    return package


def cpu_times(pid: int | str) -> tuple[float, float]:
    """User and system seconds of process ``pid`` so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_threads(threads: list[threading.Thread], seconds: float, stop: threading.Event,
                join_timeout: float | None = None) -> None:
    """Start ``threads``, let them run ``seconds``, set ``stop`` and join them (each for at most
    ``join_timeout``)."""
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(join_timeout)


def cat_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    out = io.BytesIO()
    Image.fromarray(data.chelsea()).save(out, format="JPEG", quality=90)
    return out.getvalue()


def child_env() -> dict[str, str]:
    """The environment for children: ours, plus where ``accel`` is (it may be on sys.path only)."""
    import accel

    env = dict(os.environ)
    extra = [str(Path(accel.__file__).resolve().parents[1])]
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def without_accel(env: dict[str, str]) -> dict[str, str]:
    """``env`` minus every PYTHONPATH folder that holds an ``accel`` package (by whatever path it is
    named): for an interpreter with accel of its own."""
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and not (Path(p) / "accel" / "__init__.py").is_file()]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def parse_bench_line(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            return ast.literal_eval(line[len("BENCH "):])
    raise RuntimeError(f"child printed no BENCH line: {stdout[-500:]!r}")


def run_child(cmd: list[str], env: dict[str, str], timeout: float = CHILD_TIMEOUT_S) -> tuple[float, dict[str, Any]]:
    """Wall seconds around the child (interpreter start to exit) and the timings it printed."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1:4]} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return wall, parse_bench_line(proc.stdout)


# --- GPU memory ---------------------------------------------------------------------------------
def gpu_memory() -> dict[str, Any] | None:
    """Used/total MiB of the first GPU and per-process usage, from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            return None
        used, total = (float(v) for v in out.stdout.strip().splitlines()[0].split(","))
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
        per_pid = {}
        for line in apps.stdout.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit():
                try:
                    per_pid[int(parts[0])] = float(parts[1])
                except ValueError:
                    pass
        return {"used_mib": used, "total_mib": total, "per_pid_mib": per_pid}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class LoggedShim(ShimProcess):
    """ShimProcess with the shim's output in a file (128 clients make waitress warn a lot)."""

    def __init__(self, device: str, models: Path, log_path: Path, *extra: str, workers: int = 1) -> None:
        super().__init__(device, models, *extra, workers=workers)
        self.log_path = log_path

    def __enter__(self) -> "LoggedShim":
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()
            print(self.log_tail(40), file=sys.stderr, flush=True)
            raise
        self.ready_seconds = time.perf_counter() - self.started
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_summary(self) -> dict[str, Any]:
        """Line counts by level and logger, and the last lines that are not waitress queue warnings."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        counts: dict[str, int] = {}
        for line in text:
            parts = line.split()
            key = " ".join(parts[2:4]) if len(parts) > 3 and parts[2].isupper() else "other"
            counts[key] = counts.get(key, 0) + 1
        others = [line for line in text if "waitress.queue" not in line]
        return {"lines": len(text), "by_level_logger": counts, "tail": others[-20:]}


def hold_children(cmds: list[list[str]], env: dict[str, str], timeout: float) -> tuple[list[subprocess.Popen], list[dict]]:
    """Start the children; return once each printed its BENCH line (it then waits on stdin)."""
    procs, results = [], []
    errfiles = []
    try:
        for cmd in cmds:
            err = tempfile.TemporaryFile()
            errfiles.append(err)
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                          text=True, env=env))
        lines: list[str | None] = [None] * len(procs)

        def reader(i: int, p: subprocess.Popen) -> None:
            for line in p.stdout:  # type: ignore[union-attr]
                if line.startswith("BENCH "):
                    lines[i] = line
                    return

        threads = [threading.Thread(target=reader, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for i, line in enumerate(lines):
            if line is None:
                errfiles[i].seek(0)
                raise RuntimeError(f"child {cmds[i][1:4]} not ready in {timeout:.0f} s (exit {procs[i].poll()}): "
                                   f"{errfiles[i].read()[-1500:].decode('utf-8', 'replace')}")
            results.append(parse_bench_line(line))
        return procs, results
    except BaseException:
        release(procs)
        raise
    finally:
        for f in errfiles:
            f.close()


def release(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            if p.stdin:
                p.stdin.close()
        except OSError:
            pass
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
