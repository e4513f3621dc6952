"""The sockets a shim listens on: TCP, a unix socket and AF_VSOCK, bound before waitress serves them."""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path


def bind_sockets(host: str | None, port: int, unix_path: str | None, *,
                 vsock_port: int | None = None) -> list[socket.socket]:
    """Bound, not yet listening, sockets: TCP (``port`` 0 picks a free one), the unix socket (0660) and
    AF_VSOCK on any CID at ``vsock_port``.

    Raises:
        OSError: a socket cannot be bound; for vsock, also when this kernel or Python has no AF_VSOCK.
    """
    sockets = []
    if host is not None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))
        sockets.append(tcp)
    if unix_path:
        path = Path(unix_path)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(path))
        os.chmod(path, 0o660)
        sockets.append(unix)
    if vsock_port is not None:
        sockets.append(bind_vsock(vsock_port))
    return sockets


def bind_vsock(port: int) -> socket.socket:
    """An AF_VSOCK stream socket bound to (VMADDR_CID_ANY, ``port``): reachable from the host (CID 2) of
    the microVM this runs in, or from the guests of the host this runs on.

    Raises:
        OSError: no AF_VSOCK in this Python or kernel (load ``vsock``/``vmw_vsock_virtio_transport``,
            or run inside a VM with a virtio-vsock device), or the port is taken.
    """
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise OSError(f"--vsock {port}: this Python has no socket.AF_VSOCK (Linux only)")
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(exc.errno, f"--vsock {port}: the kernel has no AF_VSOCK support ({exc.strerror}); "
                                 "inside a microVM the guest needs a virtio-vsock device") from None
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"--vsock {port}: cannot bind AF_VSOCK port {port}: {exc.strerror}") from None
    return sock
