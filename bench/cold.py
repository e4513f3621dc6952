"""1. Cold start, a section of the GPU benchmark (bench/gpu.py): fresh function processes, naive
(bench/naive.py) vs accelshim (procs.ACCEL_CHILD), each timed by itself and by the parent."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import md_table
from bench.procs import run_child

if TYPE_CHECKING:
    from bench.sections import Bench

# key in the JSON, label, the naive child's op, the accelshim child's op; the naive child of an op
# runs once per repeat, its numbers serve every accelshim variant of that op
WORKLOADS = (("classify", "classify 1 image", "classify", "classify"),
             ("gemm", "gemm FP32 1024 (HTTP body)", "gemm", "gemm"),
             ("gemm_shm", "gemm FP32 1024 (shared memory)", "gemm", "gemm-shm"),
             ("gemm_raw", "gemm FP32 1024 (shared memory, no numpy)", "gemm", "gemm-raw"))
BREAKDOWN_KEYS = {"naive": ("imports_s", "session_s", "context_s", "preprocess_s", "first_run_s"),
                  "accelshim": ("imports_s", "region_s", "first_call_s")}


def ms(seconds: float | None) -> float | str:
    return "-" if seconds is None else seconds * 1e3


def reduction(naive: float, shim: float) -> str:
    return f"{(1 - shim / naive) * 100:.1f}%" if naive > 0 else "-"


def bare_interpreter_seconds(env: dict[str, str], python: str = sys.executable) -> float:
    """Wall time of ``python -c pass`` (common.fresh_process_seconds, with a timeout)."""
    t = time.perf_counter()
    subprocess.run([python, "-c", "pass"], check=True, env=env, timeout=60, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def summarize(who: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one kind of child's runs: first call (a), fresh process (b), the phases.

    The naive (a) is kept two ways: ``first_call_s`` starts after the imports (the strict reading),
    ``first_call_with_imports_s`` with them, as the issue defines the naive first call ("the handler
    imports cupy/onnxruntime, creates its GPU context, loads the model and computes").
    """
    for r in runs:
        if who == "naive" and "imports_s" in r and "first_result_s" in r:
            r["first_result_with_imports_s"] = r["imports_s"] + r["first_result_s"]
    return {"runs": runs, "first_call_s": median_of(runs, "first_result_s"),
            "first_call_with_imports_s": median_of(runs, "first_result_with_imports_s"),
            "fresh_process_s": median_of(runs, "process_wall_s"),
            "breakdown_s": {k: median_of(runs, k) for k in BREAKDOWN_KEYS[who]}}


def run_children(b: Bench, reps: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(who, op) -> the timings of its children, naive and accelshim interleaved (drift hits all alike)."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for naive_op in dict.fromkeys(w[2] for w in WORKLOADS):
        cmds = [("naive", naive_op, b.naive_cmd(naive_op))]
        cmds += [("accelshim", op, b.accel_cmd(op)) for _, _, n_op, op in WORKLOADS if n_op == naive_op]
        for _ in range(reps):
            for who, op, cmd in cmds:
                wall, timings = run_child(cmd, b.child_env(who, op))
                timings["process_wall_s"] = wall
                runs.setdefault((who, op), []).append(timings)
                check_accel(b, timings)
    return runs


def check_accel(b: Bench, timings: dict[str, Any]) -> None:
    """An accelshim function must have imported the accel of its own interpreter (byte-compiled, as
    in its image), not ours: else its import time would not be the image's."""
    if "accel_file" in timings and b.function_has_accel:
        home = Path(b.function_python).parents[1]
        if not Path(timings["accel_file"]).resolve().is_relative_to(home.resolve()):
            raise RuntimeError(f"an accelshim function imported {timings['accel_file']}, not the accel in {home}")


def breakdown_row(label: str, who: str, naive_op: str, entry: dict[str, Any], bare: float) -> list[Any]:
    """Where the fresh process's wall time went; 'rest' is what no phase accounts for."""
    bd, wall = entry["breakdown_s"], entry["fresh_process_s"]
    setup = (bd.get("session_s") if naive_op == "classify" else bd.get("context_s")) if who == "naive" else None
    first = bd.get("first_run_s") if who == "naive" else bd.get("first_call_s")
    pre = bd.get("preprocess_s")
    inputs = median_of(entry["runs"], "inputs_s")
    inside = sum(v or 0.0 for v in (bd.get("imports_s"), setup, pre, first, inputs))
    return [label, who, ms(bare), ms(bd.get("imports_s")), "-" if who != "naive" else ms(setup),
            ms(pre), ms(first), ms(max(0.0, wall - inside - bare)), ms(wall)]


def section_cold(b: Bench) -> tuple[dict[str, Any], str]:
    reps = b.args.cold_repeats or (1 if b.quick else 9)  # 9: a fresh process varies by a few ms
    bare = {who: statistics.median(bare_interpreter_seconds(b.env, python) for _ in range(3 if b.quick else 5))
            for who, python in (("naive", sys.executable), ("accelshim", b.function_python))}
    out: dict[str, Any] = {"repeats": reps, "bare_interpreter_s": bare, "workloads": {},
                           "interpreters": {"naive": sys.executable, "accelshim": b.function_python}}
    runs = run_children(b, reps)
    rows, breakdown = [], []
    for key, label, naive_op, op in WORKLOADS:
        naive, shim = summarize("naive", runs[("naive", naive_op)]), summarize("accelshim", runs[("accelshim", op)])
        naive_a, shim_a = naive["first_call_s"], shim["first_call_s"]
        naive_b, shim_b = naive["fresh_process_s"], shim["fresh_process_s"]
        first = naive["runs"][0]
        if first.get("providers") is not None:
            naive.update(providers=first["providers"], note=first.get("note", ""))
        naive_ai = naive["first_call_with_imports_s"]
        entry: dict[str, Any] = {"label": label, "naive": naive, "accelshim": shim,
                                 "reduction_first_call_pct": (1 - shim_a / naive_a) * 100,
                                 "reduction_first_call_vs_naive_with_imports_pct":
                                     None if not naive_ai else (1 - shim_a / naive_ai) * 100,
                                 "reduction_fresh_process_pct": (1 - shim_b / naive_b) * 100}
        if naive_op != key:
            entry["naive_runs_of"] = naive_op  # the same naive children as that workload
        if naive_op == "classify":
            tops = {r.get("top1") for r in naive["runs"] + shim["runs"]}
            entry.update(top1=sorted(str(t) for t in tops), same_top1=len(tops) == 1)
        else:  # the same operands: the same first element of the product, to FP32 rounding
            c00 = [r["c00"] for r in naive["runs"] + shim["runs"] if "c00" in r]
            entry["c00_spread"] = (max(c00) - min(c00)) / max(abs(max(c00)), 1e-30) if c00 else None
        out["workloads"][key] = entry
        rows.append([label, ms(naive_ai), ms(naive_a), ms(shim_a),
                     "-" if naive_ai is None else reduction(naive_ai, shim_a), reduction(naive_a, shim_a),
                     ms(naive_b), ms(shim_b), reduction(naive_b, shim_b)])
        breakdown += [breakdown_row(label, who, naive_op, entry[who], bare[who]) for who in ("naive", "accelshim")]
        print(f"cold {label}: naive first call {naive_a * 1e3:.1f} ms / fresh {naive_b * 1e3:.1f} ms; "
              f"accelshim first call {shim_a * 1e3:.1f} ms / fresh {shim_b * 1e3:.1f} ms", flush=True)
    md = ("## 1. Cold start\n\n(a) first call in a running function process, as the issue defines it: naive = the "
          "handler imports cupy / onnxruntime in its first call, creates the GPU context / ORT session, loads the "
          "model, preprocesses, computes, result on the host; accelshim = the first call of a process that "
          "imported `accel` (and numpy, where it uses it) when it started and made a Client, to a warm shim over "
          "its unix socket. (a') is stricter: the naive imports too are done before the clock. Gemm through the "
          "HTTP body sends A and B in the request; through shared memory the "
          "function makes an `accel.SharedMemory` region, builds A and B in it and passes `shm=region`, and its "
          "first call includes making the region and registering it with the shim (all it does after "
          "`Client(...)` except filling A and B). 'no numpy' is a gemm function that forwards the bytes it is "
          "given, as one serving binary requests does: it reads A and B into `region.tensor(...)`s and never "
          "imports numpy. Every gemm row shares the same naive runs; the naive and no-numpy children read A and B "
          "from one file, the other two make the same values with numpy's generator. (b) a fresh function "
          "process end to end, timed by the parent; the naive function runs in "
          "the benchmark's interpreter (where what it imports is installed), the accelshim one in "
          f"{b.data.get('function_interpreter', 'the same interpreter')}, as its image would be. Medians of {reps}.\n\n"
          + md_table(["workload", "naive (a) ms", "naive (a') ms", "accelshim (a) ms", "reduction (a)",
                      "reduction (a')", "naive (b) ms", "accelshim (b) ms", "reduction (b)"], rows)
          + "\nWhere the time of (b) goes (medians; 'interpreter' is a bare `python -c pass` of that process's "
            "interpreter; "
            "'rest' = wall - the others - making the inputs: exit, teardown, unaccounted):\n\n"
          + md_table(["workload", "process", "interpreter ms", "imports ms", "context/session ms", "preprocess ms",
                      "first run/call ms", "rest ms", "wall ms"], breakdown))
    notes = []
    for key, entry in out["workloads"].items():
        region = entry["accelshim"]["breakdown_s"]["region_s"]
        if region is not None:
            notes.append(f"{entry['label']}: making the region is {region * 1e3:.3f} ms of the accelshim first call")
        if entry["naive"].get("note") and "naive_runs_of" not in entry:
            notes.append(f"naive {key}: {entry['naive']['note']} (providers {entry['naive'].get('providers')})")
    return out, md + ("\n" + "".join(f"- {n}\n" for n in notes) if notes else "")
