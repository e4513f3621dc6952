"""Probes of the request path's parts one at a time, without a shim: the link between a request
worker and the device process, ``import accel`` with and without bytecode, classify's device
pipeline, and a request worker's CPU per classify. ``bench/worker_ab.py`` runs them (``link``,
``compiled``, ``pipeline``, ``parts``) and says what each prints; ``pipeline`` needs a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT
from bench.front_probe import faked_device_handlers
from bench.procs import cat_jpeg


def link() -> None:
    """One link call with 1 and 4 decoded photos, over the socket and lent through the arena."""
    import resource
    import tempfile

    import numpy as np

    from shim.workers.arena import Arena
    from shim.workers.link import LinkClient, LinkServer

    def cpu_seconds() -> float:  # both ends run in this process
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def touch(items: list[np.ndarray]) -> int:  # reads a byte of every page, as a copy onwards would
        return sum(int(a.reshape(-1)[::4096].sum()) for a in items)

    address = tempfile.mktemp(suffix=".sock")  # noqa: S306 - the listener creates it at once
    server = LinkServer(address, b"probe", {"size": touch}, threads=16)
    rng = np.random.default_rng(0)
    for label, arena in (("socket", None), ("arena", Arena())):
        client = LinkClient(address, b"probe", arena=arena)
        for n in (1, 4):
            items, reps = [rng.integers(0, 256, (300, 451, 3), np.uint8) for _ in range(n)], 1000
            for _ in range(100):
                client.call("size", items)
            cpu, start = cpu_seconds(), time.perf_counter()
            for _ in range(reps):
                client.call("size", items)
            print(f"{label}: {n} x 406 KB per call: {1e3 * (time.perf_counter() - start) / reps:.3f} ms, "
                  f"{1e3 * (cpu_seconds() - cpu) / reps:.3f} ms of CPU (both ends)", flush=True)
        client.close()
    server.close()


def compiled() -> None:
    """A fresh interpreter importing accel from a copy with its bytecode and from one without."""
    import statistics
    import tempfile

    from bench.procs import install_accel

    probe = "import time; t = time.perf_counter(); import accel; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # as in the image: nothing is written at start
    with tempfile.TemporaryDirectory() as tmp:
        copies = {}
        for label, compiler in (("without bytecode", None), ("with bytecode", sys.executable)):
            root = Path(tmp) / label.replace(" ", "-")
            install_accel(root, compiler)  # with bytecode: as the template's Dockerfile does
            copies[label] = root
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in copies}
        for _ in range(20):
            for label, root in copies.items():
                start = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(root)},
                                     capture_output=True, text=True, check=True).stdout
                times[label].append((float(out), time.perf_counter() - start))
        for label, pairs in times.items():
            print(f"{label}: import accel {1e3 * statistics.median(p[0] for p in pairs):.1f} ms, the process "
                  f"{1e3 * statistics.median(p[1] for p in pairs):.1f} ms (medians of {len(pairs)})", flush=True)


def pipeline() -> None:
    """Classify's device pipeline alone (CUDA): ms per batch on one thread, images/s on 2 and 4."""
    import io
    import statistics
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from shim.backends.cuda import CudaBackend
    from shim.padding import padded_sizes
    from shim.modelrepo import ModelRepository

    backend = CudaBackend()
    pipe = backend.image_pipeline(ModelRepository(ROOT / "models").load("efficientnet-lite0"))
    pixels = pipe.prepare(Image.open(io.BytesIO(cat_jpeg())))
    sizes = padded_sizes(32)
    for n in sizes:  # warm-up: each padded size captured, as in the shim
        pipe.logits([pixels] * n)
    # a thread bound as a batcher's is: sessions of its own, captured on it, the batch resized into them
    bound = ThreadPoolExecutor(1, thread_name_prefix="bound", initializer=pipe.bind_thread)
    bound.submit(pipe.logits, [pixels]).result()
    backend.warmed()

    def median_ms(n: int, reps: int = 60) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            pipe.logits([pixels] * n)
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    print("one thread, median ms per logits():", {n: round(median_ms(n), 3) for n in sizes}, flush=True)
    print("a bound thread (a batcher's), median ms per logits():",
          bound.submit(lambda: {n: round(median_ms(n), 3) for n in sizes}).result(), flush=True)
    bound.shutdown()
    for threads in (2, 4):
        done, stop = [0] * threads, time.perf_counter() + 3

        def loop(i: int) -> None:
            while time.perf_counter() < stop:
                pipe.logits([pixels] * 6)
                done[i] += 1

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - start
        print(f"{threads} threads, batches of 6: {sum(done) / wall:.0f} batches/s = {6 * sum(done) / wall:.0f} "
              f"images/s, {1e3 * wall * threads / sum(done):.2f} ms per batch per thread", flush=True)


def parts() -> None:
    """A request worker's CPU per classify and per part of it, the device faked (logits at once)."""
    import io
    import tempfile

    import numpy as np
    from werkzeug.test import EnvironBuilder

    from accel.codec import InferRequest, encode_request
    from accel.tensor import Tensor
    from shim.config import Settings
    from shim.kernels.resample import rgb_pixels
    from shim.ops.classify import top_k_softmax
    from shim.ops.imaging import decode_image
    from shim.workers.front import WorkerConfig, build_front
    from shim.workers.link import LinkServer

    settings = Settings(device="cpu", models_dir=ROOT / "models")
    handlers = faked_device_handlers(settings)
    key = os.urandom(16)
    server = LinkServer(f"{tempfile.mkdtemp()}/link.sock", key, handlers, threads=8)
    front = build_front(WorkerConfig(settings, server.address, key, [], "cuda", {"name": "cpu"}))
    front.load()
    jpeg = cat_jpeg()
    body, headers = encode_request(InferRequest([Tensor.from_bytes_list("image", [jpeg])], parameters={"top_k": 5},
                                                id="x"), binary=True)
    environ = EnvironBuilder(path="/v2/models/classify/infer", method="POST", data=body, headers=headers).get_environ()

    def whole_app() -> None:
        status: list[str] = []
        b"".join(front.app({**environ, "wsgi.input": io.BytesIO(body)}, lambda s, h, e=None: status.append(s)))
        assert status[0].startswith("200"), status

    op = front.registry.lookup("classify")
    image = decode_image(jpeg, "image", 1 << 30)
    pixels = [rgb_pixels(image)]
    logits_1 = np.zeros((1, 1000), np.float32)
    cases = [("the worker's app, one classify (all of what follows and more)", whole_app),
             ("the op's run: decode, batcher, link, top-k", lambda: op.run({"image": np.array([jpeg], dtype=object)},
                                                                           {"top_k": 5})),
             ("decoding the JPEG", lambda: decode_image(jpeg, "image", 1 << 30)),
             ("pixels of the decoded image", lambda: rgb_pixels(image)),
             ("the worker's batcher with the link call", lambda: op.logits(pixels)),
             ("the link call alone (both ends)", lambda: op._pipeline.logits(pixels)),  # noqa: SLF001
             ("top-k softmax", lambda: top_k_softmax(logits_1, 5, op._labels))]  # noqa: SLF001
    for label, case in cases:
        for _ in range(100):
            case()
        n, start = 2000, time.process_time()
        for _ in range(n):
            case()
        print(f"{label}: {1e3 * (time.process_time() - start) / n:.3f} ms of CPU (every thread of this process)",
              flush=True)
    os._exit(0)  # the worker's and the link's threads need no orderly stop here
