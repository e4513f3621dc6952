"""A probe for ``bench/worker_ab.py stages``, not part of the shim: on this directory's PYTHONPATH
with ``STAGE_OUT`` set, every process of a shim (the device process and its request workers) times
the stages of classify's path as it runs: the batchers (gathering, running a batch, the replies),
the CUDA pipeline (pixels up, resize + normalise, the model, its part on its own thread), the link's
messages both ways and the workers' calls, the workers' decoding, op runs and Flask apps, wall time
and the calling thread's CPU time per call; also each thread's CPU and how late a thread sleeping
2 ms at a time wakes (the wait for the interpreter lock, with the OS's wake-up). Each process writes its running totals to
``STAGE_OUT/stage-<pid>.json`` twice a second; the probe reads them before and after its window.
"""
from __future__ import annotations

import importlib.abc
import json
import os
import sys
import threading
import time
from typing import Any, Callable

OUT = os.environ.get("STAGE_OUT")
_TOTALS: dict[str, list[float]] = {}  # what -> [calls, wall s, thread CPU s, rows]
_LOCK = threading.Lock()


def _timed(what: Callable[[tuple[Any, ...]], str] | str, fn: Callable[..., Any],
           rows: Callable[[tuple[Any, ...]], int] | None = None) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            key = what(args) if callable(what) else what
            with _LOCK:
                t = _TOTALS.setdefault(key, [0, 0.0, 0.0, 0])
                t[0] += 1
                t[1] += wall
                t[2] += cpu
                t[3] += rows(args) if rows else 0
    return wrapper


def _threads_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads, summed by name (a Python thread's name up to its
    first digit; other threads as ``native:<comm>``)."""
    names = {t.native_id: t.name.rstrip("0123456789-").split("(")[0].strip() for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                comm, rest = f.read().rsplit(")", 1)
        except OSError:  # the thread ended meanwhile
            continue
        fields = rest.split()
        name = names.get(int(tid)) or "native:" + comm.split("(", 1)[1]
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


_LAG: list[float] = [0, 0.0, 0.0]  # wakes, summed overshoot s, largest overshoot s


def _lag_probe() -> None:
    """Sleeps 2 ms again and again: how late it wakes is the OS's wake-up plus the wait for the
    interpreter lock, which the process's busy threads hold."""
    while True:
        t = time.perf_counter()
        time.sleep(0.002)
        late = time.perf_counter() - t - 0.002
        with _LOCK:
            _LAG[0] += 1
            _LAG[1] += late
            _LAG[2] = max(_LAG[2], late)


def _dump() -> None:
    path = os.path.join(OUT or ".", f"stage-{os.getpid()}.json")
    while True:
        time.sleep(0.5)
        threads = _threads_cpu()
        with _LOCK:
            if not _TOTALS:
                continue
            data = json.dumps({"argv": sys.argv[:2], "totals": _TOTALS, "threads": threads, "lag": _LAG,
                               "time": time.monotonic()})
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(path + ".tmp", path)


def _patch(name: str, module: Any) -> None:
    if name == "shim.batching":
        batcher = module.Batcher
        init, run = batcher.__init__, batcher._run

        def __init__(self: Any, op: str, run_batch: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            init(self, op, _timed(f"{op}: run the batch", run_batch, rows=lambda a: len(a[0])), *args, **kwargs)

        batcher.__init__ = __init__
        batcher._run = _timed(lambda a: f"{a[0].name}: run + replies", run, rows=lambda a: len(a[1]))
        # a request worker's batchers only start their batches (run_batch_later): answered on the link's reader
        batcher._launch = _timed(lambda a: f"{a[0].name}: start a batch (answered later)", batcher._launch,
                                 rows=lambda a: len(a[1]))
        batcher._landed = _timed(lambda a: f"{a[0].name}: answer a started batch", batcher._landed,
                                 rows=lambda a: len(a[1]))
        if hasattr(batcher, "_gather"):  # a tree before the queue had a module of its own (bench/ab.sh)
            batcher._gather = _timed(lambda a: f"{a[0].name}: gather", batcher._gather)
    elif name == "shim.batch_queue":
        module.BatchQueue._gather = _timed(lambda a: f"{a[0].name}: gather", module.BatchQueue._gather)
    elif name == "shim.backends.cuda_host":
        module.DeviceWorker.upload_concatenated = _timed("pixels up (DMA or staging copy, queued)",
                                                         module.DeviceWorker.upload_concatenated)
    elif name == "shim.backends.cuda_imaging":
        pipeline = module.CudaImagePipeline
        if hasattr(pipeline, "preprocess_batch"):  # a tree before the resize had a module of its own (bench/ab.sh)
            pipeline.preprocess_batch = _timed("resize + normalise (launches)", pipeline.preprocess_batch)
            pipeline._preprocess = _timed("resize + normalise: one run of same-size images", pipeline._preprocess)
        pipeline.logits = _timed("logits (the whole device run)", pipeline.logits, rows=lambda a: len(a[1]))
        pipeline.logits_later = _timed("queue a batch (pixels up, resize, model, logits down: queued)",
                                       pipeline.logits_later, rows=lambda a: len(a[1]))
        pipeline._decode_into = _timed("a chunk with JPEGs: pixels up, JPEGs decoded, all resized", pipeline._decode_into,
                                       rows=lambda a: len(a[2]))
    elif name == "shim.backends.cuda_resize":
        resizer = module.CudaResizer
        resizer.preprocess_batch = _timed("resize + normalise (launches)", resizer.preprocess_batch)
        resizer.preprocess_run = _timed("resize + normalise: one run of same-size images", resizer.preprocess_run)
    elif name == "shim.backends.cuda_landing":
        module.Landing._land_one = _timed("land a batch (the wait for the GPU, logits out, the answers)",
                                          module.Landing._land_one, rows=lambda a: a[2])
        module.Landing.slot = _timed("a landing slot (waits while as many batches are in flight)", module.Landing.slot)
    elif name == "shim.backends.cuda_jpeg":
        call = "decode_into" if hasattr(module.JpegEngines, "decode_into") else "decode"  # (nvImageCodec's before)
        setattr(module.JpegEngines, call, _timed("the JPEG engines' decode (one call per chunk)",
                                                 getattr(module.JpegEngines, call), rows=lambda a: len(a[1])))
    elif name == "shim.backends.nvjpeg":
        module.Nvjpeg.decode_batch = _timed("nvJPEG's initialize + decode (the lock let go once)",
                                            module.Nvjpeg.decode_batch, rows=lambda a: len(a[2]))
        module.Nvjpeg.shape = _timed("nvJPEG's header read (one JPEG)", module.Nvjpeg.shape)
    elif name == "shim.backends.onnx":
        module.OnnxRunner.run_device = _timed("the model (run_device, synchronous)", module.OnnxRunner.run_device)
        module.FixedSession.run_device = _timed("the model on its thread (input copy, replay, logits down)",
                                                module.FixedSession.run_device)
    elif name == "shim.backends.cuda":
        module.copy_on_device = _timed("the model's input copy (device to device, synchronous)", module.copy_on_device)
    elif name == "shim.ops.classify":
        module.ClassifyOp._prepare = _timed("classify: decode + pixels", module.ClassifyOp._prepare)
    elif name == "shim.dispatch":
        module.Dispatcher.infer = _timed("dispatcher infer (the op and its checks)", module.Dispatcher.infer)
    elif name == "flask.app":
        module.Flask.wsgi_app = _timed("the app (Flask, the whole request)", module.Flask.wsgi_app)
    elif name == "shim.workers.channel":
        module.Channel.recv = _timed("link message in (the wait for it, read, unpickled)", module.Channel.recv)
        module.Channel.send = _timed("link message out (pickled, sent or posted)", module.Channel.send)
        if hasattr(module.Channel, "take_ready"):  # (the device's links, read by one thread: recv only unpickles)
            module.Channel.take_ready = _timed("link messages taken (read without waiting, unpickled)",
                                               module.Channel.take_ready)
    elif name == "shim.workers.link":
        module.LinkClient.call = _timed("link call (worker side)", module.LinkClient.call)
        module.LinkServer._dispatch = _timed("link call started (a Deferred: into the batcher)",
                                             module.LinkServer._dispatch)


_WANTED = {"shim.batching", "shim.batch_queue", "shim.backends.cuda_host", "shim.backends.cuda_imaging",
           "shim.backends.cuda_jpeg", "shim.backends.nvjpeg", "shim.backends.cuda_landing", "shim.backends.cuda_resize",
           "shim.backends.onnx",
           "shim.backends.cuda", "shim.ops.classify", "shim.dispatch", "flask.app", "shim.workers.link",
           "shim.workers.channel"}


class _Finder(importlib.abc.MetaPathFinder):
    """Patches the modules above as they are first imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WANTED:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                execute = spec.loader.exec_module

                def exec_module(module: Any, execute: Callable[[Any], None] = execute) -> None:
                    execute(module)
                    _patch(fullname, module)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


if OUT:
    sys.meta_path.insert(0, _Finder())
    threading.Thread(target=_dump, name="stage-timer", daemon=True).start()
    threading.Thread(target=_lag_probe, name="stage-lag", daemon=True).start()
