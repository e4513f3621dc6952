"""Probe on the GPU machine: one EfficientNet-Lite0 run per batch size on onnxruntime's CUDA provider,
node by node vs replaying a CUDA graph (and with NHWC convolutions), the input and output bound to
fixed device buffers; medians of 200 runs and the largest difference from node by node.

    python bench/ort_graphs.py [OUT_DIR]     # prints, and writes ort-graphs.json there
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cupy as cp
import numpy as np
import onnxruntime as ort

MODEL = Path(__file__).resolve().parents[1] / "models" / "efficientnet-lite0" / "model.onnx"
VARIANTS = (("node by node", False, False), ("graph", True, False), ("nhwc", False, True), ("graph+nhwc", True, True))


def session(batch: int, graph: bool, nhwc: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_free_dimension_override_by_name("batch", batch)
    provider = {"device_id": 0, **({"enable_cuda_graph": "1"} if graph else {}), **({"prefer_nhwc": "1"} if nhwc else {})}
    return ort.InferenceSession(str(MODEL), options, providers=[("CUDAExecutionProvider", provider)])


def probe(batch: int, graph: bool, nhwc: bool, x: cp.ndarray) -> tuple[dict[str, float], np.ndarray]:
    sess = session(batch, graph, nhwc)
    xb, yb = cp.empty_like(x), cp.empty((batch, 1000), cp.float32)
    binding = sess.io_binding()
    binding.bind_input("input", "cuda", 0, np.float32, list(x.shape), xb.data.ptr)
    binding.bind_output("logits", "cuda", 0, np.float32, [batch, 1000], yb.data.ptr)

    def once() -> np.ndarray:
        xb[...] = x
        cp.cuda.get_current_stream().synchronize()
        sess.run_with_iobinding(binding)
        return cp.asnumpy(yb)

    for _ in range(5):  # warm-up; a graph is captured here
        out = once()
    walls, cpus = [], []
    for _ in range(200):
        wall, cpu = time.perf_counter(), time.process_time()
        out = once()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"p50_ms": 1e3 * float(np.median(walls)), "cpu_ms": 1e3 * float(np.mean(cpus))}, out


def main(out_dir: Path) -> None:
    results = {"onnxruntime": ort.__version__, "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    rng = np.random.default_rng(0)
    for batch in (1, 8, 32):
        x = cp.asarray(rng.standard_normal((batch, 3, 224, 224), dtype=np.float32))
        reference = None
        for name, graph, nhwc in VARIANTS:
            timing, out = probe(batch, graph, nhwc, x)
            reference = out if reference is None else reference
            results[f"{name} b{batch}"] = {**timing, "max_abs_diff": float(np.abs(out - reference).max())}
            print(name, batch, results[f"{name} b{batch}"], flush=True)
    (out_dir / "ort-graphs.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
