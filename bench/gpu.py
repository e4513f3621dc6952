"""accelshim vs the naive per-function GPU setup: cold start, warm latency, throughput, density.

    python -m bench gpu [--device auto|cuda|cpu] [--out DIR] [--quick] [--sections cold,density,warm,throughput]
                        [--shim-workers N] [--client-processes P]

1. cold start (classify one photo; one 1024x1024 FP32 gemm, operands in the HTTP body or in a
   shared-memory region, built with numpy or read as raw bytes without it): (a) the first call in a
   running function process, (b) a fresh function process end to end; naive (bench/naive.py in a
   child) vs a child that calls the warm shim over its unix socket, in an interpreter with only
   accel installed, byte-compiled, as a function image has it (procs.function_python).
2. warm latency: noop, gemm n=64..4096 FP16/FP32 (HTTP body; shared memory), classify batch 1;
   shim vs in-process.
3. throughput: 1/8/32/128 concurrent clients classifying; the shim's clients in up to P processes
   of their own vs in-process batch-1 sessions in one process, and vs naive function instances (one
   batch-1 session per client in the same P processes, each with its own GPU context).
4. density: GPU memory added per function instance, naive vs accelshim (nvidia-smi).

Sections that fail record their error and the rest go on. JSON + Markdown are rewritten after
every section (bench/results/<date>-<device>-gpu.*), tables are printed as they complete, and
PNG plots are made when matplotlib is importable (else later: ``python -m bench plot FILE.json``).

Modules: gpu (this: options, the shim, the run), sections (the run's state; warm, throughput,
density), cold (the cold-start section), procs (child processes, the shim's log, nvidia-smi), loop
(closed-loop clients: threads, or threads in client processes), load (/metrics batch sizes), naive
(the per-function baselines, also run as the naive child), plot (PNGs from the JSON).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, environment, write_results  # noqa: E402
from bench.procs import LoggedShim, cat_jpeg, child_env, function_python, gpu_memory, write_gemm_inputs  # noqa: E402
from bench.sections import SECTION_KEYS, SECTIONS, Bench  # noqa: E402


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import importlib.util

    return "cuda" if shutil.which("nvidia-smi") and importlib.util.find_spec("cupy") else "cpu"


def software(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device_arg": device}
    try:
        import PIL

        info["pillow"] = PIL.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    if device == "cuda":
        try:
            import cupy

            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["cuda_driver_api"] = cupy.cuda.runtime.driverGetVersion()
        except Exception as exc:  # noqa: BLE001
            info["cupy_error"] = str(exc)
    info["git_commit"] = git_commit(ROOT)
    return info


def git_commit(root: Path) -> str | None:
    """HEAD's short hash, marked when tracked files differ from it (a copy whose git metadata is
    older than its files, as on the GPU machine, says so instead of naming a commit it is not)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or None
        changed = head is not None and bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head} with uncommitted changes" if changed else head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter runs")
    parser.add_argument("--sections", default="cold,density,warm,throughput",
                        help="comma-separated, from: " + ",".join(SECTIONS))
    parser.add_argument("--duration", type=float, default=None, help="seconds per throughput level (5; quick 2)")
    parser.add_argument("--cold-repeats", type=int, default=None,
                        help="fresh function processes per cold-start case, of which the median is reported "
                             "(9; quick 1)")
    parser.add_argument("--inproc-sessions", type=int, default=8, help="cap on in-process ORT sessions (throughput)")
    parser.add_argument("--client-processes", type=int, default=min(16, os.cpu_count() or 1),
                        help="cap on the shim's client processes (throughput; default min(16, CPUs))")
    parser.add_argument("--shim-workers", type=int, default=None, metavar="N",
                        help="start the shim with --workers N (N > 1: request processes in front of the "
                             "one GPU process); default: not passed")
    parser.add_argument("--shim-arg", action="append", default=[],
                        help="extra argument for `accelshim serve` (repeat; e.g. --shim-arg=--threads=64)")
    parser.add_argument("--no-naive-functions", action="store_true",
                        help="throughput: leave out the naive function processes (one session per client)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    for flag in ("inproc_sessions", "client_processes", "shim_workers", "cold_repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}")
    # SIGTERM (a timeout from outside) unwinds through the finally blocks: the shim and children go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    device = resolve_device(args.device)
    t_start = time.perf_counter()
    data: dict[str, Any] = {"benchmark": "gpu", "device": device, "quick": args.quick,
                            "shim_workers": args.shim_workers, "environment": environment(software(device)),
                            "sections": {}}
    env_line = data["environment"].get("gpu") or data["environment"]["processor"]
    workers = f", shim --workers {args.shim_workers}" if args.shim_workers else ""
    header = (f"# accelshim vs naive per-function {device.upper()} ({data['environment']['date']}, {env_line}, "
              f"{data['environment']['cpus']} CPUs, Python {data['environment']['python']}, numpy "
              f"{data['environment'].get('numpy')}, onnxruntime {data['environment'].get('onnxruntime')}, cupy "
              f"{data['environment'].get('cupy', '-')}{workers}{', quick' if args.quick else ''})\n")
    print(header, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="accelbench-gpu-"))
    jpeg = cat_jpeg()
    jpeg_path = workdir / "cat.jpg"
    jpeg_path.write_bytes(jpeg)

    mem_before = gpu_memory()
    shim = LoggedShim(device, args.models, workdir / "shim.log", *args.shim_arg, workers=args.shim_workers or 1)
    data["shim_command"] = shim.cmd[1:]
    try:
        try:
            shim.__enter__()
        except Exception as exc:  # recorded: the file says why there are no numbers
            data["error"] = f"the shim did not start: {type(exc).__name__}: {exc}"
            data["shim_log"] = {"tail": shim.log_tail(40).splitlines()}
            for path in write_results("gpu", data, header + f"\nfailed: {data['error']}\n", args.out):
                print("wrote", path)
            raise
        mem_after = gpu_memory()
        data["shim_ready_s"] = shim.ready_seconds
        data["shim_gpu_memory"] = {
            "before_mib": mem_before and mem_before["used_mib"], "after_mib": mem_after and mem_after["used_mib"],
            "added_mib": None if not (mem_before and mem_after) else mem_after["used_mib"] - mem_before["used_mib"],
            "shim_pid_mib": (mem_after or {}).get("per_pid_mib", {}).get(shim.proc.pid)}
        try:
            import accel

            meta = accel.Client(shim.tcp_url, timeout=30)
            data["shim_server"] = meta.server_metadata()
            data["shim_backends"] = {op: meta.metadata(op).get("backend") for op in ("noop", "gemm", "classify")}
        except Exception as exc:  # noqa: BLE001
            data["shim_server"] = {"error": str(exc)}
        fn_python, fn_what, fn_has_accel = function_python(workdir)
        data["function_interpreter"] = fn_what
        b = Bench(args, device, shim, jpeg, jpeg_path, child_env(), data, write_gemm_inputs(workdir / "ab.f32", 1024),
                  fn_python, fn_has_accel, [header])
        settings = "".join(f" {k}={v}" for k, v in data["environment"].get("shim_environment", {}).items())
        b.markdown.append(f"shim: `{' '.join(shim.cmd[1:])}`{settings and f' (environment:{settings})'}, ready in {shim.ready_seconds:.2f} s, backends "
                          f"{data.get('shim_backends')}, GPU memory held "
                          f"{data['shim_gpu_memory']['added_mib'] if mem_before else 'n/a'} MiB\n")
        for name in names:
            t = time.perf_counter()
            try:
                result, md = SECTIONS[name](b)
                result["seconds"] = time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - recorded; the next section runs
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                          "seconds": time.perf_counter() - t}
                md = f"## {SECTION_KEYS[name]}\n\nfailed: `{type(exc).__name__}: {exc}`\n"
                traceback.print_exc()
            data["sections"][SECTION_KEYS[name]] = result
            b.sections_md[name] = md
            print("\n" + md, flush=True)
            data["total_s"] = time.perf_counter() - t_start
            b.save()
    finally:
        if hasattr(shim, "proc"):
            shim.__exit__()
            data["shim_log"] = shim.log_summary()
            if "b" in locals():
                b.save()
        shutil.rmtree(workdir, ignore_errors=True)
    written = list(b.written)
    if not args.no_plots:
        try:
            from bench.plot import plot_gpu

            written += plot_gpu(data, written[0].with_suffix(""))
        except ImportError as exc:
            print(f"no plots ({exc}); later: python -m bench plot {written[0]}", flush=True)
        except Exception as exc:  # noqa: BLE001 - plots are a nicety
            print(f"plots failed: {exc}", flush=True)
    for path in written:
        print("wrote", path)
    print(f"total {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
