"""Probe on the GPU machine: JPEG decoding on the GPU with NVIDIA nvImageCodec against the shim's CPU
decode (libjpeg-turbo in a request worker), before any product code is written for it.

    python bench/nvjpeg_probe.py [JPEG ...]             # on the GPU machine (``ci/gpu-run.sh nvjpeg``)
    python bench/nvjpeg_probe.py make-inputs [DIR]      # here: the two sample photos as JPEG files
    python bench/nvjpeg_probe.py --cpu-only [JPEG ...]  # a dry run without a GPU: nvImageCodec's CPU decoder

Inputs are JPEG files: by default ``chelsea.jpg`` and ``coffee.jpg`` in ``.probe/nvjpeg/`` under the
repository root (git-ignored; carried to the GPU machine with ``carry``), else in ``/tmp/nvjpeg-probe/``.
``make-inputs`` writes them (default DIR ``.probe/nvjpeg``) from scikit-image's sample photos, JPEG
quality 90 with Pillow, as ``bench.procs.cat_jpeg`` makes the benchmark's cat (the same bytes under the
same Pillow). The GPU machine has no scikit-image: make them here.

What it prints, also written as JSON to ``$OUT/nvjpeg-probe.json`` when OUT is set (after each section):
  versions  python, nvImageCodec, cupy (CUDA runtime, driver, device), onnxruntime, the libraries loaded
  inputs    size, chroma subsampling, sha256 of each photo; whether the shim takes its plain-JPEG path
  variants  which decoders work: nvImageCodec backends HW_GPU_ONLY (the JPEG engines), GPU_ONLY,
            HYBRID_CPU_GPU (nvJPEG, Huffman on the CPU below 1 MP unless its threshold is 0), CPU_ONLY
            (libjpeg-turbo), with and without fancy upsampling; a missing one is reported, not fatal
  pixels    each variant's RGB against the shim's decode (``shim.ops.imaging.decode_image``): max and
            mean abs difference, fraction of pixels (and of values) that differ
  decode    per batch of 1, 6, 16, 32 (one photo repeated: same; the photos in turn: mixed), medians of
            50 after warm-up: wall ms, the calling thread's CPU ms (time.thread_time) and the process's
            (time.process_time: nvImageCodec decodes on a pool of threads), for the shim's decode (one
            image after another, as a request worker does) and each variant (CodeStreams from the bytes,
            decode, wait for the stream through a blocking event, so that no spin counts as CPU)
  classify  the shim's classify pipeline (``CudaBackend.image_pipeline``: resize + normalise on the GPU,
            bit-exact with Pillow, the model on the CUDA EP; the CPU twin with --cpu-only) on the
            shim's pixels and on each variant's, taken to the host: max abs logits difference, top-1
  e2e       per batch: the shim's decode then ``pipeline.logits`` (pixels uploaded), against a GPU
            decode straight into the same pipeline's resize (``resizer.preprocess_batch``) and model
            (``runner.run_device``), no host copy of the pixels; in-process, no request worker or link

Exits 2 when ``nvidia.nvimgcodec`` cannot be imported.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("chelsea", "coffee")
INPUT_DIRS = (ROOT / ".probe" / "nvjpeg", Path("/tmp/nvjpeg-probe"))
MODEL = "efficientnet-lite0"
BATCHES = (1, 6, 16, 32)
REPEATS = int(os.environ.get("NVJPEG_PROBE_REPEATS", "50"))
WARMUP = 5
FANCY = ":fancy_upsampling=1"  # libjpeg's (and so Pillow's) chroma upsampling; nvJPEG's default is simpler
GPU_HUFFMAN = "nvjpeg_cuda_decoder:hybrid_huffman_threshold=0"  # Huffman on the GPU at every size
# name -> (nvImageCodec BackendKind, decoder options); https://docs.nvidia.com/cuda/nvimagecodec/codec_options.html
VARIANTS: dict[str, tuple[str, str]] = {
    "hw": ("HW_GPU_ONLY", ""),
    "hw-fancy": ("HW_GPU_ONLY", FANCY),
    "gpu": ("GPU_ONLY", ""),
    "gpu-fancy": ("GPU_ONLY", FANCY),
    "hybrid": ("HYBRID_CPU_GPU", ""),
    "hybrid-gpuhuff": ("HYBRID_CPU_GPU", GPU_HUFFMAN),
    "hybrid-fancy": ("HYBRID_CPU_GPU", FANCY),
    "cpu": ("CPU_ONLY", ""),
}
E2E_VARIANTS = ("hw", "gpu", "hybrid", "hybrid-gpuhuff")


class Report:
    """Prints each result and keeps it for ``$OUT/nvjpeg-probe.json`` (rewritten by ``save``)."""

    def __init__(self, out: str | None) -> None:
        self.data: dict[str, Any] = {}
        self.path = Path(out) / "nvjpeg-probe.json" if out else None

    def put(self, section: str, key: str, value: Any, line: str | None = None) -> None:
        self.data.setdefault(section, {})[key] = value
        print(f"{section} {key}: {line if line is not None else value}", flush=True)

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            part = self.path.with_suffix(".part")
            part.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
            part.replace(self.path)


class Variant:
    """One nvImageCodec decoder: a backend kind and options."""

    def __init__(self, nv: Any, name: str, kind: str, options: str, device_id: int,
                 wait: Callable[[int], None]) -> None:
        self.nv, self.name, self.kind, self.options = nv, name, kind, options
        self._wait = wait
        self.params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.ColorSpec.SRGB,
                                      allow_any_depth=False)
        self.decoder = nv.Decoder(device_id=device_id, backends=[nv.Backend(getattr(nv.BackendKind, kind))],
                                  options=options)

    def decode(self, jpegs: Sequence[bytes], stream: int = 0) -> list[Any]:
        """``jpegs`` decoded as one batch, ordered on ``stream`` and waited for; raises when one fails."""
        images = self.decoder.decode([self.nv.CodeStream(data) for data in jpegs], params=self.params,
                                     cuda_stream=stream)
        failed = [i for i, image in enumerate(images) if image is None]
        if failed:
            raise RuntimeError(f"{self.name}: images {failed} of {len(images)} not decoded")
        self._wait(stream)
        return images


def host_pixels(image: Any) -> np.ndarray:
    """A decoded nvImageCodec image as contiguous uint8 HWC on the host."""
    return np.ascontiguousarray(np.asarray(image.cpu()))


def pixel_diff(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """How ``a`` differs from the reference ``b`` (uint8 HWC)."""
    if a.shape != b.shape:
        return {"shape": list(a.shape), "reference_shape": list(b.shape)}
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4),
            "pixels_differing": round(float((d.max(axis=-1) > 0).mean()), 4),
            "values_differing": round(float((d > 0).mean()), 4)}


def measure(fn: Callable[[], object]) -> dict[str, float]:
    """Medians over ``REPEATS`` calls after ``WARMUP``: wall, calling thread's CPU, process CPU (ms)."""
    for _ in range(WARMUP):
        fn()
    wall, thread, process = [], [], []
    for _ in range(REPEATS):
        w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
        fn()
        thread.append(time.thread_time() - t)
        process.append(time.process_time() - p)
        wall.append(time.perf_counter() - w)
    return {k: round(1e3 * statistics.median(v), 3)
            for k, v in (("wall_ms", wall), ("thread_cpu_ms", thread), ("process_cpu_ms", process))}


def timing_line(m: dict[str, float], n: int) -> str:
    return (f"wall {m['wall_ms']:.3f} ms ({m['wall_ms'] / n:.3f}/image), CPU thread {m['thread_cpu_ms']:.3f} "
            f"({m['thread_cpu_ms'] / n:.3f}/image), process {m['process_cpu_ms']:.3f} ms "
            f"({m['process_cpu_ms'] / n:.3f}/image)")


def batch_sets(photos: Sequence[bytes]) -> list[tuple[str, list[bytes]]]:
    """(label, jpegs): each batch size with the first photo repeated, and (from 2 on) the photos in turn."""
    sets = []
    for n in BATCHES:
        sets.append((f"same n={n}", [photos[0]] * n))
        if n > 1 and len(photos) > 1:
            sets.append((f"mixed n={n}", [photos[i % len(photos)] for i in range(n)]))
    return sets


def make_inputs(folder: Path) -> None:
    """The two sample photos as JPEG (quality 90, Pillow) in ``folder``."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        out = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(out, format="JPEG", quality=90)
        path = folder / f"{name}.jpg"
        path.write_bytes(out.getvalue())
        print(f"{path}: {len(out.getvalue())} bytes, sha256 {hashlib.sha256(out.getvalue()).hexdigest()[:16]}")


def default_inputs() -> list[Path]:
    for folder in INPUT_DIRS:
        paths = [folder / f"{name}.jpg" for name in PHOTOS]
        if all(p.is_file() for p in paths):
            return paths
    sys.exit(f"nvjpeg_probe: no {', '.join(p + '.jpg' for p in PHOTOS)} in {' or '.join(map(str, INPUT_DIRS))}: "
             "run `python bench/nvjpeg_probe.py make-inputs` where scikit-image is, carry .probe/nvjpeg")


def loaded_libraries() -> list[str]:
    """The nvJPEG / nvImageCodec / CUDA runtime libraries mapped into this process."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    keys = ("nvjpeg", "nvimgcodec", "cudart", "libcuda.so")
    return sorted({line.split()[-1] for line in lines if any(k in line.rsplit("/", 1)[-1] for k in keys)})


def versions(report: Report, nv: Any, gpu: bool) -> None:
    report.put("versions", "python", sys.version.split()[0])
    report.put("versions", "nvimgcodec", f"{nv.__version__} (built with CUDA {nv.__cuda_version__}), "
               f"backend kinds {list(nv.BackendKind.__members__)}")
    report.put("versions", "cpus", os.cpu_count())
    try:
        import cupy as cp

        line = cp.__version__
        if gpu:
            props = cp.cuda.runtime.getDeviceProperties(0)
            line += (f", CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}, "
                     f"{props['name'].decode()}")
        report.put("versions", "cupy", line)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        report.put("versions", "cupy", f"unavailable: {type(exc).__name__}: {exc}")
    try:
        import onnxruntime as ort

        report.put("versions", "onnxruntime", f"{ort.__version__} {ort.get_available_providers()}")
    except Exception as exc:  # noqa: BLE001
        report.put("versions", "onnxruntime", f"unavailable: {type(exc).__name__}: {exc}")
    report.put("versions", "libraries", loaded_libraries())


def inputs(report: Report, nv: Any, paths: Sequence[Path], shim_decode: Callable[[bytes], np.ndarray]) -> list[bytes]:
    from shim.ops.jpeg import decode_plain_jpeg

    photos = []
    for path in paths:
        data = path.read_bytes()
        photos.append(data)
        stream = nv.CodeStream(data)
        plain = decode_plain_jpeg(data, 1 << 40) is not None
        info = {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16],
                "codec": stream.codec_name, "width": stream.width, "height": stream.height,
                "chroma_subsampling": str(stream.chroma_subsampling),
                "shim_path": "plain JPEG (simplejpeg)" if plain else "Pillow",
                "shim_shape": list(shim_decode(data).shape)}
        report.put("inputs", path.stem, info)
    return photos


def variants(report: Report, nv: Any, photos: Sequence[bytes], gpu: bool, names: Sequence[str],
             stream: int, wait: Callable[[int], None]) -> dict[str, Variant]:
    """The variants that decode every photo (each tried with all of them as one batch)."""
    device_id = nv.NVIMGCODEC_DEVICE_CURRENT if gpu else nv.NVIMGCODEC_DEVICE_CPU_ONLY
    working = {}
    for name in names:
        kind, options = VARIANTS[name]
        if not hasattr(nv.BackendKind, kind):
            report.put("variants", name, f"no BackendKind.{kind} in this nvImageCodec")
            continue
        try:
            variant = Variant(nv, name, kind, options, device_id, wait)
        except Exception as exc:  # noqa: BLE001 - a backend this machine or build lacks
            report.put("variants", name, f"no decoder ({kind} {options!r}): {type(exc).__name__}: {exc}")
            continue
        try:
            images = variant.decode(photos, stream)
        except Exception as exc:  # noqa: BLE001
            report.put("variants", name, f"cannot decode ({kind} {options!r}): {type(exc).__name__}: {exc}")
            continue
        working[name] = variant
        report.put("variants", name, f"ok ({kind} {options!r}): {[str(i.buffer_kind) for i in images]}")
    report.put("versions", "libraries after decoders", loaded_libraries())
    return working


def pixels(report: Report, working: dict[str, Variant], photos: Sequence[bytes], paths: Sequence[Path],
           reference: Sequence[np.ndarray], stream: int) -> dict[str, list[np.ndarray]]:
    decoded = {}
    for name, variant in working.items():
        decoded[name] = [host_pixels(i) for i in variant.decode(photos, stream)]
        for path, got, want in zip(paths, decoded[name], reference):
            d = pixel_diff(got, want)
            line = (f"max {d['max_abs']}, mean {d['mean_abs']}, pixels differing {d['pixels_differing']:.2%}, "
                    f"values {d['values_differing']:.2%}" if "max_abs" in d else f"shapes differ: {d}")
            report.put("pixels", f"{name} {path.stem}", d, line)
    return decoded


def decode_timings(report: Report, working: dict[str, Variant], sets: Sequence[tuple[str, list[bytes]]],
                   shim_decode: Callable[[bytes], np.ndarray], stream: int) -> None:
    for label, batch in sets:
        m = measure(lambda: [shim_decode(b) for b in batch])
        report.put("decode", f"shim {label}", m, timing_line(m, len(batch)))
        report.save()
    for name, variant in working.items():
        for label, batch in sets:
            try:
                m = measure(lambda: variant.decode(batch, stream))
            except Exception as exc:  # noqa: BLE001 - a batch the backend refuses: the others still run
                report.put("decode", f"{name} {label}", {"error": str(exc)}, f"failed: {exc}")
                continue
            report.put("decode", f"{name} {label}", m, timing_line(m, len(batch)))
        report.save()


def classify_pipeline(report: Report, gpu: bool) -> tuple[Any, Any, Any] | None:
    """(backend, pipeline, config) of the shim's classify, or None (reported) without the model or onnxruntime."""
    folder = ROOT / "models" / MODEL
    if not (folder / "model.onnx").is_file():
        report.put("classify", "skipped", f"no model at {folder} (make models, or carry models/)")
        return None
    try:
        from shim.modelrepo import ModelRepository

        config = ModelRepository(ROOT / "models").load(MODEL)
        if gpu:
            from shim.backends.cuda import CudaBackend

            backend: Any = CudaBackend()
        else:
            from shim.backends.cpu import CpuBackend

            backend = CpuBackend()
        pipeline = backend.image_pipeline(config)
    except Exception as exc:  # noqa: BLE001
        report.put("classify", "skipped", f"{type(exc).__name__}: {exc}")
        return None
    report.put("classify", "pipeline", f"{type(pipeline).__name__} on {pipeline.device}")
    return backend, pipeline, config


def classify(report: Report, pipeline: Any, labels: Sequence[str], paths: Sequence[Path],
             reference: Sequence[np.ndarray], decoded: dict[str, list[np.ndarray]]) -> None:
    def run(image: np.ndarray) -> np.ndarray:
        return np.asarray(pipeline.logits([pipeline.prepare(image)])[0], dtype=np.float64)

    def top(logits: np.ndarray) -> str:
        p = np.exp(logits - logits.max())
        best = int(np.argmax(logits))
        return f"{labels[best]} ({p[best] / p.sum():.4f})"

    for i, path in enumerate(paths):
        base = run(reference[i])
        report.put("classify", f"shim {path.stem}", {"top1": top(base)}, f"top-1 {top(base)}")
        for name, images in decoded.items():
            logits = run(images[i])
            d = {"max_abs_logits": round(float(np.abs(logits - base).max()), 5), "top1": top(logits),
                 "same_top1": bool(np.argmax(logits) == np.argmax(base)),
                 "same_top5": bool(set(np.argsort(-logits)[:5]) == set(np.argsort(-base)[:5]))}
            report.put("classify", f"{name} {path.stem}", d,
                       f"max |logits - shim's| {d['max_abs_logits']}, top-1 {d['top1']}, "
                       f"same top-1 {d['same_top1']}, same top-5 {d['same_top5']}")


def end_to_end(report: Report, backend: Any, pipeline: Any, size: int, working: dict[str, Variant],
               sets: Sequence[tuple[str, list[bytes]]], shim_decode: Callable[[bytes], np.ndarray],
               decoded: dict[str, list[np.ndarray]]) -> None:
    """Batches through classify's GPU pipeline: as the shim does today, and decoded on the GPU."""
    import cupy as cp

    from shim.backends import onnx

    name = pipeline.runner.inputs[0].name

    def today(batch: list[bytes]) -> np.ndarray:
        return pipeline.logits([pipeline.prepare(shim_decode(b)) for b in batch])

    def on_gpu(variant: Variant, batch: list[bytes]) -> np.ndarray:
        def job(state: Any) -> np.ndarray:  # on a device worker's stream, as ``logits`` runs
            arrays = [cp.asarray(i) for i in variant.decode(batch, state.stream.ptr)]
            flat = cp.concatenate([cp.ascontiguousarray(a).reshape(-1) for a in arrays])
            rows = onnx.padded_batch(len(batch))
            out = cp.empty((rows, 3, size, size), dtype=cp.float32)
            plans: list[Any] = []  # held until the stream has run the resize
            pipeline.resizer.preprocess_batch(flat, [tuple(a.shape) for a in arrays], out, plans)
            if rows > len(batch):
                out[len(batch):] = 0
            state.stream.synchronize()
            return pipeline.runner.run_device(name, out.data.ptr, out.shape, backend.device_id)[:len(batch)]

        return backend.on_device(job)

    photo = sets[0][1][0]
    for vname in [v for v in E2E_VARIANTS if v in working]:
        try:  # the same pixels through both routes: the resize and the model must agree
            host = pipeline.logits([pipeline.prepare(decoded[vname][0])])
            device = on_gpu(working[vname], [photo])
        except Exception as exc:  # noqa: BLE001
            report.put("e2e", f"{vname} check", {"error": str(exc)}, f"failed: {type(exc).__name__}: {exc}")
            continue
        report.put("e2e", f"{vname} check", round(float(np.abs(host - device).max()), 6),
                   f"max |logits| difference, device-resident vs host pixels: {float(np.abs(host - device).max()):.6f}")
    report.save()
    for label, batch in sets:
        m = measure(lambda: today(batch))
        report.put("e2e", f"shim decode + logits {label}", m, timing_line(m, len(batch)))
        for vname in [v for v in E2E_VARIANTS if v in working]:
            try:
                m = measure(lambda: on_gpu(working[vname], batch))
            except Exception as exc:  # noqa: BLE001
                report.put("e2e", f"{vname} {label}", {"error": str(exc)}, f"failed: {type(exc).__name__}: {exc}")
                continue
            report.put("e2e", f"{vname} decode + resize + model {label}", m, timing_line(m, len(batch)))
        report.save()


def _no_wait(stream: int) -> None:
    """Nothing to wait for: a CPU decode is done when ``decode`` returns."""


class StreamWait:
    """The probe's own CUDA stream (``handle``), and a wait for the work queued on a stream through a
    blocking event: the host sleeps rather than spins, so that waiting costs no CPU time."""

    def __init__(self) -> None:
        import cupy as cp

        cp.cuda.Device(0).use()
        self._runtime = cp.cuda.runtime
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.handle: int = self.stream.ptr
        self._done = cp.cuda.Event(block=True, disable_timing=True)

    def __call__(self, handle: int) -> None:
        self._runtime.eventRecord(self._done.ptr, handle)
        self._done.synchronize()


def main(argv: list[str]) -> int:
    if argv[:1] == ["make-inputs"]:
        make_inputs(Path(argv[1]) if len(argv) > 1 else INPUT_DIRS[0])
        return 0
    cpu_only = "--cpu-only" in argv
    paths = [Path(a) for a in argv if a != "--cpu-only"] or default_inputs()
    report = Report(os.environ.get("OUT"))
    try:
        import nvidia.nvimgcodec as nv
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a library it loads
        message = (f"nvjpeg_probe: nvidia.nvimgcodec is not importable ({type(exc).__name__}: {exc}); install the "
                   "nvidia-nvimgcodec-cu13 and nvidia-nvjpeg wheels (.whl-gpu, `ci/gpu-run.sh nvjpeg`)")
        report.data["error"] = message
        report.save()
        print(message, file=sys.stderr)
        return 2

    from shim.config import Settings
    from shim.kernels.resample import rgb_pixels
    from shim.ops.imaging import decode_image

    def shim_decode(data: bytes) -> np.ndarray:
        return rgb_pixels(decode_image(data, "probe image", Settings.max_image_pixels))

    gpu = not cpu_only
    stream, wait = 0, _no_wait  # type: tuple[int, Callable[[int], None]]
    if gpu:
        try:
            wait = StreamWait()
            stream = wait.handle
        except Exception as exc:  # noqa: BLE001
            print(f"nvjpeg_probe: no CUDA device through cupy ({type(exc).__name__}: {exc}); "
                  "run with --cpu-only for a dry run", file=sys.stderr)
            return 1
    report.put("versions", "mode", "GPU" if gpu else "CPU only (dry run)")
    versions(report, nv, gpu)
    photos = inputs(report, nv, paths, shim_decode)
    report.save()
    names = list(VARIANTS) if gpu else ["cpu"]
    working = variants(report, nv, photos, gpu, names, stream, wait)
    report.save()
    reference = [shim_decode(p) for p in photos]
    decoded = pixels(report, working, photos, paths, reference, stream)
    report.save()
    sets = batch_sets(photos)
    decode_timings(report, working, sets, shim_decode, stream)
    found = classify_pipeline(report, gpu)
    if found is not None:
        backend, pipeline, config = found
        classify(report, pipeline, config.labels or [], paths, reference, decoded)
        report.save()
        if gpu and pipeline.device == "cuda" and any(v in working for v in E2E_VARIANTS):
            end_to_end(report, backend, pipeline, config.preprocessing.size, working, sets, shim_decode, decoded)
        else:
            report.put("e2e", "skipped", "needs the GPU pipeline (onnxruntime's CUDA EP) and a GPU variant")
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
