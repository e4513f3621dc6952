"""The four sections of the GPU benchmark; each takes the run's state and returns (JSON, Markdown).

1. cold start (bench/cold.py), 2. warm latency, 3. throughput, 4. density: see bench/gpu.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.common import ShimProcess, md_table, percentiles, time_calls, write_results
from bench.cold import section_cold
from bench.load import batch_histogram, histogram_mean, metrics_text
from bench.loop import closed_loop, process_closed_loop
from bench.procs import (ACCEL_CHILD, CHILD_TIMEOUT_S, NAIVE, gpu_memory, hold_children, release, rss_mib,
                         without_accel)


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
    gemm_inputs: Path  # A and B for the cold gemm children (procs.write_gemm_inputs)
    function_python: str  # the interpreter of accelshim function instances (procs.function_python)
    function_has_accel: bool = False  # accel installed there (else it comes from our PYTHONPATH)
    markdown: list[str] = field(default_factory=list)
    sections_md: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def naive_cmd(self, op: str, hold: bool = False) -> list[str]:
        cmd = [sys.executable, str(NAIVE), op, "--device", self.device]
        cmd += (["--model", str(self.args.models / "efficientnet-lite0"), "--image", str(self.jpeg_path)]
                if op == "classify" else ["--n", "1024", "--inputs", str(self.gemm_inputs)])
        return cmd + (["--hold"] if hold else [])

    def accel_cmd(self, op: str, hold: bool = False) -> list[str]:
        """A function instance calling the shim; ``op``: classify, gemm, gemm-shm or gemm-raw (procs.ACCEL_CHILD)."""
        arg = {"classify": str(self.jpeg_path), "gemm-raw": str(self.gemm_inputs)}.get(op, "1024")
        return [self.function_python, "-c", ACCEL_CHILD, op, self.shim.unix_url, arg] + (["hold"] if hold else [])

    def child_env(self, who: str, op: str) -> dict[str, str]:
        """The environment of a child. An accelshim function imports the accel installed in its
        interpreter (byte-compiled, as in its image), not ours; one that builds its operands with
        numpy has numpy in its image, so it is given where this interpreter's numpy lies."""
        if who == "naive":
            return self.env
        env = without_accel(self.env) if self.function_has_accel else self.env
        if op not in ("gemm", "gemm-shm"):
            return env
        import numpy

        site = str(Path(numpy.__file__).resolve().parents[1])
        return {**env, "PYTHONPATH": os.pathsep.join([env.get("PYTHONPATH", ""), site]).strip(os.pathsep)}

    def save(self) -> None:
        """Rewrite the JSON + Markdown with what is done so far (sections in their numbered order)."""
        md = self.markdown + [self.sections_md[k] for k in ORDER if k in self.sections_md]
        self.written = write_results("gpu", self.data, "\n".join(md), self.args.out)


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
            procs, results = hold_children([cmd] * k, b.child_env(who, "classify"), CHILD_TIMEOUT_S)
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
    # built in place by the function, nothing copied on its side, DMA from the region on the shim's;
    # the result is a view of the region, where the function reads it (no copy out)
    for dtype, label in (("float16", "FP16"), ("float32", "FP32")):
        for n in sizes[-2:]:
            a, bm = gemm_inputs(np, n, dtype)
            region = accel.SharedMemory(f"bench-{os.getpid()}-{label}-{n}", 3 * a.nbytes + (1 << 20))
            regions.append(region)
            sa, sb = region.array(a.shape, dtype), region.array(bm.shape, dtype)
            sa[:], sb[:] = a, bm
            cases.append((f"gemm {label} n={n} shm",
                          lambda sa=sa, sb=sb, region=region: client.gemm(sa, sb, shm=region),
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
        client.unregister_shm(region.name)
        region.close()
    out = {"budget_s_per_case": budget, "cases": results, "skipped": skipped,
           "in_process": {"gemm": "cupy matmul of host numpy arrays incl. H2D and D2H copies (synchronized)"
                          if b.device == "cuda" else "numpy matmul (FP16 computed in FP32, as the CPU twin)",
                          "classify": f"ORT session, providers {clf.providers}, Pillow preprocessing"
                                      + (f" ({clf.note})" if clf.note else "")}}
    md = ("## 2. Warm latency\n\nShim over the unix socket vs the same op in-process (" + out["in_process"]["gemm"]
          + "; classify: " + out["in_process"]["classify"] + "). `shm` cases: A, B and C lie in a shared-memory "
          "region of the function's (`accel.SharedMemory`, registered once); the function reads C where it lies, "
          "in its region, while the in-process baseline returns a fresh array. Medians, time-bounded.\n\n"
          + md_table(["case", "in-process p50 ms", "shim p50 ms", "shim p99 ms", "overhead ms", "shim / in-process",
                      "n"], rows)
          + ("".join(f"\n- skipped: {s}" for s in skipped) + "\n" if skipped else ""))
    return out, md


# 3. throughput ----------------------------------------------------------------------------------
def section_throughput(b: Bench) -> tuple[dict[str, Any], str]:
    from bench.naive import InProcessClassifier

    levels = [1, 8, 32, 128]
    duration = b.args.duration or (2.0 if b.quick else 5.0)
    cap, proc_cap = b.args.inproc_sessions, b.args.client_processes
    before = batch_histogram(metrics_text(b.shim.tcp_url))
    sessions: list[Any] = []
    rows, results = [], []
    for clients in levels:
        procs = min(clients, proc_cap)
        scrape = batch_histogram(metrics_text(b.shim.tcp_url))
        shim = process_closed_loop(("accel", b.shim.unix_url), b.jpeg, clients, duration, procs)
        shim.update(device_batching(scrape, batch_histogram(metrics_text(b.shim.tcp_url))))
        want = min(clients, cap)
        while len(sessions) < want:
            clf = InProcessClassifier(b.device, b.args.models / "efficientnet-lite0")
            clf.classify(b.jpeg)  # warm
            sessions.append(clf)
        inproc = closed_loop(lambda i: (lambda s=sessions[i % want]: s.classify(b.jpeg)), clients, duration)
        inproc["sessions"] = want
        level: dict[str, Any] = {"clients": clients, "shim": shim, "in_process": inproc,
                                 "speedup": ratio(shim, inproc)}
        naive: dict[str, Any] = {}
        if not b.args.no_naive_functions:
            try:  # the naive functions themselves: C sessions in P processes, each with its own GPU context
                naive = process_closed_loop(("naive", b.device, str(b.args.models / "efficientnet-lite0")), b.jpeg,
                                            clients, duration, procs)
            except RuntimeError as exc:  # e.g. out of GPU memory: recorded, the shim's numbers stand
                naive = {"error": str(exc), "images_per_s": 0.0, "errors": 0}
            level.update(naive_functions=naive, speedup_vs_naive_functions=ratio(shim, naive))
        results.append(level)
        rows.append([clients, f"{shim['images_per_s']:.1f} ({procs} proc.)", shim.get("p50_ms", "-"),
                     shim.get("p99_ms", "-"),
                     f"{inproc['images_per_s']:.1f} ({want} sess.)", inproc.get("p50_ms", "-"),
                     inproc.get("p99_ms", "-"), times(level["speedup"]),
                     "-" if not naive else naive.get("error", f"{naive['images_per_s']:.1f}")[:60],
                     "-" if not naive else naive.get("p99_ms", "-"), times(level.get("speedup_vs_naive_functions")),
                     "-" if shim["mean_batch_size"] is None else f"{shim['mean_batch_size']:.1f}",
                     shim["errors"] + inproc["errors"] + naive.get("errors", 0)])
        print(f"throughput {clients:4d} clients: shim ({procs} client processes) {shim['images_per_s']:8.1f} img/s "
              f"p50 {shim.get('p50_ms', 0):.2f} "
              f"p99 {shim.get('p99_ms', 0):.2f} ms (device batch run {_ms(shim['mean_batch_run_ms'])} ms, "
              f"wait {_ms(shim['mean_batch_wait_ms'])} ms) | in-process ({want} sessions) "
              f"{inproc['images_per_s']:8.1f} img/s "
              f"p50 {inproc.get('p50_ms', 0):.2f} p99 {inproc.get('p99_ms', 0):.2f} ms | naive functions "
              f"{naive.get('images_per_s', 0):8.1f} img/s p99 {naive.get('p99_ms', 0):.2f} ms", flush=True)
    providers = sessions[0].providers if sessions else None
    after = batch_histogram(metrics_text(b.shim.tcp_url))
    mean, batches = histogram_mean(before, after)
    try:
        config = json.loads((b.args.models / "efficientnet-lite0" / "model.json").read_text())
        batching = {k: config.get(k) for k in ("max_batch_size", "max_queue_delay_us")}
    except (OSError, ValueError) as exc:
        batching = {"error": str(exc)}
    out = {"duration_s": duration, "levels": results, "in_process_session_cap": cap, "client_process_cap": proc_cap,
           "shim": f"C clients in min(C, {proc_cap}) client processes of their own (spawned; C/P threads each, one "
                   "accel.Client per thread) over the shim's unix socket, one common window after a start barrier",
           "in_process": f"C client threads over min(C, {cap}) ORT sessions (batch 1, providers {providers}) "
                         "in one process (one CUDA context: kinder to the baseline than one process per client)",
           "naive_functions": None if b.args.no_naive_functions else
               f"C naive function instances: one batch-1 ORT session per client, the clients spread over min(C, "
               f"{proc_cap}) spawned processes (each its own CUDA context), the same window and photo",
           "shim_dynamic_batching_config (model.json)": batching,
           "batch_metrics_before": before, "batch_metrics_after": after,
           "accelshim_batch_size_present": any(k.startswith("accelshim_batch_size") for k in after),
           "mean_batch_size_during_run": mean, "batches_during_run": batches}
    md = (f"## 3. Throughput under concurrency\n\nC clients classifying the cat photo back to back for "
          f"{duration:.0f} s each. accelshim: the clients are functions, so they run as P = min(C, {proc_cap}) "
          "separate client processes (C/P threads each, one accel.Client per thread) over the shim's unix socket; "
          "all start together after a barrier, img/s = all images / the common window, latencies over all requests. "
          f"In-process: C threads over min(C, {cap}) batch-1 ORT sessions (providers {providers}; one process, one "
          "context). Naive functions: one batch-1 ORT session per client, the clients spread over the same P "
          "processes as the shim's, each process with its own GPU context, decoding and preprocessing itself.\n\n"
          + md_table(["clients", "shim img/s", "shim p50 ms", "shim p99 ms", "in-process img/s", "in-process p50 ms",
                      "in-process p99 ms", "shim / in-process", "naive functions img/s", "naive p99 ms",
                      "shim / naive functions", "shim mean batch", "errors"], rows)
          + f"\n- dynamic batching configured in model.json: {batching}\n"
          + "- the device process's batchers per level (/metrics): mean time of one device run of a batch / mean "
            "wait of an item for its batch, ms: " + "; ".join(
              f"{r['clients']} clients {_ms(r['shim'].get('mean_batch_run_ms'))} / "
              f"{_ms(r['shim'].get('mean_batch_wait_ms'))}" for r in results) + "\n"
          + (f"- `accelshim_batch_size` from /metrics over this run: mean batch {mean:.2f} "
             f"({batches:.0f} batches; per level in the JSON)\n" if mean is not None
             else "- the shim's /metrics has no `accelshim_batch_size` samples (no dynamic batching observed)\n"))
    return out, md


def device_batching(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What the device process's batchers did between two scrapes of /metrics: batches, their mean
    size, the mean time of one device run of a batch and the mean wait of an item for its batch."""
    size, batches = histogram_mean(before, after, "accelshim_batch_size")
    run, _ = histogram_mean(before, after, "accelshim_batch_seconds")
    wait, _ = histogram_mean(before, after, "accelshim_queue_seconds")
    return {"mean_batch_size": size, "batches": batches, "mean_batch_run_ms": None if run is None else 1e3 * run,
            "mean_batch_wait_ms": None if wait is None else 1e3 * wait}


def ratio(shim: dict[str, Any], other: dict[str, Any]) -> float | None:
    """Images/s of the shim over another setup's (None when that one did none)."""
    return shim["images_per_s"] / other["images_per_s"] if other.get("images_per_s") else None


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


SECTIONS: dict[str, Callable[[Bench], tuple[dict[str, Any], str]]] = {
    "cold": section_cold, "density": section_density, "warm": section_warm, "throughput": section_throughput}
ORDER = ("cold", "warm", "throughput", "density")  # numbered as in the issue; run in SECTIONS' order
SECTION_KEYS = {"cold": "cold_start", "density": "density", "warm": "warm_latency", "throughput": "throughput"}
