"""Probe on any machine: a request worker's front (``build_front``: waitress, Flask, the guard, the
codec, the JPEG decode, the worker's batcher and its link) served by the shim's ``Server`` on a unix
socket, its device answered at once by a forked process (``logits`` made up: no model runs), C
clients classifying the cat photo in separate processes for S seconds. Prints requests/s, latency
and the worker's CPU per request: the request path's own cost, without a GPU.

    python bench/front_probe.py [C] [S] [shim|threads|plain] [gpu-jpeg]   # default 4 clients, 8 s, shim

``gpu-jpeg``: the faked device says it decodes plain JPEGs (``--gpu-jpeg``), so the worker sends the
cat's JPEG as it came instead of decoding it: the worker's side of that change.

``shim`` is the shim's Server with ``--no-connection-threads`` (waitress's event loop reads each
request, a task thread serves it), ``threads`` with its default ``--connection-threads``.

``plain`` serves the same app with ``serve_plain`` instead, a bare thread-per-connection HTTP/1.1
loop: a bound on what a worker would gain without waitress's event loop (no limits, timeouts,
chunked bodies, drain or accept gate; measurement only, never a server to run).
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT  # noqa: E402
from bench.loop import process_closed_loop  # noqa: E402
from bench.procs import cat_jpeg  # noqa: E402


def faked_device_handlers(settings: Any, gpu_jpeg: bool = False) -> dict[str, Any]:
    """The device process's link handlers on the CPU, but classify's pixels are answered at once
    (fixed random logits, untied as a model's are: all-zero logits tie every class, which sent top-k
    down a path no model's logits take) and reported as a GPU pipeline's, so the worker sends raw
    pixels as in front of a GPU (``gpu_jpeg``: plain JPEGs as they came, as to ``--gpu-jpeg``'s)."""
    import numpy as np

    from shim.service import build_service
    from shim.workers.device import DeviceEndpoint
    from shim.workers.link import Deferred

    device = build_service(settings)
    device.load()
    handlers = DeviceEndpoint(device, workers=1).handlers()
    handlers["pipeline_device"] = lambda model: "cuda"
    handlers["pipeline_decodes_jpeg"] = lambda model: gpu_jpeg

    made_up = np.random.default_rng(0).normal(size=(64, 1000)).astype(np.float32)

    def logits(model: str, items: list) -> Future:
        done: Future = Future()
        done.set_result(made_up[np.arange(len(items)) % len(made_up)])
        return done

    handlers["logits"] = Deferred(logits)
    return handlers


def _serve_device(settings: Any, address: str, key: bytes, gpu_jpeg: bool) -> tuple[int, int]:
    """A forked process serving the faked device at ``address`` until this one exits; its pid and the
    read end of a pipe that says it is ready."""
    ready_r, ready_w = os.pipe()
    alive_r, alive_w = os.pipe()  # its read end sees EOF once this process is gone
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(alive_w)
        from shim.workers.link import LinkServer

        LinkServer(address, key, faked_device_handlers(settings, gpu_jpeg), threads=8)
        os.write(ready_w, b"1")
        os.read(alive_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(alive_r)
    return pid, ready_r


def serve_plain(app: Any, sock: socket.socket) -> None:
    """``app`` on ``sock``, one thread per connection reading requests with a Content-Length (or
    none) and writing each response whole from that thread (measurement only)."""
    import io

    def connection(conn: socket.socket) -> None:
        stream = conn.makefile("rb")
        with conn:
            while line := stream.readline():
                method, target, _ = line.decode("latin-1").split(" ", 2)
                path, _, query = target.partition("?")
                environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "probe",
                           "SERVER_PORT": "0", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                           "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
                           "wsgi.run_once": False, "wsgi.version": (1, 0), "REMOTE_ADDR": "probe"}
                while (header := stream.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    key = name.strip().upper().replace("-", "_")
                    environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value.strip()
                length = int(environ.get("CONTENT_LENGTH") or 0)
                environ["wsgi.input"] = io.BytesIO(stream.read(length) if length else b"")
                started: list[tuple[str, list[tuple[str, str]]]] = []
                body = b"".join(app(environ, lambda status, headers, exc_info=None: started.append((status, headers))))
                status, headers = started[0]
                head = "".join(f"{k}: {v}\r\n" for k, v in headers if k.lower() != "content-length")
                conn.sendall(f"HTTP/1.1 {status}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body)

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=connection, args=(conn,), daemon=True).start()


def main(clients: int = 4, seconds: float = 8.0, server: str = "shim", gpu_jpeg: bool = False) -> None:
    from shim.config import Settings
    from shim.server.serving import Server
    from shim.workers.front import WorkerConfig, build_front

    settings = Settings(device="cpu", models_dir=ROOT / "models", connection_threads=server == "threads")
    work = tempfile.mkdtemp(prefix="front-probe-")
    key = os.urandom(16)
    _pid, ready = _serve_device(settings, f"{work}/link.sock", key, gpu_jpeg)
    if os.read(ready, 1) != b"1":
        raise RuntimeError("the faked device did not start")
    front = build_front(WorkerConfig(settings, f"{work}/link.sock", key, [], "cuda", {"name": "cpu"}))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"{work}/front.sock")
    sock.listen(64)
    url, jpeg = f"unix://{work}/front.sock", cat_jpeg()

    def drive() -> None:
        try:
            while not front.registry.is_ready():
                time.sleep(0.1)
            process_closed_loop(("accel", url), jpeg, clients, 2.0, clients)  # warm
            before = resource.getrusage(resource.RUSAGE_SELF)
            out = process_closed_loop(("accel", url), jpeg, clients, seconds, clients)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            requests = out["images_per_s"] * seconds
            print(f"front probe ({server}{', gpu-jpeg' if gpu_jpeg else ''}), {clients} clients, {seconds:.0f} s: {out['images_per_s']:.1f} requests/s, "
                  f"p50 {out.get('p50_ms', 0):.2f} p99 {out.get('p99_ms', 0):.2f} ms, errors {out['errors']}; "
                  f"the worker {1e3 * cpu / max(requests, 1):.3f} ms of CPU per request "
                  f"({cpu / seconds:.2f} cores while the clients ran)", flush=True)
        finally:
            os.kill(os.getpid(), signal.SIGKILL if server == "plain" else signal.SIGTERM)

    threading.Thread(target=drive, name="probe", daemon=True).start()
    if server == "plain":
        threading.Thread(target=front.load, name="warmup", daemon=True).start()
        serve_plain(front.app, sock)
    Server(front, [sock]).run()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4, float(sys.argv[2]) if len(sys.argv) > 2 else 8.0,
         sys.argv[3] if len(sys.argv) > 3 else "shim", sys.argv[4:5] == ["gpu-jpeg"])
