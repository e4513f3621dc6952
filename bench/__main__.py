"""``python -m bench overhead|gpu|all|plot [options]``.

``all`` runs the overhead benchmark, then the GPU benchmark, each in its own process (so neither
inherits the other's CUDA context), with ``--device`` (default auto), ``--models``, ``--out`` and
``--quick`` passed to both and any other option to ``gpu``; ``--budget`` seconds (345) bound the
two together: past its share, a benchmark gets SIGTERM and keeps the sections it finished.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

USAGE = "python -m bench {overhead,gpu,load,kaas,all,plot,report} [options]   (python -m bench gpu --help for options)"


def _run(argv: list[str], timeout: float) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "bench", *argv])
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"bench {argv[0]}: over {timeout:.0f} s, stopping it", file=sys.stderr, flush=True)
        proc.terminate()  # the benchmark unwinds and stops its shim and children
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "overhead":
        from bench.overhead import main as overhead

        return overhead(rest)
    if command == "gpu":
        from bench.gpu import main as gpu

        return gpu(rest)
    if command == "load":
        from bench.load import main as load

        return load(rest)
    if command == "kaas":
        from bench.kaas import main as kaas

        return kaas(rest)
    if command == "report":
        from bench.report import main as report

        return report(rest)
    if command == "plot":
        from bench.plot import main as plot

        return plot(rest)
    if command == "all":
        parser = argparse.ArgumentParser(prog="python -m bench all")
        parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        parser.add_argument("--models", default=None)
        parser.add_argument("--out", default=None)
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--budget", type=float, default=345.0,
                            help="seconds for both; overhead gets at most --overhead-timeout of them")
        parser.add_argument("--overhead-timeout", type=float, default=120.0)
        args, gpu_only = parser.parse_known_args(rest)
        from bench.gpu import resolve_device

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        common = ["--device", resolve_device(args.device)]
        common += ["--models", args.models] if args.models else []
        common += ["--out", args.out] if args.out else []
        common += ["--quick"] if args.quick else []
        deadline = time.monotonic() + args.budget
        codes = [_run(["overhead", *common], min(args.overhead_timeout, args.budget))]
        codes.append(_run(["gpu", *common, *gpu_only], max(30.0, deadline - time.monotonic())))
        print(f"bench all: overhead exit {codes[0]}, gpu exit {codes[1]}", flush=True)
        return max(codes)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
