"""The naive per-function baselines: a function that owns its accelerator (no shim).

As a child process (what a fresh function instance does), timed in phases::

    python bench/naive.py classify --device cuda|cpu --model DIR --image PATH [--hold]
    python bench/naive.py gemm --device cuda|cpu --n 1024 [--inputs FILE] [--hold]

It imports its libraries (numpy + cupy for gemm; numpy + onnxruntime + PIL for classify), then
creates its GPU context / ORT session, loads the model, preprocesses, computes and copies the
result to the host. It prints one line ``BENCH {...}`` (a Python literal: seconds per phase, the
result, the providers really used); with ``--hold`` it then waits on stdin (GPU memory density).

Imported (bench.gpu), it gives the warm in-process baselines: ``InProcessGemm`` and
``InProcessClassifier``. The device is a parameter throughout: ``cuda`` uses cupy and the ORT CUDA
execution provider, ``cpu`` numpy and the ORT CPU provider, so everything runs without a GPU.
Nothing here imports numpy, cupy, onnxruntime or PIL at module level.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

CUDA_PROVIDERS: list[Any] = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
CPU_PROVIDERS: list[Any] = ["CPUExecutionProvider"]


# --- gemm ---------------------------------------------------------------------------------------
def import_gemm_libs(device: str) -> tuple[Any, Any]:
    """``(numpy, cupy or None)``."""
    import numpy as np

    if device == "cuda":
        import cupy as cp

        return np, cp
    return np, None


def create_context(cp: Any) -> None:
    """Create the CUDA context (cupy makes it lazily, on the first allocation)."""
    if cp is not None:
        cp.empty(1, dtype=cp.float32)
        cp.cuda.Device().synchronize()


class InProcessGemm:
    """``a @ b`` of host numpy arrays on ``device``, the result back on the host.

    cuda: host->device copies, cuBLAS matmul, device->host copy (which synchronizes).
    cpu: numpy; FP16 is computed in FP32 and rounded back, as the shim's CPU twin does
    (numpy has no FP16 BLAS, so a plain FP16 matmul would be an unfair strawman).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.np, self.cp = import_gemm_libs(device)
        create_context(self.cp)

    def __call__(self, a: Any, b: Any) -> Any:
        if self.cp is not None:
            cp = self.cp
            return cp.asnumpy(cp.matmul(cp.asarray(a), cp.asarray(b)))
        np = self.np
        if a.dtype == np.float16:
            return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)
        return np.matmul(a, b)


def gemm_inputs(np: Any, n: int, dtype: str = "float32") -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    return (rng.random((n, n), dtype=np.float32).astype(dtype, copy=False),
            rng.random((n, n), dtype=np.float32).astype(dtype, copy=False))


# --- classify -----------------------------------------------------------------------------------
def import_classify_libs() -> tuple[Any, Any, Any]:
    """``(numpy, onnxruntime, PIL.Image)``."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    return np, ort, Image


def make_session(ort: Any, model_path: Path, device: str) -> tuple[Any, list[str], str]:
    """An ORT session on ``device``; returns it, the providers it really uses, and a note.

    ORT falls back to the CPU provider (with a warning) when the CUDA provider cannot load its
    libraries; then ``preload_dlls()`` (onnxruntime-gpu >= 1.21: CUDA/cuDNN from the nvidia pip
    packages) is tried once, as a function author would. The note says so; the time counts.
    """
    providers = CUDA_PROVIDERS if device == "cuda" else CPU_PROVIDERS
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    note = ""
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        note = "CUDA provider did not load"
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
                session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
                note += "; loaded after ort.preload_dlls()" if "CUDAExecutionProvider" in session.get_providers() \
                    else "; still not after ort.preload_dlls()"
            except Exception as exc:  # noqa: BLE001 - recorded, the CPU session stays
                note += f"; preload_dlls failed: {exc}"
    return session, list(session.get_providers()), note


class Classifier:
    """ORT session + Pillow preprocessing of the model's ``model.json`` (the shim's CPU path)."""

    def __init__(self, device: str, model_dir: Path, libs: tuple[Any, Any, Any] | None = None) -> None:
        import json

        self.np, self.ort, self.Image = libs or import_classify_libs()
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "model.json").read_text())
        self.pre = config["preprocessing"]
        self.labels = (model_dir / config.get("labels", "labels.txt")).read_text().splitlines()
        self.session, self.providers, self.note = make_session(self.ort, model_dir / "model.onnx", device)
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def preprocess(self, jpeg: bytes) -> Any:
        import io

        np, pre = self.np, self.pre
        image = self.Image.open(io.BytesIO(jpeg)).convert("RGB")
        width, height = image.size
        side = pre["crop"] * min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        resample = getattr(self.Image.Resampling, pre["resize"].upper())
        resized = image.resize((pre["size"], pre["size"]), resample, box=box)
        x = (np.asarray(resized, dtype=np.float32) - np.float32(pre["mean"])) / np.float32(pre["std"])
        return np.ascontiguousarray(x.transpose(2, 0, 1))[None]

    def run(self, batch: Any, top_k: int = 5) -> list[tuple[str, float]]:
        np = self.np
        logits = self.session.run([self.output], {self.input: batch})[0][0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")[:top_k]
        return [(self.labels[i], float(p[i])) for i in order]

    def classify(self, jpeg: bytes, top_k: int = 5) -> list[tuple[str, float]]:
        return self.run(self.preprocess(jpeg), top_k)


InProcessClassifier = Classifier


# --- the child process --------------------------------------------------------------------------
def _child(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="a naive function instance (see bench/naive.py)")
    parser.add_argument("op", choices=("classify", "gemm"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--inputs", type=Path, help="gemm: A and B, raw FP32 n x n each (else made here)")
    parser.add_argument("--hold", action="store_true", help="after the result, wait for stdin to close")
    args = parser.parse_args(argv)

    out: dict[str, Any] = {"op": args.op, "device": args.device}
    t0 = time.perf_counter()
    if args.op == "classify":
        libs = import_classify_libs()
        t1 = time.perf_counter()
        clf = Classifier(args.device, args.model, libs)  # CUDA context + model load + session
        t2 = time.perf_counter()
        batch = clf.preprocess(args.image.read_bytes())
        t3 = time.perf_counter()
        top = clf.run(batch)
        t4 = time.perf_counter()
        out.update(imports_s=t1 - t0, session_s=t2 - t1, preprocess_s=t3 - t2, first_run_s=t4 - t3,
                   first_result_s=t4 - t1, top1=top[0][0], providers=clf.providers, note=clf.note)
    else:
        np, cp = import_gemm_libs(args.device)
        t1 = time.perf_counter()
        if args.inputs is not None:  # A and B as a function is given them (procs.write_gemm_inputs)
            a, b = np.fromfile(args.inputs, dtype="<f4").reshape(2, args.n, args.n)
        else:
            a, b = gemm_inputs(np, args.n)  # the function's input: not timed
        t1b = time.perf_counter()
        create_context(cp)
        t2 = time.perf_counter()
        if cp is not None:
            c = cp.asnumpy(cp.matmul(cp.asarray(a), cp.asarray(b)))
        else:
            c = np.matmul(a, b)
        t3 = time.perf_counter()
        out.update(imports_s=t1 - t0, inputs_s=t1b - t1, context_s=t2 - t1b, first_run_s=t3 - t2,
                   first_result_s=t3 - t1b, c00=float(c[0, 0]))
    print("BENCH " + repr(out), flush=True)
    if args.hold:
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
