"""The link between request workers and the device process: calls multiplexed over one unix socket
per worker (``multiprocessing.connection``, authenticated with a per-run key).

A worker's request threads ``call`` the device concurrently: each call carries an id, a reader
thread sets each call's Future as its reply comes in (``call_later`` returns that Future: its
callbacks run on the reader, so a batch's requests are answered with no other thread woken).
Messages (``channel.Channel``) are pickles (protocol 5) whose arrays travel out of band: a call's
large buffers are lent through the worker's shared-memory ``Arena`` (the device rebuilds the arrays
on the arena where they lie; the worker frees the slots once the reply is in), the others written
from where they lie and read into the buffers they are rebuilt on (``multiprocessing``'s own framing
reads big messages in many reallocated pieces). On the device side one thread reads every worker's
link (``LinkReader``: the links ready at once in one wake-up) and hands each call to a pool of threads
(a call may wait in a batcher), which replies as each finishes; a ``Deferred`` handler instead starts
its call on that reading thread and the reply goes from whichever thread completes its Future (a
batcher's, as its batch ends): no thread is woken per call. Errors travel as (status, message): the
worker raises the same ``accel.errors`` class, and a lost device stays a ``DeviceLost``.
"""
from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Client, Listener
from typing import Any, Callable

from accel.errors import AccelError, InternalError, NotReady, error_for_status

from ..faults import DeviceLost
from .arena import Arena, Lent, PeerArena
from .channel import Channel, Unencodable
from .link_reader import LinkReader
from .outbox import shut_down

log = logging.getLogger(__name__)

Handler = Callable[..., Any]
_LOST = "device_lost"
HANDSHAKE_S = 30.0  # how long a new link's handshake (the key's challenge, the arena's offer) may take


class Deferred:
    """A handler that answers later: ``fn(*args)`` returns a Future at once (it runs on the thread
    that reads every link, so it must not block) and the reply goes when that Future is done."""

    def __init__(self, fn: Callable[..., "Future[Any]"]) -> None:
        self.fn = fn


class LinkClosed(NotReady):
    """The device process is gone (or going): the call was not answered (503)."""


def _as_reply(exc: BaseException) -> tuple[str, int, str, float | None]:
    if isinstance(exc, AccelError):
        kind = _LOST if isinstance(exc, DeviceLost) else "error"
        return kind, exc.status, exc.message, exc.retry_after
    log.exception("internal error in a device call", exc_info=exc)
    return "error", 500, f"internal error: {type(exc).__name__}: {exc}", None


def _reply_error(kind: str, status: int, message: str, retry_after: float | None) -> AccelError:
    """The error a failed reply stands for (the class the device raised, by status)."""
    if kind == _LOST:
        return DeviceLost(message, retry_after=retry_after)
    return error_for_status(status, message, retry_after)


class _Pending:
    """A call on its way: its Future, and the arena slots its message took (given back once the
    reply is in: by then the device has done with them)."""

    __slots__ = ("future", "lent")

    def __init__(self, future: "Future[Any]") -> None:
        self.future = future
        self.lent: Lent = []


class LinkClient:
    """A worker's end: ``call(method, *args)`` from any thread; ``notify`` sends without a reply."""

    def __init__(self, address: str, authkey: bytes, on_close: Callable[[], None] | None = None,
                 arena: Arena | None = None) -> None:
        """A ``pinned`` arena's kept bytes may be pinned by the device (its CUDA backend then
        uploads arrays from there by DMA): for the link of device calls, not of forwarded requests."""
        self._chan = Channel(Client(address, family="AF_UNIX", authkey=authkey))
        # the arena is used only once the device process has mapped it
        self._arena = arena if self._chan.offer_arena(arena) and arena is not None else None
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._on_close = on_close
        self._reader = threading.Thread(target=self._read, name="link-reader", daemon=True)
        self._reader.start()

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method(*args)`` in the device process and return its result.

        Raises:
            AccelError: what the device raised (same class by status); DeviceLost for a lost device;
                LinkClosed when the device process is gone.
        """
        return self.call_later(method, *args).result()

    def call_later(self, method: str, *args: Any) -> "Future[Any]":
        """``call`` without waiting: the Future is set (its callbacks run) on the link's reader
        thread as the reply comes in, so a callback must not block.

        Raises:
            LinkClosed: the device process is gone (also what the Future holds if it goes meanwhile).
        """
        call_id = next(self._ids)
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        pending = _Pending(future)
        with self._lock:
            if self._closed:
                raise LinkClosed("the shim's device process is gone; retry", retry_after=1.0)
            self._waiting[call_id] = pending
        try:
            lent = self._send((call_id, method, args), self._arena)
        except BaseException:  # not sent (a link that closed has failed the Future already)
            with self._lock:
                self._waiting.pop(call_id, None)
            raise
        with self._lock:
            if call_id in self._waiting:  # the reply's reader gives them back
                pending.lent, lent = lent, []
        if lent and self._arena is not None:  # answered already: the device has done with them
            self._arena.give_back_all(lent)
        return future

    def notify(self, method: str, *args: Any) -> None:
        """Send ``method(*args)`` without waiting (nothing comes back, errors are the device's to log)."""
        self._send((0, method, args))

    def _send(self, message: tuple[int, str, tuple[Any, ...]], arena: Arena | None = None) -> Lent:
        try:
            return self._chan.send(message, arena)
        except (OSError, ValueError) as exc:
            self._close_all()
            raise LinkClosed(f"the shim's device process is gone ({exc}); retry", retry_after=1.0) from None

    def _read(self) -> None:
        try:
            while True:
                call_id, ok, payload = self._chan.recv()
                with self._lock:
                    pending = self._waiting.pop(call_id, None)
                if pending is not None:
                    self._settle(pending, ok, payload)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a garbled message: the link is no longer usable
            log.exception("a reply from the device process could not be read; closing the link")
        self._chan.close()  # here, by the thread that reads it: never under a reader's feet
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting, self._waiting = self._waiting, {}
        try:
            for pending in waiting.values():
                try:
                    self._settle(pending, False, ("error", 503, "the shim's device process is gone; retry", 1.0))
                except Exception:  # noqa: BLE001 - its Future is set all the same; the others go on
                    log.exception("a call's arena slots could not be given back as the link closed")
        finally:
            if self._on_close is not None:
                self._on_close()

    def _settle(self, pending: _Pending, ok: bool, payload: Any) -> None:
        """A call's slots back to the arena, then its Future set (its callbacks run here), whatever
        goes wrong on the way (what did is raised after: the reader closes the link)."""
        try:
            if pending.lent and self._arena is not None:
                self._arena.give_back_all(pending.lent)
        finally:
            pending.lent = []
            if ok:
                pending.future.set_result(payload)
            else:
                try:
                    error: BaseException = _reply_error(*payload)
                except Exception as exc:  # noqa: BLE001 - a garbled error reply
                    error = InternalError(f"an error reply from the device process could not be read: {exc}")
                pending.future.set_exception(error)

    def close(self) -> None:
        shut_down(self._chan.sock)  # the reader wakes up, closes the connection and fails what waits
        self._reader.join(5)


class _NoDeadline(RuntimeError):
    """A link's handshake could not start its deadline's timer (no thread to be had)."""


class _Deadline:
    """Shuts ``sock`` down once ``seconds`` have passed (on a timer's thread), unless ``met`` came first."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._lock = threading.Lock()
        self._settled = False  # met, or expired
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire, (sock,))
        self._timer.name, self._timer.daemon = "link-deadline", True
        self._timer.start()

    def _expire(self, sock: socket.socket) -> None:
        with self._lock:  # (the shutdown too: once ``met`` returns, the socket is the caller's to close)
            if not self._settled:
                self._settled = self._expired = True
                shut_down(sock)

    def met(self) -> bool:
        """Stop the timer: whether it had not expired (once expired, always False)."""
        self._timer.cancel()
        with self._lock:
            self._settled = True
            return not self._expired


class LinkServer:
    """The device's end: accepts workers at ``address`` and runs their calls on ``handlers``.

    A handler's array and bytes arguments may lie in the worker's arena, which the worker reuses once
    the reply is sent: a handler copies what it keeps past its return.

    Args:
        handlers: method name -> function; a call runs ``handlers[method](*args)`` on a pool thread.
        threads: calls that may run (or wait in a batcher) at once, over all workers.
        pin, unpin: pin a worker's arena (the bytes it keeps) as it connects, and unpin it once it
            is gone and no call holds a view of it (``PeerArena``): the CUDA backend's DMA.
        on_fail: called once should the thread that reads the links fail (they are all closed then).
        handshake_s: seconds a new link's handshake may take in all (the key's challenge, the arena's
            offer and its pinning) before it is dropped.
    """

    def __init__(self, address: str, authkey: bytes, handlers: dict[str, Handler], threads: int,
                 pin: Callable[[int, int], None] | None = None, unpin: Callable[[int], None] | None = None,
                 on_fail: Callable[[], None] | None = None, handshake_s: float = HANDSHAKE_S) -> None:
        self.address = address
        self._handlers = handlers
        self._pin, self._unpin = pin, unpin
        # no key here: ``Listener.accept`` would run the challenge on the acceptor's thread, where a peer
        # that stalls in it holds up every link after it; each link's handshake thread runs it instead
        if not handshake_s > 0:
            raise ValueError(f"handshake_s must be above 0, not {handshake_s}")
        self._listener = Listener(address, family="AF_UNIX", backlog=64)
        self._authkey = authkey
        self._handshake_s = handshake_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="link-call")
        self._lock = threading.Lock()  # guards what follows
        self._conns: list[Channel] = []  # links not yet closed
        self._unpinning: list[threading.Thread] = []  # gone workers' arenas being unpinned
        self._closing = False
        self._reader = LinkReader(lambda chan, message: self._dispatch(chan, *message), self._drop, on_fail)
        self._acceptor = threading.Thread(target=self._accept, name="link-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn = self._listener.accept()
            except OSError as exc:  # shut down
                if self._closing:
                    break
                log.warning("refused a request worker connection: %s", exc)
                continue
            chan = Channel(conn)
            with self._lock:
                if self._closing:  # came as it closed: not shut down with the others
                    chan.close()
                    break
                self._conns.append(chan)
            # on a thread of its own: the peer may be slow to answer, and pinning its arena takes a while
            try:
                threading.Thread(target=self._handshake, args=(chan,), name="link-handshake", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: that link goes, the acceptor stays
                log.warning("dropped a request worker's link: no thread for its handshake (%s)", exc)
                self._drop(chan)
        self._listener.close()

    def _handshake(self, chan: Channel) -> None:
        """Open the link (``_open``), then hand it to the reader. A link that fails is dropped, and
        logged (as refused where its peer had not shown the key) unless its peer went or the server
        is closing."""
        opened = False
        try:
            self._open(chan)
            opened = True
        except Exception as exc:  # noqa: BLE001 - that link only
            gone = isinstance(exc, (EOFError, ConnectionError))
            if self._closing:
                pass
            elif isinstance(exc, _NoDeadline):
                log.warning("dropped a request worker's link: %s", exc)
            elif not gone:
                what = "dropped a request worker's link in its handshake" if chan.authenticated else \
                    "refused a request worker connection"
                log.warning("%s: %s: %s", what, type(exc).__name__, exc)
            else:
                log.debug("a request worker's link went in its handshake: %s: %s", type(exc).__name__, exc)
        finally:
            if not opened:  # whatever ended it (a BaseException too): the link and its arena go
                self._drop(chan)
        if opened:
            self._reader.add(chan)

    def _open(self, chan: Channel) -> None:
        """A new link's handshake, all of it within ``handshake_s``: the key's challenge
        (``Channel.authenticate``), then the worker's arena mapped (``Channel.accept_arena``).

        Raises:
            TimeoutError: the handshake took longer (its socket was shut down then: the step's own
                EOFError or OSError is its cause).
            _NoDeadline: no thread for its deadline.
            AuthenticationError, EOFError, OSError, ValueError: as the two steps raise them.
        """
        try:
            deadline = _Deadline(chan.sock, self._handshake_s)
        except RuntimeError as exc:
            raise _NoDeadline(f"no thread for its handshake's deadline ({exc})") from exc
        cause: EOFError | OSError | None = None
        try:
            chan.authenticate(self._authkey)
            chan.accept_arena(self._pin, self._unpin)
        except (EOFError, OSError) as exc:  # what a socket shut down at the deadline raises
            cause = exc
        finally:  # (any other failure goes on as itself)
            in_time = deadline.met()
        if not in_time:
            raise TimeoutError(f"no handshake within {self._handshake_s} s") from cause
        if cause is not None:
            raise cause

    def _drop(self, chan: Channel) -> None:
        """Close a link that was read for the last time, and let go of its worker's arena."""
        try:
            chan.close()
        finally:
            with self._lock:
                self._conns.remove(chan)
            if chan.peer_arena is not None:
                self._let_go(chan.peer_arena)

    def _let_go(self, arena: PeerArena) -> None:
        """Close a gone worker's arena (unmapped once no call of it holds a view); one that is pinned
        on a thread of its own, joined at ``close``: unpinning may wait for CUDA, and every link's reader
        must not."""
        if not arena.pinned:
            arena.close()
            return
        thread = threading.Thread(target=arena.close, name="arena-unpin", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: here, then
            arena.close()
            return
        with self._lock:
            self._unpinning = [t for t in self._unpinning if t.is_alive()] + [thread]

    def _dispatch(self, chan: Channel, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        """Start one call: a Deferred handler here, any other on a pool thread."""
        handler = self._handlers.get(method)
        if not isinstance(handler, Deferred):
            try:
                self._pool.submit(self._run, chan, call_id, method, handler, args)
            except RuntimeError:  # closing: the pool takes no more calls
                stopping = NotReady("the shim's device process is stopping; retry", retry_after=1.0)
                self._reply(chan, call_id, method, False, _as_reply(stopping), wait=False)
            return
        # neither this reader nor the thread that completes the Future (a batcher's) may wait for a
        # worker that is slow to read: their replies are posted
        try:
            future = handler.fn(*args)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            self._reply(chan, call_id, method, False, _as_reply(exc), wait=False)
            return
        future.add_done_callback(lambda done: self._reply(chan, call_id, method, *_outcome(done), wait=False))

    def _run(self, chan: Channel, call_id: int, method: str, handler: Handler | None, args: tuple[Any, ...]) -> None:
        try:
            if handler is None:
                raise InternalError(f"the device process has no method {method!r}")
            ok, payload = True, handler(*args)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            ok, payload = False, _as_reply(exc)
        self._reply(chan, call_id, method, ok, payload)

    @staticmethod
    def _reply(chan: Channel, call_id: int, method: str, ok: bool, payload: Any, wait: bool = True) -> None:
        """Answer a call (a notification's failure is logged instead); ``wait`` as ``send`` takes it."""
        if not call_id:
            if not ok:
                log.warning("notification %s failed: %s", method, payload[2])
            return
        try:
            try:
                chan.send((call_id, ok, payload), wait=wait)
            except Unencodable as exc:  # a result that cannot be pickled: say so
                chan.send((call_id, False, _as_reply(exc)), wait=wait)
        except (OSError, ValueError) as exc:
            log.debug("the reply to %s went nowhere (the worker is gone, its caller with it): %s", method, exc)

    def close(self) -> None:
        """Stop: no more links or calls; each link is closed (its worker's calls not yet answered
        fail there as ``LinkClosed``)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            conns = list(self._conns)
        # shut down, not closed: each thread that reads a socket wakes up and closes it itself (a
        # close under a blocked reader neither wakes it nor tells the peer, and frees the fd number)
        shut_down(self._listener._listener._socket)  # noqa: SLF001 - wakes the thread in accept()
        for chan in conns:
            shut_down(chan.sock)  # a link in its handshake wakes up
        self._reader.close()  # it closes the links it reads
        self._acceptor.join(5)
        deadline = time.monotonic() + 5
        with self._lock:
            unpinning = list(self._unpinning)
        for thread in unpinning:  # before the process (and its CUDA context) may go
            thread.join(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)


def _outcome(future: "Future[Any]") -> tuple[bool, Any]:
    """A done Future as a reply: (True, its result) or (False, its error as the wire carries it)."""
    exc = future.exception()
    return (False, _as_reply(exc)) if exc is not None else (True, future.result())
