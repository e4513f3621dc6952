"""The device process's share of a classify call on the link, without a device: CPU per call.

    python bench/link_device_probe.py [ROUNDS] [THREADS]   # default 3 rounds of 4 s, 8 client threads

A ``LinkServer`` in a process of its own answers ``logits`` as the device process does once warm (a
``Deferred`` handler, here answering at once with one row of 1000 FP32 logits per image); this process
sends calls from THREADS threads over 4 links with arenas, as 4 request workers with ``--gpu-jpeg``
would (one ``PlainJpeg`` of the chelsea photo each, its 35 KB lent through the arena). Printed per round: calls
a second and the server process's CPU per call (user and system, from /proc). On the GPU machine the
device process spends this per request beside its batches' work, all of it under one interpreter
lock: each 0.01 ms per call is about 0.1 ms of a batch of 10's cycle. A lower bound: the real
handler hands each call to a batcher thread and its reply comes from the landing's thread, which
this one does not (its Future is done at once, the reply goes from the reader). Needs scikit-image
(``make test``'s .venv has it).

Each round runs twice, in the other order each round: the shim's ``LinkServer`` (one thread reading
every link, ``LinkReader``: it waits on all the links' sockets at once and takes the messages that
came whole with ``Channel.take_ready``) and ``ThreadPerLinkServer``, the shim's reading before it (a
thread per link, blocked in its socket read).
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = 1000
LINKS = 4


def _thread_per_link_server() -> type:
    """``LinkServer`` as it read before ``LinkReader``: a thread per link, blocked in its socket read."""
    from shim.workers.channel import Channel
    from shim.workers.link import LinkServer

    class ThreadPerLinkServer(LinkServer):
        def _handshake(self, chan: Channel) -> None:
            try:
                self._open(chan)
                while True:
                    self._dispatch(chan, *chan.recv())
            except (EOFError, OSError):
                pass
            finally:
                self._drop(chan)

    return ThreadPerLinkServer


def _serve(address: str, ready: Any, stop: Any, selector: bool = True) -> None:
    from concurrent.futures import Future

    from shim.workers.link import Deferred, LinkServer

    row = np.random.default_rng(0).standard_normal((1, CLASSES)).astype(np.float32)

    def logits(_model: str, items: list[Any]) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        future.set_result(np.repeat(row, len(items), axis=0))
        return future

    server = (LinkServer if selector else _thread_per_link_server())(address, b"probe",
                                                                {"logits": Deferred(logits)}, threads=4)
    ready.set()
    stop.wait()
    server.close()


def one_round(seconds: float, threads: int, selector: bool = True) -> str:
    from bench.procs import cat_jpeg, cpu_times, run_threads
    from shim.backends.base import PlainJpeg
    from shim.ops.jpeg import plain_jpeg_shape
    from shim.workers.arena import Arena
    from shim.workers.link import LinkClient

    jpeg = cat_jpeg()
    item = [PlainJpeg(jpeg, plain_jpeg_shape(jpeg, 1 << 30))]
    address = tempfile.mktemp(suffix=".sock")  # noqa: S306 - the listener creates it at once
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=_serve, args=(address, ready, stop, selector), daemon=True)
    server.start()
    arenas: list[Arena] = []
    clients: list[LinkClient] = []
    try:
        if not ready.wait(30):
            raise RuntimeError("the probe's link server did not start within 30 s")
        for _ in range(LINKS):
            arenas.append(Arena())
            clients.append(LinkClient(address, b"probe", arena=arenas[-1]))
        for client in clients:
            client.call("logits", "m", item)
        calls, done = [0] * threads, threading.Event()

        def loop(index: int) -> None:
            client = clients[index % LINKS]
            while not done.is_set():
                client.call("logits", "m", item)
                calls[index] += 1

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        (user0, sys0), began = cpu_times(server.pid), time.perf_counter()
        run_threads(workers, seconds, done)
        (user1, sys1), wall = cpu_times(server.pid), time.perf_counter() - began
    finally:
        for client in clients:
            client.close()
        for arena in arenas:
            arena.close()
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()
    n = sum(calls)
    user, system = user1 - user0, sys1 - sys0
    return (f"{'one selector thread' if selector else 'a thread per link  '}, {threads} threads on {LINKS} links: "
            f"{n / wall:.0f} calls/s; the server's CPU per call "
            f"{1e3 * (user + system) / n:.4f} ms (user {1e3 * user / n:.4f}, system {1e3 * system / n:.4f}), "
            f"{(user + system) / wall:.2f} cores")


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    for index in range(rounds):  # the order swapped each round (A B, B A, ...): neither always goes first
        for selector in ((False, True), (True, False))[index % 2]:
            print(one_round(4.0, threads, selector), flush=True)
