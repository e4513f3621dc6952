"""The four sections of the GPU benchmark; each takes the run's state and returns (JSON, Markdown).

1. cold start, 2. warm latency, 3. throughput, 4. density: see bench/gpu.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.common import ShimProcess, md_table, percentiles, time_calls, write_results
from bench.load import batch_histogram, closed_loop, mean_batch, metrics_text
from bench.procs import (ACCEL_CHILD, CHILD_TIMEOUT_S, NAIVE, gpu_memory, hold_children, release, rss_mib,
                         run_child)


# --- the run ------------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    device: str
    shim: ShimProcess
    jpeg: bytes
    jpeg_path: Path
    env: dict[str, str]
    data: dict[str, Any]
    markdown: list[str] = field(default_factory=list)
    sections_md: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def naive_cmd(self, op: str, hold: bool = False) -> list[str]:
        cmd = [sys.executable, str(NAIVE), op, "--device", self.device]
        cmd += (["--model", str(self.args.models / "efficientnet-lite0"), "--image", str(self.jpeg_path)]
                if op == "classify" else ["--n", "1024"])
        return cmd + (["--hold"] if hold else [])

    def accel_cmd(self, op: str, hold: bool = False) -> list[str]:
        arg = str(self.jpeg_path) if op == "classify" else "1024"
        return [sys.executable, "-c", ACCEL_CHILD, op, self.shim.unix_url, arg] + (["hold"] if hold else [])

    def save(self) -> None:
        """Rewrite the JSON + Markdown with what is done so far (sections in their numbered order)."""
        md = self.markdown + [self.sections_md[k] for k in ORDER if k in self.sections_md]
        self.written = write_results("gpu", self.data, "\n".join(md), self.args.out)


def ms(seconds: float | None) -> float | str:
    return "-" if seconds is None else seconds * 1e3


def reduction(naive: float, shim: float) -> str:
    return f"{(1 - shim / naive) * 100:.1f}%" if naive > 0 else "-"


def bare_interpreter_seconds(env: dict[str, str]) -> float:
    """Wall time of ``python -c pass`` (common.fresh_process_seconds, with a timeout)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=env, timeout=60, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


# 1. cold start ----------------------------------------------------------------------------------
def section_cold(b: Bench) -> tuple[dict[str, Any], str]:
    reps = 1 if b.quick else 3
    bare = statistics.median(bare_interpreter_seconds(b.env) for _ in range(3 if b.quick else 5))
    out: dict[str, Any] = {"repeats": reps, "bare_interpreter_s": bare, "workloads": {}}
    rows, breakdown = [], []
    for op in ("classify", "gemm"):
        runs: dict[str, list[dict[str, Any]]] = {"naive": [], "accelshim": []}
        for _ in range(reps):  # interleaved, so that drift hits both alike
            for who, cmd in (("naive", b.naive_cmd(op)), ("accelshim", b.accel_cmd(op))):
                wall, timings = run_child(cmd, b.env)
                timings["process_wall_s"] = wall
                runs[who].append(timings)
        naive_a = median_of(runs["naive"], "first_result_s")
        shim_a = median_of(runs["accelshim"], "first_result_s")
        naive_b = median_of(runs["naive"], "process_wall_s")
        shim_b = median_of(runs["accelshim"], "process_wall_s")
        entry = {
            "naive": {"runs": runs["naive"], "first_call_s": naive_a, "fresh_process_s": naive_b,
                      "breakdown_s": {k: median_of(runs["naive"], k) for k in
                                      ("imports_s", "session_s", "context_s", "preprocess_s", "first_run_s")}},
            "accelshim": {"runs": runs["accelshim"], "first_call_s": shim_a, "fresh_process_s": shim_b,
                          "breakdown_s": {k: median_of(runs["accelshim"], k) for k in ("imports_s", "first_call_s")}},
            "reduction_first_call_pct": (1 - shim_a / naive_a) * 100,
            "reduction_fresh_process_pct": (1 - shim_b / naive_b) * 100,
        }
        if op == "classify":
            tops = {r.get("top1") for r in runs["naive"] + runs["accelshim"]}
            entry["top1"] = sorted(str(t) for t in tops)
            entry["same_top1"] = len(tops) == 1
        out["workloads"][op] = entry
        label = "classify 1 image" if op == "classify" else "gemm FP32 1024"
        rows.append([label, ms(naive_a), ms(shim_a), reduction(naive_a, shim_a),
                     ms(naive_b), ms(shim_b), reduction(naive_b, shim_b)])
        for who in ("naive", "accelshim"):
            bd, wall = entry[who]["breakdown_s"], entry[who]["fresh_process_s"]
            setup = bd.get("session_s") if op == "classify" else bd.get("context_s")
            first = bd.get("first_run_s") if who == "naive" else bd.get("first_call_s")
            pre = bd.get("preprocess_s")
            inputs = median_of(entry[who]["runs"], "inputs_s")
            inside = sum(v or 0.0 for v in (bd.get("imports_s"), setup if who == "naive" else None, pre, first, inputs))
            breakdown.append([label, who, ms(bare), ms(bd.get("imports_s")), ms(setup) if who == "naive" else "-",
                              ms(pre), ms(first), ms(max(0.0, wall - inside - bare)), ms(wall)])
        extra = entry["naive"]["runs"][0]
        if extra.get("providers") is not None:
            entry["naive"]["providers"] = extra["providers"]
            entry["naive"]["note"] = extra.get("note", "")
        print(f"cold {op}: naive first call {naive_a * 1e3:.1f} ms / fresh {naive_b * 1e3:.1f} ms; "
              f"accelshim first call {shim_a * 1e3:.1f} ms / fresh {shim_b * 1e3:.1f} ms", flush=True)
    md = ("## 1. Cold start\n\n(a) first call in a running function process: naive = create the GPU context / ORT "
          "session, load the model, preprocess, compute, result on the host (imports done before the clock); "
          "accelshim = the first call of a process that imported `accel` and made a Client, to a warm shim over "
          f"its unix socket. (b) a fresh function process end to end, timed by the parent. Medians of {reps}.\n\n"
          + md_table(["workload", "naive (a) ms", "accelshim (a) ms", "reduction (a)",
                      "naive (b) ms", "accelshim (b) ms", "reduction (b)"], rows)
          + "\nWhere the time of (b) goes (medians; 'interpreter' is a bare `python -c pass`; "
            "'rest' = wall - the others - making the inputs: exit, teardown, unaccounted):\n\n"
          + md_table(["workload", "process", "interpreter ms", "imports ms", "context/session ms", "preprocess ms",
                      "first run/call ms", "rest ms", "wall ms"], breakdown))
    for op, entry in out["workloads"].items():
        if entry["naive"].get("note"):
            md += f"\n- naive {op}: {entry['naive']['note']} (providers {entry['naive'].get('providers')})\n"
    return out, md


# 4. density -------------------------------------------------------------------------------------
def section_density(b: Bench) -> tuple[dict[str, Any], str]:
    ks = [1, 2] if b.quick else [1, 2, 4]
    shim_mem = b.data.get("shim_gpu_memory", {})
    out: dict[str, Any] = {"k": ks, "shim": shim_mem, "naive": [], "accelshim": [],
                           "method": "nvidia-smi memory.used of the GPU with all K children holding, minus "
                                     "before; children hold after their first result"}
    rows = []
    per_instance: dict[str, float | None] = {}
    for who in ("naive", "accelshim"):
        for k in ks:
            cmd = b.naive_cmd("classify", hold=True) if who == "naive" else b.accel_cmd("classify", hold=True)
            before = gpu_memory()
            procs, results = hold_children([cmd] * k, b.env, CHILD_TIMEOUT_S)
            try:
                time.sleep(0.5)  # let the driver's accounting settle
                after = gpu_memory()
                rss = [rss_mib(p.pid) for p in procs]
                per_pid = {p.pid: (after or {}).get("per_pid_mib", {}).get(p.pid) for p in procs}
            finally:
                release(procs)
            delta = None if before is None or after is None else after["used_mib"] - before["used_mib"]
            rss_known = [r for r in rss if r is not None]
            row = {"k": k, "gpu_used_before_mib": before and before["used_mib"],
                   "gpu_used_after_mib": after and after["used_mib"], "gpu_added_mib": delta,
                   "gpu_added_per_instance_mib": None if delta is None else delta / k,
                   "per_pid_mib": per_pid, "rss_mib_per_instance": statistics.fmean(rss_known) if rss_known else None,
                   "providers": results[0].get("providers")}
            out[who].append(row)
            rows.append([who, k, "n/a" if delta is None else f"{delta:.0f}",
                         "n/a" if delta is None else f"{delta / k:.0f}",
                         "n/a" if row["rss_mib_per_instance"] is None else f"{row['rss_mib_per_instance']:.0f}"])
            print(f"density {who} K={k}: GPU +{'n/a' if delta is None else f'{delta:.0f} MiB'}, "
                  f"RSS/instance {row['rss_mib_per_instance']}", flush=True)
        last = out[who][-1]
        per_instance[who] = last["gpu_added_per_instance_mib"]
    total = (gpu_memory() or {}).get("total_mib")
    summary: dict[str, Any] = {"gpu_total_mib": total, "per_instance_mib": per_instance}
    if total:
        naive_each = per_instance.get("naive")
        summary["naive_functions_per_gpu"] = int(total // naive_each) if naive_each and naive_each > 0 else None
        shim_fixed = shim_mem.get("added_mib") or 0.0
        shim_each = per_instance.get("accelshim")
        summary["accelshim_functions_per_gpu"] = (
            int((total - shim_fixed) // shim_each) if shim_each and shim_each >= 1.0
            else "not bounded by GPU memory (< 1 MiB per function)")
    out["summary"] = summary
    md = ("## 4. Density\n\nGPU memory added by K function instances that each did one classify and then hold "
          "(nvidia-smi `memory.used`, after - before), and their host RSS.\n\n"
          + md_table(["setup", "K", "GPU added MiB", "GPU MiB per instance", "host RSS MiB per instance"], rows))
    if total:
        md += (f"\n- GPU total {total:.0f} MiB; the shim itself holds {shim_mem.get('added_mib', 'n/a')} MiB "
               f"(fixed, once per GPU)\n- functions per GPU: naive {summary.get('naive_functions_per_gpu')}, "
               f"accelshim {summary.get('accelshim_functions_per_gpu')}\n")
    else:
        md += "\n- GPU memory: n/a (no nvidia-smi on this machine)\n"
    return out, md


# 2. warm latency --------------------------------------------------------------------------------
def section_warm(b: Bench) -> tuple[dict[str, Any], str]:
    import numpy as np

    import accel
    from bench.naive import InProcessClassifier, InProcessGemm, gemm_inputs

    budget = 0.4 if b.quick else 1.2
    iters = 300 if b.quick else 1000
    client = accel.Client(b.shim.unix_url, timeout=300)
    gemm = InProcessGemm(b.device)
    clf = InProcessClassifier(b.device, b.args.models / "efficientnet-lite0")
    sizes = [64, 256, 1024, 4096]
    skipped = []
    if b.device == "cpu":  # a 4096 GEMM takes seconds on a few cores: leave it to the GPU run
        sizes = [64, 256, 1024]
        skipped.append("gemm n=4096 (cpu: seconds per call)")
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any], Callable[[Any, Any], float] | None]] = [
        ("noop", lambda: client.noop(), lambda: {}, None)]
    for dtype, label in (("float16", "FP16"), ("float32", "FP32")):
        for n in sizes:
            a, bm = gemm_inputs(np, n, dtype)
            cases.append((f"gemm {label} n={n}", lambda a=a, bm=bm: client.gemm(a, bm), lambda a=a, bm=bm: gemm(a, bm),
                          lambda x, y: float(np.abs(x.astype(np.float64) - y).max() / max(1e-30, np.abs(y).max()))))
    regions: list[Any] = []  # closed (unlinked) when the section ends
    # the same products with operands and result in a shared-memory region (system_shared_memory):
    # built in place by the function, nothing copied on its side, DMA from the region on the shim's
    for dtype, label in (("float16", "FP16"), ("float32", "FP32")):
        for n in sizes[-2:]:
            a, bm = gemm_inputs(np, n, dtype)
            region = accel.SharedMemory(f"bench-{os.getpid()}-{label}-{n}", 3 * a.nbytes + (1 << 20))
            regions.append(region)
            sa, sb = region.array(a.shape, dtype), region.array(bm.shape, dtype)
            sa[:], sb[:] = a, bm
            cases.append((f"gemm {label} n={n} shm",
                          lambda sa=sa, sb=sb, region=region: client.gemm(sa, sb, shm=region).copy(),
                          lambda a=a, bm=bm: gemm(a, bm),
                          lambda x, y: float(np.abs(x.astype(np.float64) - y).max() / max(1e-30, np.abs(y).max()))))
    cases.append(("classify batch 1", lambda: client.classify(b.jpeg), lambda: clf.classify(b.jpeg),
                  lambda x, y: float(x[0].label == y[0][0])))  # 1.0: the same top-1 label
    rows, results = [], []
    for name, remote, local, compare in cases:
        try:
            warm = 2 if "4096" in name else 5
            inproc = percentiles(time_calls(local, iters, warm, budget))
            shim = percentiles(time_calls(remote, iters, warm, budget))
            entry: dict[str, Any] = {"case": name, "in_process": inproc, "shim_unix": shim,
                                     "ratio_p50": shim["p50_ms"] / inproc["p50_ms"] if inproc["p50_ms"] > 1e-3 else None,
                                     "overhead_p50_ms": shim["p50_ms"] - inproc["p50_ms"]}
            if compare is not None:
                key = "same_top1" if name.startswith("classify") else "max_rel_diff_shim_vs_in_process"
                entry[key] = compare(remote(), local())
        except Exception as exc:  # noqa: BLE001 - one case failing leaves the others
            entry = {"case": name, "error": f"{type(exc).__name__}: {exc}"}
            rows.append([name, "error", str(exc)[:60], "", "", "", ""])
            results.append(entry)
            print(f"warm {name}: error {exc}", flush=True)
            continue
        results.append(entry)
        ratio = entry["ratio_p50"]
        rows.append([name, inproc["p50_ms"], shim["p50_ms"], shim["p99_ms"], entry["overhead_p50_ms"],
                     "-" if ratio is None else f"{ratio:.2f}x", shim["n"]])
        print(f"warm {name:18s} in-process {inproc['p50_ms']:9.3f} ms | shim {shim['p50_ms']:9.3f} ms "
              f"(p99 {shim['p99_ms']:.3f}) | {'-' if ratio is None else f'{ratio:.2f}x'}", flush=True)
    for region in regions:
        region.close()
    out = {"budget_s_per_case": budget, "cases": results, "skipped": skipped,
           "in_process": {"gemm": "cupy matmul of host numpy arrays incl. H2D and D2H copies (synchronized)"
                          if b.device == "cuda" else "numpy matmul (FP16 computed in FP32, as the CPU twin)",
                          "classify": f"ORT session, providers {clf.providers}, Pillow preprocessing"
                                      + (f" ({clf.note})" if clf.note else "")}}
    md = ("## 2. Warm latency\n\nShim over the unix socket vs the same op in-process (" + out["in_process"]["gemm"]
          + "; classify: " + out["in_process"]["classify"] + "). Medians, time-bounded.\n\n"
          + md_table(["case", "in-process p50 ms", "shim p50 ms", "shim p99 ms", "overhead ms", "shim / in-process",
                      "n"], rows)
          + ("".join(f"\n- skipped: {s}" for s in skipped) + "\n" if skipped else ""))
    return out, md


# 3. throughput ----------------------------------------------------------------------------------
def section_throughput(b: Bench) -> tuple[dict[str, Any], str]:
    import accel
    from bench.naive import InProcessClassifier

    levels = [1, 8, 32, 128]
    duration = b.args.duration or (2.0 if b.quick else 5.0)
    cap = b.args.inproc_sessions
    before = batch_histogram(metrics_text(b.shim.tcp_url))
    sessions: list[Any] = []
    rows, results = [], []
    for clients in levels:
        def shim_caller(_i: int) -> Callable[[], Any]:
            client = accel.Client(b.shim.unix_url, timeout=120)  # one per function (thread)
            return lambda: client.classify(b.jpeg)

        scrape = batch_histogram(metrics_text(b.shim.tcp_url))
        shim = closed_loop(shim_caller, clients, duration)
        shim["mean_batch_size"], shim["batches"] = mean_batch(scrape, batch_histogram(metrics_text(b.shim.tcp_url)))
        want = min(clients, cap)
        while len(sessions) < want:
            clf = InProcessClassifier(b.device, b.args.models / "efficientnet-lite0")
            clf.classify(b.jpeg)  # warm
            sessions.append(clf)
        inproc = closed_loop(lambda i: (lambda s=sessions[i % want]: s.classify(b.jpeg)), clients, duration)
        inproc["sessions"] = want
        results.append({"clients": clients, "shim": shim, "in_process": inproc,
                        "speedup": shim["images_per_s"] / inproc["images_per_s"] if inproc["images_per_s"] else None})
        rows.append([clients, shim["images_per_s"], shim.get("p50_ms", "-"), shim.get("p99_ms", "-"),
                     f"{inproc['images_per_s']:.1f} ({want} sess.)", inproc.get("p50_ms", "-"),
                     inproc.get("p99_ms", "-"), "-" if results[-1]["speedup"] is None else f"{results[-1]['speedup']:.2f}x",
                     "-" if shim["mean_batch_size"] is None else f"{shim['mean_batch_size']:.1f}",
                     shim["errors"] + inproc["errors"]])
        print(f"throughput {clients:4d} clients: shim {shim['images_per_s']:8.1f} img/s p50 {shim.get('p50_ms', 0):.2f} "
              f"p99 {shim.get('p99_ms', 0):.2f} ms | in-process ({want} sessions) {inproc['images_per_s']:8.1f} img/s "
              f"p50 {inproc.get('p50_ms', 0):.2f} p99 {inproc.get('p99_ms', 0):.2f} ms", flush=True)
    providers = sessions[0].providers if sessions else None
    after = batch_histogram(metrics_text(b.shim.tcp_url))
    mean, batches = mean_batch(before, after)
    try:
        import json

        config = json.loads((b.args.models / "efficientnet-lite0" / "model.json").read_text())
        batching = {k: config.get(k) for k in ("max_batch_size", "max_queue_delay_us")}
    except (OSError, ValueError) as exc:
        batching = {"error": str(exc)}
    out = {"duration_s": duration, "levels": results, "in_process_session_cap": cap,
           "in_process": f"C client threads over min(C, {cap}) ORT sessions (batch 1, providers {providers}) "
                         "in one process (one CUDA context: kinder to the baseline than one process per client)",
           "shim_dynamic_batching_config (model.json)": batching,
           "batch_metrics_before": before, "batch_metrics_after": after,
           "accelshim_batch_size_present": any(k.startswith("accelshim_batch_size") for k in after),
           "mean_batch_size_during_run": mean, "batches_during_run": batches}
    md = (f"## 3. Throughput under concurrency\n\nC client threads classifying the cat photo back to back for "
          f"{duration:.0f} s each; the shim over its unix socket (one accel.Client per thread) vs C threads over "
          f"min(C, {cap}) in-process batch-1 ORT sessions (providers {providers}; one process, one context).\n\n"
          + md_table(["clients", "shim img/s", "shim p50 ms", "shim p99 ms", "in-process img/s", "in-process p50 ms",
                      "in-process p99 ms", "shim / in-process", "shim mean batch", "errors"], rows)
          + f"\n- dynamic batching configured in model.json: {batching}\n"
          + (f"- `accelshim_batch_size` from /metrics over this run: mean batch {mean:.2f} "
             f"({batches:.0f} batches; per level in the JSON)\n" if mean is not None
             else "- the shim's /metrics has no `accelshim_batch_size` samples (no dynamic batching observed)\n"))
    return out, md


SECTIONS: dict[str, Callable[[Bench], tuple[dict[str, Any], str]]] = {
    "cold": section_cold, "density": section_density, "warm": section_warm, "throughput": section_throughput}
ORDER = ("cold", "warm", "throughput", "density")  # numbered as in the issue; run in SECTIONS' order
SECTION_KEYS = {"cold": "cold_start", "density": "density", "warm": "warm_latency", "throughput": "throughput"}
