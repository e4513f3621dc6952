"""Request workers (``accelshim serve --workers N``): N processes in front of the one device process.

One Python process tops out at a few hundred requests per second: HTTP parsing, decoding and every
op's CPU work share one interpreter lock. With workers, N processes accept on the public sockets
and do that work in parallel; the device process keeps the GPU, the models, the dynamic batchers
(which mix the calls of every worker; each worker batches the requests it decodes at once into one
call) and all shared state (shared memory regions, the KaaS store, metrics, statistics), and runs
the requests that need that state through its own app, forwarded by the workers over the link.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile

from ..service import Service
from .balance import ConnectionBoard
from .device import DeviceEndpoint
from .front import WorkerConfig
from .link import LinkServer
from .pool import WorkerPool

log = logging.getLogger(__name__)


def serve_with_workers(service: Service, sockets: list[socket.socket]) -> int:
    """Serve ``sockets`` with ``service.settings.workers`` request workers until SIGTERM; the exit code."""
    from ..server.binding import bind_sockets  # noqa: PLC0415
    from ..server.serving import Server  # noqa: PLC0415 - waitress, once serving

    settings = service.settings
    with tempfile.TemporaryDirectory(prefix="accelshim-") as private:  # 0700: this user alone
        device_path, link_path = os.path.join(private, "device.sock"), os.path.join(private, "link.sock")
        internal = bind_sockets(None, 0, device_path)  # the device process's own server: it runs the
        # process (warm-up, signals, draining); the workers reach its app over the link instead
        endpoint = DeviceEndpoint(service, settings.workers)
        authkey = os.urandom(32)
        for sock in sockets:
            sock.listen(1024)
        description = service.backend.describe()
        board = ConnectionBoard(settings.workers)  # least-connections accepting (``balance``)
        service.metrics.registry.register(board)
        config = WorkerConfig(settings, link_path, authkey, [s.fileno() for s in sockets],
                              service.backend.name, description, board.fd)
        pool = WorkerPool(settings.workers, config, endpoint.worker_gone, board)
        server = Server(service, internal, before_drain=pool.stop)
        backend = service.backend  # the workers' arenas pinned for DMA (the CUDA backend's; the CPU's ignores it)
        # without its links' reader the device process serves nobody: it exits, for its supervisor to restart it
        link = LinkServer(link_path, authkey, endpoint.handlers(),
                          threads=settings.workers * (settings.threads + settings.max_queue),
                          pin=lambda address, nbytes: backend.register_host(address, nbytes, now=True),
                          unpin=backend.unregister_host, on_fail=server.fail)
        try:
            pool.start()
            log.info("%d request workers serving %s", settings.workers, " ".join(Server.describe_sockets(sockets)))
            return server.run()
        finally:
            pool.stop()
            link.close()
            for sock in sockets:
                if sock.family == socket.AF_UNIX:
                    _unlink(sock.getsockname())
                sock.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
