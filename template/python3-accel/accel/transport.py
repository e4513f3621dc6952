"""HTTP/1.1 transports on bare sockets: TCP, unix and vsock, kept alive, one connection per thread.

Why not ``http.client``: it imports ``email.parser`` and ``ssl``, ~35 ms of every function's cold
start, for features (folding, trailers, TLS) that a call to a local shim never uses. This speaks the
subset the shim needs: Content-Length and chunked bodies, keep-alive, ``Connection: close``.
"""
from __future__ import annotations

import select
import socket
import threading

from .errors import InvalidInput

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, Mapping, Protocol

    class Transport(Protocol):
        """Sends one request, returns the whole response; raises OSError when unreachable."""

        def request(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str],
                    timeout: float) -> "Response": ...

        def close(self) -> None: ...

_MAX_LINE = 65536
_MAX_HEADERS = 100


class Response:
    """A whole HTTP response; header names are lower-cased."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class ProtocolError(ConnectionError):
    """The peer's bytes are not HTTP/1.1 as expected (also: it closed a kept-alive connection)."""


_USAGE = "use http://host:port, unix:///path.sock or vsock://CID:PORT"
_VSOCK_MAX = 0xFFFFFFFF  # CIDs and ports are u32; -1 (VMADDR_CID_ANY / VMADDR_PORT_ANY) is no peer


def parse_url(url: str) -> tuple[str, str, int]:
    """``(scheme, host or socket path or CID, port)`` for ``http://host:port``, ``unix:///path`` or
    ``vsock://CID:PORT`` (CID 2 is the host of a microVM; the CID is returned as a decimal string).

    Raises:
        InvalidInput: not one of those forms, or a port or CID out of range.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidInput(f"invalid shim URL {url!r}: {_USAGE}")
    if scheme == "vsock":
        return scheme, *_parse_vsock(url, rest)
    if scheme == "unix":
        if not rest:
            raise InvalidInput(f"unix URL {url!r} names no socket path")
        return scheme, rest, 0
    if scheme == "http":
        netloc = rest.split("/", 1)[0]
        host, _, port = netloc.rpartition(":") if netloc.rsplit("]", 1)[-1].count(":") else (netloc, "", "80")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInput(f"invalid shim URL {url!r}: use http://host:port")
        return scheme, host, int(port)
    raise InvalidInput(f"unsupported shim URL {url!r}: {_USAGE}")


def _parse_vsock(url: str, rest: str) -> tuple[str, int]:
    cid, sep, port = rest.rstrip("/").partition(":")
    if not sep or not cid.isdigit() or not port.isdigit():
        raise InvalidInput(f"invalid vsock URL {url!r}: use vsock://CID:PORT with decimal numbers "
                           "(CID 2 is the host of a microVM)")
    if int(cid) >= _VSOCK_MAX or not 0 < int(port) < _VSOCK_MAX:
        raise InvalidInput(f"invalid vsock URL {url!r}: CID and port are 32-bit (CID 0 to {_VSOCK_MAX - 1}, "
                           f"port 1 to {_VSOCK_MAX - 1})")
    return str(int(cid)), int(port)


class Connection:
    """One kept-alive HTTP/1.1 connection."""

    def __init__(self, connect: "Callable[[float], socket.socket]", host: str) -> None:
        self._connect = connect
        self._host = host
        self.sock: socket.socket | None = None
        self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self._file = None

    def request(self, method: str, path: str, body: bytes | None, headers: "Mapping[str, str]",
                timeout: float) -> Response:
        if self.sock is None:
            self.sock = self._connect(timeout)
            self._file = self.sock.makefile("rb")
        self.sock.settimeout(timeout)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            if body and len(body) > 65536:
                self.sock.sendall(head)
                self.sock.sendall(body)
            else:
                self.sock.sendall(head + (body or b""))
        except (BrokenPipeError, ConnectionResetError):
            # The shim may answer before the body is all sent (413: too large) and close; its answer
            # is then already in our receive buffer and says more than the broken pipe does.
            try:
                early = self._read_response(method)
            except OSError:
                early = None
            if early is None or early.status < 400:
                raise
            self.close()
            return early
        return self._read_response(method)

    def _line(self) -> bytes:
        line = self._file.readline(_MAX_LINE + 1)  # type: ignore[union-attr]
        if len(line) > _MAX_LINE:
            raise ProtocolError("HTTP line too long")
        return line

    def _read_response(self, method: str) -> Response:
        status_line = self._line()
        if not status_line:
            raise ProtocolError("the shim closed the connection")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            line = self._line()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        else:
            raise ProtocolError("too many response headers")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked()
        elif "content-length" in headers:
            n = int(headers["content-length"])
            body = self._file.read(n)  # type: ignore[union-attr]
            if len(body) != n:
                raise ProtocolError("the shim closed the connection mid-body")
        else:
            body = self._file.read()  # type: ignore[union-attr]
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, headers, body)

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self._line().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self._file.read(size))  # type: ignore[union-attr]
            self._line()


class HTTPTransport:
    """Kept-alive HTTP connections to one shim, one connection per calling thread.

    Args:
        url: ``http://host:port``, ``unix:///path/to.sock`` or ``vsock://CID:PORT``.

    Raises:
        InvalidInput: a malformed URL, or ``vsock://`` where Python has no ``socket.AF_VSOCK``.
    """

    def __init__(self, url: str) -> None:
        scheme, where, port = parse_url(url)
        self.url = url
        if scheme == "unix":
            self._connect = lambda timeout: _open(socket.AF_UNIX, where, timeout)
            self._host = "localhost"
        elif scheme == "vsock":
            family = getattr(socket, "AF_VSOCK", None)
            if family is None:
                raise InvalidInput(f"{url!r}: this Python has no socket.AF_VSOCK (vsock needs Linux)")
            self._connect = lambda timeout: _open(family, (int(where), port), timeout)
            self._host = "localhost"
        else:
            self._connect = lambda timeout: _open_tcp(where, port, timeout)
            self._host = f"[{where}]:{port}" if ":" in where else f"{where}:{port}"
        self._local = threading.local()
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Connection(self._connect, self._host)
            with self._lock:
                self._all.append(conn)
        return conn

    def request(self, method: str, path: str, body: bytes | None, headers: "Mapping[str, str]",
                timeout: float) -> Response:
        conn = self._connection()
        if conn.sock is not None and _dropped(conn.sock):
            conn.close()  # the shim closed this kept-alive connection while it was idle: a fresh one
        reused = conn.sock is not None
        try:
            return conn.request(method, path, body, headers, timeout)
        except OSError as exc:
            conn.close()
            # A broken pipe on a kept-alive connection means the request never got through whole, so
            # the shim cannot have run it: once more at once on a fresh connection. A connection cut
            # after the request went out (it may have run) goes to the caller, who retries only
            # what is safe to run twice.
            if reused and isinstance(exc, BrokenPipeError):
                try:
                    return conn.request(method, path, body, headers, timeout)
                except OSError:
                    conn.close()
                    raise
            raise

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection was closed by the peer (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _open(family: int, address: object, timeout: float) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def _open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
