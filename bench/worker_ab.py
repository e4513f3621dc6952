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
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, ShimProcess  # noqa: E402
from bench.front_probe import faked_device_handlers  # noqa: E402
from bench.loop import process_closed_loop  # noqa: E402
from bench.procs import cat_jpeg, cpu_times  # noqa: E402


def _device() -> str:
    """The device of a probe's shim: ``PROBE_DEVICE`` (cpu on a machine without a GPU), else cuda."""
    return os.environ.get("PROBE_DEVICE", "cuda")


def quantiles(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {1e3 * xs[len(xs) // 2]:.2f} p99 {1e3 * xs[int(len(xs) * 0.99)]:.2f} ms"


def throughput(label: str) -> None:
    jpeg = cat_jpeg()
    with ShimProcess("cuda", ROOT / "models", workers=8) as shim:
        process_closed_loop(("accel", shim.unix_url), jpeg, 32, 2.0, 16)  # warm
        for clients in (1, 32, 128):
            out = process_closed_loop(("accel", shim.unix_url), jpeg, clients, 5.0, min(clients, 16))
            print(label, clients, f"{out['images_per_s']:.0f} img/s p50 {out.get('p50_ms', 0):.1f} "
                  f"p99 {out.get('p99_ms', 0):.1f}", "errors", out["errors"], flush=True)


def latency(label: str, workers: int) -> None:
    import accel

    jpeg, n = cat_jpeg(), 1024
    with ShimProcess(_device(), ROOT / "models", workers=workers) as shim:
        client = accel.Client(shim.unix_url)
        for _ in range(50):
            client.classify(jpeg)
        times = []
        for _ in range(400):
            t = time.perf_counter()
            client.classify(jpeg)
            times.append(time.perf_counter() - t)
        print(label, "classify b1", quantiles(times), flush=True)
        register, first, second = [], [], []
        for i in range(5):
            with accel.SharedMemory(f"probe{i}", 3 * n * n * 4 + 4096) as region:
                a, b = region.tensor("A", (n, n)), region.tensor("B", (n, n))
                a.raw[:], b.raw[:] = bytes(n * n * 4), bytes(n * n * 4)
                t0 = time.perf_counter()
                client.register_shm(region.name, region.key, region.byte_size)
                t1 = time.perf_counter()
                client.gemm(a, b, shm=region)
                t2 = time.perf_counter()
                client.gemm(a, b, shm=region)
                t3 = time.perf_counter()
                register.append(t1 - t0), first.append(t2 - t1), second.append(t3 - t2)
                client.unregister_shm(region.name)
                del a, b
        print(label, "register 12MiB ms", [round(1e3 * x, 2) for x in register], "first gemm",
              [round(1e3 * x, 2) for x in first], "second", [round(1e3 * x, 2) for x in second], flush=True)


def _cpu_seconds(pid: int | str) -> float:
    return sum(cpu_times(pid))


def _busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def cpu(workers: int, clients: int, flags: list[str], shims: int = 1) -> None:
    """``shims`` shims (each its own device process with ``workers`` request workers, on the one GPU),
    the client processes spread over them in turn: the rate, and the cores each process kind keeps busy."""
    import contextlib

    if shims < 1 or workers < 1:
        sys.exit("cpu/replicas: at least one shim and one worker")
    jpeg, seconds = cat_jpeg(), 6.0
    with contextlib.ExitStack() as stack:
        started = [ShimProcess(_device(), ROOT / "models", *flags, workers=workers) for _ in range(shims)]
        for shim in started:  # all start at once, then each is waited for
            shim.launch()
            stack.callback(shim.__exit__)
        for shim in started:
            shim.wait_ready()
        urls = [("accel", shim.unix_url) for shim in started]
        devices = [shim.proc.pid for shim in started]
        kids = [pid for device in devices for pid in subprocess.run(
            ["pgrep", "-P", str(device)], capture_output=True, text=True).stdout.split()]
        process_closed_loop(urls, jpeg, clients, 2.0, min(clients, 16))  # warm
        before = [*map(_cpu_seconds, devices), *map(_cpu_seconds, kids)], _busy_seconds(), time.monotonic()
        out = process_closed_loop(urls, jpeg, clients, seconds, min(clients, 16))
        after = [*map(_cpu_seconds, devices), *map(_cpu_seconds, kids)], _busy_seconds(), time.monotonic()
    wall, images = after[2] - before[2], out["images_per_s"] * seconds
    used = [a - b for a, b in zip(after[0], before[0])]
    device, workers_used = used[:shims], used[shims:]
    rest = after[1] - before[1] - sum(used)
    per_shim = [sum(out["threads_per_process"][k::shims]) for k in range(shims)]  # process p calls shim p % K
    print(f"{f'shims={shims} (clients {per_shim}) ' if shims > 1 else ''}workers={workers} clients={clients} "
          f"{' '.join(flags)}: "
          f"{out['images_per_s']:.0f} img/s, p50 {out.get('p50_ms', 0):.1f} p99 {out.get('p99_ms', 0):.1f} ms, "
          f"errors {out['errors']}")
    print(f"  cores busy: device {' + '.join(f'{u / wall:.2f}' for u in device)}, workers "
          f"{sum(workers_used) / wall:.2f} ({', '.join(f'{u / wall:.2f}' for u in workers_used)}), rest {rest / wall:.2f}")
    print(f"  CPU ms per image: device {1e3 * sum(device) / images:.2f}, workers {1e3 * sum(workers_used) / images:.2f}, "
          f"rest {1e3 * rest / images:.2f}", flush=True)


def spy(workers: int, clients: int, flags: list[str]) -> None:
    import re
    import shutil
    import threading

    spy_bin = os.environ.get("PYSPY") or shutil.which("py-spy") or sys.exit("py-spy: not found (PYSPY=...)")
    out_dir, jpeg, seconds, ramp = Path(os.environ.get("SPY_OUT", ".")), cat_jpeg(), 6, 2.0
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", " ".join(flags)).strip("-") or "plain"
    with ShimProcess(_device(), ROOT / "models", *flags, workers=workers) as shim:
        process_closed_loop(("accel", shim.unix_url), jpeg, clients, 2.0, min(clients, 16))  # warm
        for mode in os.environ.get("SPY_MODES", "gil").split():
            path = out_dir / f"spy-{tag}-{clients}-{mode}.txt"
            # C frames too (a blocked read shows as one), which py-spy reads only pausing the process
            native = ["--native"] if os.environ.get("SPY_NATIVE") else ["--nonblocking"]
            command = [spy_bin, "record", "--pid", str(shim.proc.pid), "--rate", "400", "--duration", str(seconds),
                       *native, "--format", "raw", "--output", str(path), "--threads", f"--{mode}"]
            started: list[subprocess.Popen[str]] = []
            # recorded once the clients' processes are up and sending, within the load's window
            timer = threading.Timer(ramp, lambda: started.append(subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
            timer.start()
            out = process_closed_loop(("accel", shim.unix_url), jpeg, clients, ramp + seconds + 1.0, min(clients, 16))
            timer.join()
            recorder = started[0]
            try:
                _, err = recorder.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # --idle hung py-spy on the H200's device process: what it wrote stays
                recorder.kill()
                _, err = recorder.communicate()
                err = f"killed after 30 s; {err}"
            print(f"spy {mode} workers={workers} clients={clients} {' '.join(flags)}: "
                  f"{out['images_per_s']:.0f} img/s, py-spy rc {recorder.returncode} {err.strip()[-300:]}", flush=True)


def stages(workers: int, clients: int, flags: list[str]) -> None:
    import glob
    import json
    import tempfile

    def totals(folder: str) -> dict[tuple[str, str], list[float]]:
        """(role, what) -> summed [calls, wall, cpu, rows]; (role, "thread " + name) -> [CPU s];
        (role, "lag") -> [wakes, overshoot s, largest overshoot s]."""
        out: dict[tuple[str, str], list[float]] = {}
        for path in glob.glob(f"{folder}/stage-*.json"):
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except ValueError:  # being replaced: the next dump is half a second away
                continue
            role = "device" if "serve" in data["argv"] else "worker"
            for what, t in data["totals"].items():
                row = out.setdefault((role, what), [0, 0.0, 0.0, 0])
                for i in range(4):
                    row[i] += t[i]
            for name, cpu in data["threads"].items():
                out.setdefault((role, "thread " + name), [0.0])[0] += cpu
            lag = out.setdefault((role, "lag"), [0, 0.0, 0.0])
            lag[0], lag[1], lag[2] = lag[0] + data["lag"][0], lag[1] + data["lag"][1], max(lag[2], data["lag"][2])
        return out

    jpeg, seconds = cat_jpeg(), 6.0
    with tempfile.TemporaryDirectory() as folder:
        os.environ["STAGE_OUT"] = folder
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "bench" / "stage_timer"), *filter(None, [os.environ.get("PYTHONPATH")])])
        with ShimProcess(_device(), ROOT / "models", *flags, workers=workers) as shim:
            process_closed_loop(("accel", shim.unix_url), jpeg, clients, 2.0, min(clients, 16))  # warm
            time.sleep(0.7)  # every process has dumped what the warm-up did
            before = totals(folder)
            out = process_closed_loop(("accel", shim.unix_url), jpeg, clients, seconds, min(clients, 16))
            time.sleep(0.7)
            after = totals(folder)
    print(f"workers={workers} clients={clients} {' '.join(flags)}: {out['images_per_s']:.0f} img/s, p50 {out.get('p50_ms', 0):.1f} "
          f"p99 {out.get('p99_ms', 0):.1f} ms; per call: wall ms, the calling thread's CPU ms (rows per call)")
    window = seconds + 1.4  # the dumps bracket the clients' window with 0.7 s each side
    for (role, what), t in sorted(after.items()):
        delta = [a - b for a, b in zip(t, before.get((role, what), [0] * len(t)))]
        if what.startswith("thread "):
            if delta[0] > 0.01 * window:
                print(f"  {role:6s} {what:42s} cores busy {delta[0] / window:5.2f}")
        elif what == "lag":
            if delta[0]:
                print(f"  {role:6s} a 2 ms sleep wakes late by {1e3 * delta[1] / delta[0]:.3f} ms on average "
                      f"(largest since start {1e3 * t[2]:.2f})")
        elif delta[0]:
            calls, wall, cpu, rows = delta
            print(f"  {role:6s} {what:42s} {calls:6.0f} calls  wall {1e3 * wall / calls:7.3f}  "
                  f"cpu {1e3 * cpu / calls:7.3f}" + (f"  ({rows / calls:.2f} rows)" if rows else ""), flush=True)


def link() -> None:
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


def first(workers: int) -> None:
    """A function's first gemm through a fresh 12 MiB region, registered on the way (one request) and
    the standard way (a register request, then the gemm): ms from making the region to the result,
    filling A and B left out, as in the cold-start benchmark."""
    import statistics

    import accel

    n = 1024
    with ShimProcess(_device(), ROOT / "models", workers=workers) as shim:
        client = accel.Client(shim.unix_url)
        for _ in range(50):
            client.noop()
        times: dict[str, list[float]] = {"on the way": [], "register first": []}
        for i in range(12):
            for how, xs in times.items():
                t0 = time.perf_counter()
                region = accel.SharedMemory(f"first{i}{how[0]}", 3 * n * n * 4 + 4096)
                a, b = region.tensor("A", (n, n)), region.tensor("B", (n, n))
                t1 = time.perf_counter()
                a.raw[:], b.raw[:] = bytes(n * n * 4), bytes(n * n * 4)
                t2 = time.perf_counter()
                if how == "register first":
                    client.register_shm(region.name, region.key, region.byte_size)
                c = client.gemm(a, b, shm=region)
                xs.append(1e3 * (t1 - t0 + time.perf_counter() - t2))
                client.unregister_shm(region.name)
                del a, b, c
                region.close()
        for how, xs in times.items():
            print(f"workers={workers} first call, {how}: median {statistics.median(xs):.2f} ms, all "
                  f"{[round(x, 2) for x in xs]}", flush=True)


def region() -> None:
    """Three gemms through a fresh 12 MiB region in this process, with the shim's own hooks (the
    prefault and the backend's pin): ms each, as the shim does it, without the prefault, and with the
    pin waited for before the first."""
    import statistics

    import numpy as np

    import accel
    from shim.backends import select_backend
    from shim.config import Settings
    from shim.service import build_shm

    backend = select_backend(_device())
    n, nbytes = 1024, 1024 * 1024 * 4
    rng = np.random.default_rng(0)
    a0, b0 = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    variants = {"as the shim does": 4, "no prefault": 0, "pinned before the first": 4}
    results: dict[str, list[list[float]]] = {v: [] for v in variants}
    for i in range(5):
        for variant, threads in variants.items():
            shm = build_shm(Settings(shm_prefault_threads=threads), backend)
            assert shm is not None
            made = accel.SharedMemory(f"region{i}", 3 * nbytes + 4096)
            made.view(0, nbytes)[:], made.view(nbytes, nbytes)[:] = a0.tobytes(), b0.tobytes()
            mapping = shm.register("r", made.key, 0, made.byte_size, "t")
            if variant == "pinned before the first" and hasattr(backend, "pinned"):
                backend.pinned.wait(mapping.address)
            views = [np.frombuffer(shm.view(mapping, k * nbytes, nbytes, "x"), np.float32).reshape(n, n)
                     for k in range(3)]
            times = []
            for _ in range(3):
                t = time.perf_counter()
                backend.gemm(views[0], views[1], None, 1.0, 0.0, out=views[2])
                times.append(1e3 * (time.perf_counter() - t))
            results[variant].append(times)
            del views
            shm.close()
            made.close()
    for variant, runs in results.items():
        print(f"{variant}: gemm 1, 2, 3 (medians of {len(runs)}):",
              [round(statistics.median(r[k] for r in runs), 2) for k in range(3)], "ms", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["throughput"]:
        throughput(sys.argv[2])
    elif sys.argv[1:2] == ["latency"]:
        latency(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["stages"]:
        stages(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1:2] == ["link"]:
        link()
    elif sys.argv[1:2] == ["compiled"]:
        compiled()
    elif sys.argv[1:2] == ["pipeline"]:
        pipeline()
    elif sys.argv[1:2] == ["parts"]:
        parts()
    elif sys.argv[1:2] == ["first"]:
        first(int(sys.argv[2]))
    elif sys.argv[1:2] == ["region"]:
        region()
    elif sys.argv[1:2] == ["spy"]:
        spy(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1:2] == ["cpu"]:
        cpu(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    elif sys.argv[1:2] == ["replicas"]:
        cpu(int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:], shims=int(sys.argv[2]))
    else:
        sys.exit(__doc__)
