"""Probes of the request path behind the GPU benchmark, for A/B runs on the GPU machine.

    python bench/worker_ab.py throughput LABEL   # the shim with --workers 8: 1, 32, 128 clients, 5 s each
    python bench/worker_ab.py latency LABEL N    # the shim with --workers N (1: one process): classify
                                                 # batch 1 p50/p99, and a 12 MiB region's register and gemms
    python bench/worker_ab.py cpu N C [FLAG...]  # the shim with --workers N (and FLAGs), C clients for 6 s:
                                                 # cores busy and CPU ms per image in the device process,
                                                 # the workers (each) and the rest (clients, kernel);
                                                 # PROBE_DEVICE=cpu runs it on a machine without a GPU
    python bench/worker_ab.py replicas K N C [FLAG...]  # as cpu, with K whole shims (K device processes, each
                                                 # with N workers) on the one GPU, the client processes
                                                 # spread over them in turn: would more device processes
                                                 # lift the rate at C clients?
    python bench/worker_ab.py stages N C [FLAG...]  # the shim with --workers N (and FLAGs), C clients for 6 s, every process
                                                 # timing its stages (bench/stage_timer): per device batch
                                                 # the pixels' upload, the JPEG engines' decode (--gpu-jpeg),
                                                 # the resize, the model, the replies;
                                                 # per worker call the link round trip (wall and CPU ms);
                                                 # each thread's cores busy, how late a 2 ms sleep wakes
    python bench/worker_ab.py spy N C [FLAG...]  # as cpu, with py-spy (PYSPY, else on the PATH) sampling the device
                                                 # process for 6 s of the load, once per mode in SPY_MODES
                                                 # (default "gil": the thread holding the interpreter lock;
                                                 # "idle": every thread's wall time, waits too, which hung
                                                 # py-spy on the H200; SPY_NATIVE=1 adds C frames, where a
                                                 # blocked socket read shows, pausing the process to read
                                                 # them): collapsed stacks in SPY_OUT (default .), summed
                                                 # by bench/spy_report.py
    python bench/worker_ab.py link               # one link call with 1 and 4 decoded photos (406 KB each,
                                                 # random pixels; the device side reads every page),
                                                 # over the socket and lent through the arena: ms, CPU ms
    python bench/worker_ab.py compiled           # a fresh interpreter importing accel from a copy with its
                                                 # bytecode and from one without (as a function image
                                                 # without compileall): 20 each, interleaved
    python bench/worker_ab.py pipeline           # classify's device pipeline alone (no shim, no link): ms
                                                 # per batch on one thread, images/s on 2 and 4 threads
    python bench/worker_ab.py parts              # a request worker's CPU per classify and its parts, the
                                                 # device faked (logits at once): where a worker's CPU goes
    python bench/worker_ab.py first N            # the shim with --workers N: a function's first gemm through
                                                 # a fresh region, registered on the way vs the standard way
    python bench/worker_ab.py region             # three gemms through a fresh region in this process, with
                                                 # the shim's hooks: as is, without the prefault, pinned first

``bench/ab.sh`` alternates a probe between the working tree's shim and earlier commits'. An A/B
run starts the probe once on the code as it is and once on a variant (for worker-side
batching: ``shim/workers/front.py`` building its ops without a BatchingFactory), minutes apart on
the same machine; bench/results/NOTES.md records which.

The probes live in bench/closed_loop_probe.py (throughput, cpu, replicas, spy, stages),
bench/latency_probe.py (latency, first, region) and bench/parts_probe.py (link, compiled, pipeline,
parts); this file reads the command line and runs one.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import closed_loop_probe, latency_probe, parts_probe  # noqa: E402

# each module's probes, named as their modes, and their arguments in order: "s" a word, "i" a whole
# number, "*" the FLAGs left
ARGUMENTS: dict[ModuleType, dict[str, str]] = {
    closed_loop_probe: {"throughput": "s", "cpu": "ii*", "replicas": "iii*", "stages": "ii*", "spy": "ii*"},
    latency_probe: {"latency": "si", "first": "i", "region": ""},
    parts_probe: {"link": "", "compiled": "", "pipeline": "", "parts": ""},
}
PROBES: dict[str, tuple[Callable[..., None], str]] = {
    mode: (getattr(module, mode), kinds) for module, modes in ARGUMENTS.items() for mode, kinds in modes.items()}


def parse(argv: list[str]) -> tuple[Callable[..., None], list[Any]]:
    """The probe that ``argv`` (the command line after the script) names, and its arguments.

    Raises:
        SystemExit: with the usage, for an unknown mode or arguments that do not fit its own.
    """
    usage = __doc__ or ""
    if not argv or argv[0] not in PROBES:
        sys.exit(usage + (f"\nno probe {argv[0]!r}" if argv else ""))
    probe, kinds = PROBES[argv[0]]
    fixed, given, flags = kinds.rstrip("*"), argv[1:], kinds.endswith("*")
    try:
        if len(given) < len(fixed) or (len(given) > len(fixed) and not flags):
            raise ValueError(f"{len(given)} argument(s) given, {len(fixed)} taken{' (then FLAGs)' if flags else ''}")
        args: list[Any] = [int(v) if kind == "i" else v for kind, v in zip(fixed, given)]
    except ValueError as exc:
        line = next((x.split("#")[0].strip() for x in usage.splitlines() if f"worker_ab.py {argv[0]} " in x),
                    argv[0])
        sys.exit(f"{usage}\n{exc}; usage: {line}")
    if flags:
        args.append(given[len(fixed):])
    return probe, args


if __name__ == "__main__":
    probe, args = parse(sys.argv[1:])
    probe(*args)
