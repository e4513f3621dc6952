"""Probes that start whole shims and load them with closed-loop clients classifying the cat photo
(in at most 16 client processes): the rate, and where the CPU goes. ``bench/worker_ab.py`` runs
them (``throughput``, ``cpu``, ``replicas``, ``spy``, ``stages``) and says what each prints;
``PROBE_DEVICE=cpu`` runs all but ``throughput`` on a machine without a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, ShimProcess, probe_shim
from bench.loop import process_closed_loop
from bench.procs import cat_jpeg, cpu_times


def _load(callers: tuple[Any, ...] | list[tuple[Any, ...]], jpeg: bytes, clients: int,
          seconds: float) -> dict[str, Any]:
    """``clients`` clients sending ``jpeg`` to ``callers`` for ``seconds``, from at most 16 processes."""
    return process_closed_loop(callers, jpeg, clients, seconds, min(clients, 16))


def _rate(out: dict[str, Any]) -> str:
    return f"{out['images_per_s']:.0f} img/s, p50 {out.get('p50_ms', 0):.1f} p99 {out.get('p99_ms', 0):.1f} ms"


def throughput(label: str) -> None:
    """The CUDA shim with 8 workers: the rate and latency at 1, 32 and 128 clients, 5 s each."""
    jpeg = cat_jpeg()
    with ShimProcess("cuda", ROOT / "models", workers=8) as shim:
        _load(("accel", shim.unix_url), jpeg, 32, 2.0)  # warm
        for clients in (1, 32, 128):
            out = _load(("accel", shim.unix_url), jpeg, clients, 5.0)
            print(label, clients, f"{out['images_per_s']:.0f} img/s p50 {out.get('p50_ms', 0):.1f} "
                  f"p99 {out.get('p99_ms', 0):.1f}", "errors", out["errors"], flush=True)


def _cpu_seconds(pid: int | str) -> float:
    return sum(cpu_times(pid))


def _busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def cpu(workers: int, clients: int, flags: list[str], shims: int = 1) -> None:
    """``shims`` shims (each its own device process with ``workers`` request workers, on the one GPU),
    the client processes spread over them in turn: the rate, and the cores each process kind keeps busy."""
    import contextlib

    if shims < 1 or workers < 1:
        sys.exit("cpu/replicas: at least one shim and one worker")
    jpeg, seconds = cat_jpeg(), 6.0
    with contextlib.ExitStack() as stack:
        started = [probe_shim(*flags, workers=workers) for _ in range(shims)]
        for shim in started:  # all start at once, then each is waited for
            shim.launch()
            stack.callback(shim.__exit__)
        for shim in started:
            shim.wait_ready()
        urls = [("accel", shim.unix_url) for shim in started]
        devices = [shim.proc.pid for shim in started]
        kids = [pid for device in devices for pid in subprocess.run(
            ["pgrep", "-P", str(device)], capture_output=True, text=True).stdout.split()]
        _load(urls, jpeg, clients, 2.0)  # warm
        before = [*map(_cpu_seconds, devices), *map(_cpu_seconds, kids)], _busy_seconds(), time.monotonic()
        out = _load(urls, jpeg, clients, seconds)
        after = [*map(_cpu_seconds, devices), *map(_cpu_seconds, kids)], _busy_seconds(), time.monotonic()
    wall, images = after[2] - before[2], out["images_per_s"] * seconds
    used = [a - b for a, b in zip(after[0], before[0])]
    device, workers_used = used[:shims], used[shims:]
    rest = after[1] - before[1] - sum(used)
    per_shim = [sum(out["threads_per_process"][k::shims]) for k in range(shims)]  # process p calls shim p % K
    print(f"{f'shims={shims} (clients {per_shim}) ' if shims > 1 else ''}workers={workers} clients={clients} "
          f"{' '.join(flags)}: {_rate(out)}, errors {out['errors']}")
    print(f"  cores busy: device {' + '.join(f'{u / wall:.2f}' for u in device)}, workers "
          f"{sum(workers_used) / wall:.2f} ({', '.join(f'{u / wall:.2f}' for u in workers_used)}), rest {rest / wall:.2f}")
    print(f"  CPU ms per image: device {1e3 * sum(device) / images:.2f}, workers {1e3 * sum(workers_used) / images:.2f}, "
          f"rest {1e3 * rest / images:.2f}", flush=True)


def replicas(shims: int, workers: int, clients: int, flags: list[str]) -> None:
    """``cpu`` with ``shims`` whole shims on the one GPU."""
    cpu(workers, clients, flags, shims=shims)


def spy(workers: int, clients: int, flags: list[str]) -> None:
    """py-spy recording the device process for 6 s of the load, once per mode in SPY_MODES."""
    import re
    import shutil
    import threading

    spy_bin = os.environ.get("PYSPY") or shutil.which("py-spy") or sys.exit("py-spy: not found (PYSPY=...)")
    out_dir, jpeg, seconds, ramp = Path(os.environ.get("SPY_OUT", ".")), cat_jpeg(), 6, 2.0
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", " ".join(flags)).strip("-") or "plain"
    with probe_shim(*flags, workers=workers) as shim:
        _load(("accel", shim.unix_url), jpeg, clients, 2.0)  # warm
        for mode in os.environ.get("SPY_MODES", "gil").split():
            path = out_dir / f"spy-{tag}-{clients}-{mode}.txt"
            # C frames too (a blocked read shows as one), which py-spy reads only pausing the process
            native = ["--native"] if os.environ.get("SPY_NATIVE") else ["--nonblocking"]
            command = [spy_bin, "record", "--pid", str(shim.proc.pid), "--rate", "400", "--duration", str(seconds),
                       *native, "--format", "raw", "--output", str(path), "--threads", f"--{mode}"]
            started: list[subprocess.Popen[str]] = []
            # recorded once the clients' processes are up and sending, within the load's window
            timer = threading.Timer(ramp, lambda: started.append(subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
            timer.start()
            out = _load(("accel", shim.unix_url), jpeg, clients, ramp + seconds + 1.0)
            timer.join()
            recorder = started[0]
            try:
                _, err = recorder.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # --idle hung py-spy on the H200's device process: what it wrote stays
                recorder.kill()
                _, err = recorder.communicate()
                err = f"killed after 30 s; {err}"
            print(f"spy {mode} workers={workers} clients={clients} {' '.join(flags)}: "
                  f"{out['images_per_s']:.0f} img/s, py-spy rc {recorder.returncode} {err.strip()[-300:]}", flush=True)


def _stage_totals(folder: str) -> dict[tuple[str, str], list[float]]:
    """What the stage timers dumped into ``folder``: (role, what) -> summed [calls, wall, cpu, rows];
    (role, "thread " + name) -> [CPU s]; (role, "lag") -> [wakes, overshoot s, largest overshoot s]."""
    import glob
    import json

    out: dict[tuple[str, str], list[float]] = {}
    for path in glob.glob(f"{folder}/stage-*.json"):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError:  # being replaced: the next dump is half a second away
            continue
        role = "device" if "serve" in data["argv"] else "worker"
        for what, t in data["totals"].items():
            row = out.setdefault((role, what), [0, 0.0, 0.0, 0])
            for i in range(4):
                row[i] += t[i]
        for name, cpu in data["threads"].items():
            out.setdefault((role, "thread " + name), [0.0])[0] += cpu
        lag = out.setdefault((role, "lag"), [0, 0.0, 0.0])
        lag[0], lag[1], lag[2] = lag[0] + data["lag"][0], lag[1] + data["lag"][1], max(lag[2], data["lag"][2])
    return out


def stages(workers: int, clients: int, flags: list[str]) -> None:
    """Every process of the shim timing its stages (bench/stage_timer) over 6 s of the load."""
    import tempfile

    jpeg, seconds = cat_jpeg(), 6.0
    with tempfile.TemporaryDirectory() as folder:
        os.environ["STAGE_OUT"] = folder
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "bench" / "stage_timer"), *filter(None, [os.environ.get("PYTHONPATH")])])
        with probe_shim(*flags, workers=workers) as shim:
            _load(("accel", shim.unix_url), jpeg, clients, 2.0)  # warm
            time.sleep(0.7)  # every process has dumped what the warm-up did
            before = _stage_totals(folder)
            out = _load(("accel", shim.unix_url), jpeg, clients, seconds)
            time.sleep(0.7)
            after = _stage_totals(folder)
    print(f"workers={workers} clients={clients} {' '.join(flags)}: {_rate(out)}; "
          "per call: wall ms, the calling thread's CPU ms (rows per call)")
    window = seconds + 1.4  # the dumps bracket the clients' window with 0.7 s each side
    for (role, what), t in sorted(after.items()):
        delta = [a - b for a, b in zip(t, before.get((role, what), [0] * len(t)))]
        if what.startswith("thread "):
            if delta[0] > 0.01 * window:
                print(f"  {role:6s} {what:42s} cores busy {delta[0] / window:5.2f}")
        elif what == "lag":
            if delta[0]:
                print(f"  {role:6s} a 2 ms sleep wakes late by {1e3 * delta[1] / delta[0]:.3f} ms on average "
                      f"(largest since start {1e3 * t[2]:.2f})")
        elif delta[0]:
            calls, wall, cpu, rows = delta
            print(f"  {role:6s} {what:42s} {calls:6.0f} calls  wall {1e3 * wall / calls:7.3f}  "
                  f"cpu {1e3 * cpu / calls:7.3f}" + (f"  ({rows / calls:.2f} rows)" if rows else ""), flush=True)
