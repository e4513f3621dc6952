"""PNG plots from a saved ``gpu`` benchmark JSON (needs matplotlib; the GPU machine has none).

    python -m bench plot bench/results/<date>-<device>-gpu.json [more.json ...]

Writes ``<stem>-cold.png``, ``-warm.png``, ``-throughput.png``, ``-density.png`` next to the JSON,
for the sections that the JSON has without an error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(data: dict[str, Any], what: str) -> str:
    env = data.get("environment", {})
    where = (env.get("gpu") or env.get("processor") or "").split(",")[0]
    return f"{what}\n{where}, {env.get('date', '')[:10]}"


def _ok(data: dict[str, Any], key: str) -> dict[str, Any] | None:
    section = data.get("sections", {}).get(key)
    return section if isinstance(section, dict) and "error" not in section else None


def plot_gpu(data: dict[str, Any], stem: Path) -> list[Path]:
    """Write the plots for ``data`` as ``<stem>-<section>.png``; returns the paths."""
    plt = _pyplot()
    stem = Path(stem)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = stem.with_name(f"{stem.name}-{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    cold = _ok(data, "cold_start")
    if cold:
        workloads = list(cold["workloads"])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in ((axes[0], "first_call_s", "(a) first call in a running process"),
                               (axes[1], "fresh_process_s", "(b) fresh process end to end")):
            naive = [cold["workloads"][w]["naive"][key] * 1e3 for w in workloads]
            shim = [cold["workloads"][w]["accelshim"][key] * 1e3 for w in workloads]
            xs = range(len(workloads))
            ax.bar([x - 0.2 for x in xs], naive, 0.4, label="naive")
            ax.bar([x + 0.2 for x in xs], shim, 0.4, label="accelshim")
            for x, n, s in zip(xs, naive, shim):
                ax.annotate(f"{(s / n - 1) * 100:+.1f}%", (x + 0.2, s), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(list(xs), workloads)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_title(label, fontsize=10)
            ax.legend()
        fig.suptitle(_title(data, "Cold start"), fontsize=10)
        save(fig, "cold")

    warm = _ok(data, "warm_latency")
    if warm:
        cases = [c for c in warm["cases"] if "error" not in c]
        fig, ax = plt.subplots(figsize=(11, 4))
        xs = range(len(cases))
        ax.bar([x - 0.2 for x in xs], [max(c["in_process"]["p50_ms"], 1e-3) for c in cases], 0.4, label="in-process")
        ax.bar([x + 0.2 for x in xs], [c["shim_unix"]["p50_ms"] for c in cases], 0.4, label="shim (unix socket)")
        for x, c in zip(xs, cases):
            if c.get("ratio_p50"):
                ax.annotate(f"{c['ratio_p50']:.2f}x", (x + 0.2, c["shim_unix"]["p50_ms"]), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [c["case"] for c in cases], rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("p50 ms (log)")
        ax.legend()
        ax.set_title(_title(data, "Warm latency"), fontsize=10)
        save(fig, "warm")

    tput = _ok(data, "throughput")
    if tput:
        levels = tput["levels"]
        clients = [lv["clients"] for lv in levels]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for who, label in (("shim", "accelshim"), ("in_process", "in-process batch 1")):
            axes[0].plot(clients, [lv[who]["images_per_s"] for lv in levels], marker="o", label=label)
            axes[1].plot(clients, [lv[who].get("p99_ms", float("nan")) for lv in levels], marker="o", label=label)
        for ax, ylabel in ((axes[0], "images/s"), (axes[1], "p99 latency ms (log)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients, [str(c) for c in clients])
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            ax.legend()
        axes[1].set_yscale("log")
        fig.suptitle(_title(data, "Throughput, classify"), fontsize=10)
        save(fig, "throughput")

    density = _ok(data, "density")
    if density and any(r.get("gpu_added_mib") is not None for r in density.get("naive", [])):
        fig, ax = plt.subplots(figsize=(6, 4))
        for who, label in (("naive", "naive"), ("accelshim", "accelshim")):
            rows = density.get(who, [])
            ax.plot([r["k"] for r in rows], [r["gpu_added_mib"] or 0.0 for r in rows], marker="o", label=label)
        ax.set_xlabel("function instances K")
        ax.set_ylabel("GPU memory added, MiB")
        ax.legend()
        ax.set_title(_title(data, "Density"), fontsize=10)
        save(fig, "density")
    return written


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        data = json.loads(path.read_text())
        if data.get("benchmark") != "gpu":
            print(f"{path}: not a gpu benchmark, skipped")
            continue
        for out in plot_gpu(data, path.with_suffix("")):
            print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
