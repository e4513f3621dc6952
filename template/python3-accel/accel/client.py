"""``accel.Client``: the semantic API that functions call; the shim does the work."""
from __future__ import annotations

import contextvars
import json
import os
import time

from . import datatypes as dt
from .codec import DEADLINE_HEADER, HEADER_LENGTH, InferRequest, RequestedOutput, decode_response, encode_request
from .credentials import SECRET_FILE, Credentials, read_token
from .errors import AccelError, DeadlineExceeded, InvalidInput, NotReady, OpNotFound, ShimUnavailable, error_for_status
from .shm import REGISTER_HEADER, SharedMemory, place_request, registration, resolver
from .tensor import Tensor
from .transport import HTTPTransport, Response
from .types import Prediction

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Mapping, Sequence

    import numpy as np

    from .codec import Resolver
    from .transport import Transport

DEFAULT_URL = "http://127.0.0.1:8000"
__all__ = ["Client", "DEFAULT_URL", "SECRET_FILE", "read_token"]  # the last two: from .credentials
#: how many times a call takes its region's name back from another instance of the function
TAKEOVERS = 3
_extra_headers: "contextvars.ContextVar[Mapping[str, str]]" = contextvars.ContextVar("accel_headers", default={})
_deadline_at: "contextvars.ContextVar[float | None]" = contextvars.ContextVar("accel_deadline", default=None)


class Client:
    """A client of the accelshim daemon.

    Args:
        url: ``http://host:port``, ``unix:///path.sock`` or ``vsock://CID:PORT``; default ``$ACCEL_SHIM_URL`` or
            ``http://127.0.0.1:8000``.
        timeout: seconds a call may take in all, retries included; the shim is told what is left of
            it with every attempt (``X-Accel-Deadline-Ms``) and drops a call whose time is up (504).
        retries: how many times a call is retried after connection refused, 503 (the shim warms up,
            restarts, or lost its device) or 429 (its queue is full); default: as often as fits in
            ``timeout``. Calls are idempotent, so one cut off mid-way is retried too.
        token: the bearer token of this function's tenant; default ``$ACCEL_TOKEN``, else the
            OpenFaaS secret file ``/var/openfaas/secrets/accel-token`` (``$ACCEL_TOKEN_FILE``), else none.
            A token from the file is read again when the shim refuses it (401), and the call is sent
            once more if the file now holds another: a rotated secret needs no restart. A file that
            cannot be read is logged once and is no error until the shim refuses a call.
        binary: send and receive tensors with the binary extension (default) or as JSON.
        transport: an object with ``request``/``close`` (tests use an in-process one).

    Every call raises the ``accel.errors`` class matching the shim's answer (InvalidInput,
    OpNotFound, NotReady, ...) or ShimUnavailable when the shim cannot be reached in time;
    Unauthorized (401) says where the token came from, or why the token file gave none.
    """

    def __init__(self, url: str | None = None, timeout: float = 30.0, *, retries: int | None = None,
                 binary: bool = True, transport: Transport | None = None, token: str | None = None) -> None:
        self.url = url or os.environ.get("ACCEL_SHIM_URL") or DEFAULT_URL
        self.timeout = float(timeout)
        self.retries = None if retries is None else int(retries)
        self._credentials = Credentials(token, source="Client(token=...)") if token is not None \
            else Credentials.from_environment()
        self.binary = binary
        self._transport = transport if transport is not None else HTTPTransport(self.url)

    # --- plumbing -------------------------------------------------------------------------
    def headers(self, headers: Mapping[str, str]) -> "_Scope":
        """Add ``headers`` (e.g. ``X-Call-Id``) to every call made in this ``with`` block.

        Scoped by contextvars, so concurrent requests in other threads keep their own.
        """
        return _Scope(_extra_headers, lambda outer: {**outer, **headers})

    def deadline(self, seconds: float) -> "_Scope":
        """End every call made in this ``with`` block within ``seconds`` from now (or the client's
        timeout, whichever ends first): a function's request that has less time than the client's
        timeout (of-watchdog's ``X-Timeout``). Scoped by contextvars, as ``headers``."""
        at = time.monotonic() + seconds
        return _Scope(_deadline_at, lambda outer: at if outer is None else min(outer, at))

    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] | None = None, ok: tuple[int, ...] = (200,),
              idempotent: bool = True) -> Response:
        deadline = _bounded(time.monotonic() + self.timeout)
        token = self._credentials.token
        all_headers = {**(headers or {}), **_extra_headers.get(), **_bearer(token)}
        delay = 0.02
        attempt = 0
        renewed = False  # the token is renewed once per call at most
        while self.retries is None or attempt <= self.retries:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                break
            all_headers[DEADLINE_HEADER] = str(max(1, int(left * 1000)))
            try:
                resp = self._transport.request(method, path, body, all_headers, left)
                if resp.status == 401 and not renewed:
                    # A 401 comes from the shim's front door, before any route (waitress's parser for
                    # big bodies, the guard for the rest): nothing ran, so any call, idempotent or not,
                    # can go again. Only once, and only with another token than the refused one.
                    renewed = True
                    fresh = self._credentials.renew(token) if _resendable(body) else None
                    left = deadline - time.monotonic()
                    if fresh is not None and left > 0:
                        token = fresh
                        all_headers.update(_bearer(fresh))
                        all_headers[DEADLINE_HEADER] = str(max(1, int(left * 1000)))
                        resp = self._transport.request(method, path, body, all_headers, left)
            except OSError as exc:
                last: AccelError = ShimUnavailable(f"cannot reach the shim at {self.url}: {exc}")
                if not idempotent and not isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
                    raise last from exc  # it may have been sent and done: not again
            else:
                if resp.status in ok:
                    return resp
                last = _error_from(resp, self._credentials)
                if resp.status != 503 and not (resp.status == 429 and last.retry_after is not None
                                               and time.monotonic() + last.retry_after < deadline):
                    raise last
            pause = min(delay, max(0.0, deadline - time.monotonic()))
            if last.retry_after is not None:
                pause = min(last.retry_after, pause * 4)
            time.sleep(pause)
            delay = min(delay * 2, 1.0)
        if "last" in locals():
            raise last
        if deadline == _deadline_at.get():
            raise DeadlineExceeded(f"no time was left for this call (its request's time, X-Timeout or the "
                                   f"function's exec_timeout, or a `with client.deadline()` block, ran out): "
                                   f"not sent to {self.url}")
        raise ShimUnavailable(f"timed out before reaching {self.url}")

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- health and metadata --------------------------------------------------------------
    def live(self) -> bool:
        """True when the shim process answers."""
        return self._probe("/v2/health/live")

    def ready(self) -> bool:
        """True when the shim has warmed up and serves (no retry: a probe)."""
        return self._probe("/v2/health/ready")

    def _probe(self, path: str) -> bool:
        limit = _bounded(time.monotonic() + min(self.timeout, 5.0)) - time.monotonic()  # a ``deadline`` block's too
        if limit <= 0:
            return False
        try:
            resp = self._transport.request("GET", path, None, {**_extra_headers.get(),
                                                               **_bearer(self._credentials.token)},
                                           limit)
        except OSError:
            return False
        return resp.status == 200

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the shim is ready; raises NotReady after ``timeout`` (default: the client's)."""
        deadline = _bounded(time.monotonic() + (self.timeout if timeout is None else timeout))
        while not self.ready():
            if time.monotonic() > deadline:
                raise NotReady(f"the shim at {self.url} is not ready")
            time.sleep(0.05)

    def server_metadata(self) -> dict[str, Any]:
        return json.loads(self._call("GET", "/v2").body)

    def metadata(self, op: str) -> dict[str, Any]:
        """The op's protocol metadata (inputs, outputs, datatypes, shapes, backend)."""
        return json.loads(self._call("GET", f"/v2/models/{_segment(op)}").body)

    # --- inference ------------------------------------------------------------------------
    def infer_tensors(self, model: str, inputs: Sequence[Tensor], parameters: Mapping[str, Any] | None = None, *,
                      outputs: Sequence[RequestedOutput] | None = None, resolve: Resolver | None = None) -> dict[str, Tensor]:
        """Run ``model`` on protocol tensors and return its outputs as tensors (needs no numpy).

        ``outputs`` (default: all, in the body) may ask for some in shared memory; ``resolve`` then reads them.
        """
        request = InferRequest(list(inputs), outputs, parameters=dict(parameters or {}), id=os.urandom(8).hex())
        body, headers = encode_request(request, binary=self.binary)
        resp = self._call("POST", f"/v2/models/{_segment(model)}/infer", body, headers)
        length = resp.header(HEADER_LENGTH)
        try:
            decoded = decode_response(resp.body, int(length) if length is not None else None, resolve)
        except (InvalidInput, ValueError) as exc:
            raise AccelError(f"the shim sent a response this client cannot read: {exc}") from exc
        return {t.name: t for t in decoded.outputs}

    def infer(self, model: str, inputs: Mapping[str, Any], parameters: Mapping[str, Any] | None = None, *,
              shm: SharedMemory | None = None, outputs: Mapping[str, Any] | None = None) -> dict[str, "np.ndarray"]:
        """Run ``model`` (any op or ONNX model of the shim) on numpy arrays.

        Args:
            model: the op or model name, e.g. ``"efficientnet-lite0"``.
            inputs: input name -> array.
            parameters: the protocol request ``parameters``.
            shm: pass tensors through this shared memory region (same host; registered on first use):
                inputs that are views of it (``shm.array(...)``) are not copied, others are copied in.
            outputs: with ``shm``, output name -> byte size, or a view of ``shm`` to write it into, or
                None for the response body; only the outputs named are returned. Default: all, in the body.
        Returns:
            output name -> numpy array (outputs in ``shm``: views of it, valid until it is reused).
        """
        return {name: t.numpy() for name, t in self._infer(model, inputs, parameters, shm, outputs).items()}

    def _infer(self, model: str, inputs: Mapping[str, Any], parameters: Mapping[str, Any] | None,
               shm: SharedMemory | None, outputs: Mapping[str, Any] | None) -> dict[str, Tensor]:
        """``infer``'s work, outputs left as tensors (numpy only where the inputs are numpy arrays)."""
        if shm is None:
            tensors = [v.renamed(k) if isinstance(v, Tensor) else Tensor.from_numpy(k, v) for k, v in inputs.items()]
            return self.infer_tensors(model, tensors, parameters)
        tensors, requested = place_request(shm, inputs, outputs)
        # Every call names its region's object (REGISTER_HEADER): the shim registers it on the way if
        # need be (a first call, or after a restart), and refuses the call (400) when another instance
        # of the function took the name over, rather than compute on that instance's object.
        named = {REGISTER_HEADER: json.dumps(registration(shm))}
        for attempt in range(TAKEOVERS + 1):
            try:
                with self.headers(named):
                    result = self.infer_tensors(model, tensors, parameters, outputs=requested, resolve=resolver(shm))
                break
            except (InvalidInput, OpNotFound) as exc:  # the name taken, or a shim without the extension
                if attempt == TAKEOVERS or not _region_lost(exc, shm.name):
                    raise
            try:
                self._take_shm(shm)  # the standard way: takes the name over
            except InvalidInput as exc:  # another instance took it back meanwhile
                if not _region_lost(exc, shm.name):
                    raise
            time.sleep(0.002 * (attempt + 1) * os.urandom(1)[0] / 255)  # contenders fall out of step
        return result

    def noop(self, **arrays: Any) -> dict[str, "np.ndarray"]:
        """Send ``arrays`` through the shim and back, unchanged (measures the path itself)."""
        return self.infer("noop", arrays)

    def gemm(self, a: Any, b: Any, c: Any = None, alpha: float = 1.0, beta: float = 0.0, *,
             shm: SharedMemory | None = None, out: Any = None) -> Any:
        """``alpha * a @ b + beta * c`` on the shim's device (FP16, FP32 or FP64, one dtype).

        ``a``, ``b``, ``c`` are numpy arrays, or ``accel.Tensor`` s for a function that has no numpy:
        the result is then a Tensor too (``.raw`` its bytes, ``.numpy()`` if wanted), else an array.
        With ``shm``, operands and result pass through that shared memory region (see ``infer``): build
        ``a`` and ``b`` with ``shm.array(...)`` or ``shm.tensor(...)`` and nothing is copied on this side;
        the result is a view of the region (``out``, a view of it, says where; else free space after
        the operands).
        """
        inputs = {"A": a, "B": b}
        if c is not None:
            inputs["C"] = c
        params = {"alpha": float(alpha), "beta": float(beta)}
        where = out
        if shm is not None and where is None:
            # a result of unknown size (malformed operands: the shim says why) comes in the body
            rows, cols, itemsize = _gemm_shape(a, b)
            where = rows * cols * itemsize if itemsize else None
        result = self._infer("gemm", inputs, params, shm, None if shm is None else {"C": where})["C"]
        return result if isinstance(a, Tensor) else result.numpy()

    # --- system shared memory (docs/shared-memory.md) ----------------------------------------
    def register_shm(self, name: str, key: str, byte_size: int, offset: int = 0) -> None:
        """Register ``byte_size`` bytes at ``offset`` of POSIX shared memory object ``key`` as region ``name``.

        Raises:
            InvalidInput: a bad name or key, no such object, out of its bounds, or the name is taken (400);
            QuotaExceeded / InsufficientStorage: over the tenant's region count (429) or bytes (507).
        """
        body = json.dumps({"key": key, "offset": int(offset), "byte_size": int(byte_size)}).encode()
        self._call("POST", f"/v2/systemsharedmemory/region/{_segment(name)}/register", body,
                   {"Content-Type": "application/json"})

    def unregister_shm(self, name: str | None = None) -> None:
        """Unregister region ``name`` (None: all of this tenant's regions); an unknown name is no error."""
        path = "/v2/systemsharedmemory/unregister" if name is None else \
            f"/v2/systemsharedmemory/region/{_segment(name)}/unregister"
        self._call("POST", path, b"")

    def shm_status(self, name: str | None = None) -> list[dict[str, Any]]:
        """``[{"name", "key", "offset", "byte_size"}]`` of region ``name`` (None: of all this tenant's)."""
        path = "/v2/systemsharedmemory/status" if name is None else \
            f"/v2/systemsharedmemory/region/{_segment(name)}/status"
        return json.loads(self._call("GET", path).body)

    def _take_shm(self, region: SharedMemory) -> None:
        """Register ``region`` the standard way, taking its name over if it stands for another object."""
        try:
            self.register_shm(region.name, region.key, region.byte_size)
        except InvalidInput as exc:  # left registered by another instance of this tenant: take it over
            if "already registered" not in exc.message:
                raise
            self.unregister_shm(region.name)
            self.register_shm(region.name, region.key, region.byte_size)

    def classify(self, images: bytes | Sequence[bytes], top_k: int = 5) -> list[Prediction] | list[list[Prediction]]:
        """Classify encoded images (JPEG, PNG, WebP, BMP, GIF) with the shim's ImageNet model.

        Args:
            images: one encoded image, or a list of them (one batch).
            top_k: how many classes per image (1..1000).
        Returns:
            for one image, its predictions best first; for a list, one such list per image.
        """
        single = isinstance(images, (bytes, bytearray, memoryview))
        batch = [bytes(images)] if single else [bytes(i) for i in images]  # type: ignore[union-attr]
        out = self.infer_tensors("classify", [Tensor.from_bytes_list("image", batch)], {"top_k": top_k})
        labels, scores, classes = out["labels"].tolist(), out["scores"].tolist(), out["classes"].tolist()
        k = out["labels"].shape[1] if len(out["labels"].shape) == 2 else 0
        result = [[Prediction(labels[i * k + j], scores[i * k + j], classes[i * k + j]) for j in range(k)]
                  for i in range(len(batch))]
        return result[0] if single else result

    # --- Kernel-as-a-Service (docs/kaas.md) --------------------------------------------------
    def kaas(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Run a KaaS request ``{"kernels": [...], "nIter": n}`` over the shim's buffer store.

        Returns:
            ``{"outputs": [{"name", "key", "size"}], "timings_ms": {...}, "cache": {...}, ...}``.
        Raises:
            InvalidInput (400) and OpNotFound (404, e.g. a missing input buffer): nothing ran;
            InsufficientStorage (507): no room in the store or the GPU cache.
        """
        body = json.dumps(request).encode()
        resp = self._call("POST", "/v1/kaas", body, {"Content-Type": "application/json"}, idempotent=False)
        return json.loads(resp.body)

    def put_buffer(self, key: str, data: Any) -> None:
        """Store ``data`` (bytes, or a numpy array: its raw C-order bytes) under ``key``."""
        if hasattr(data, "tobytes"):
            import numpy as np  # noqa: PLC0415

            data = np.ascontiguousarray(data).tobytes()
        self._call("PUT", f"/v1/buffers/{_segment(key)}", bytes(data), {"Content-Type": "application/octet-stream"})

    def get_buffer(self, key: str, dtype: Any = None) -> Any:
        """The bytes stored under ``key``; with ``dtype``, a 1-D numpy array of that dtype."""
        body = self._call("GET", f"/v1/buffers/{_segment(key)}").body
        if dtype is None:
            return body
        import numpy as np  # noqa: PLC0415

        return np.frombuffer(body, dtype=dtype)

    def delete_buffer(self, key: str) -> None:
        self._call("DELETE", f"/v1/buffers/{_segment(key)}")

    def list_buffers(self) -> list[dict[str, Any]]:
        """``[{"key", "size", "location", "const", "dirty"}]`` of this tenant's buffers."""
        return json.loads(self._call("GET", "/v1/buffers").body)["buffers"]


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _resendable(body: object) -> bool:
    """Whether a request body can be sent again as it was: whole bytes, not a stream read once."""
    return body is None or isinstance(body, (bytes, bytearray, memoryview))


class _Scope:
    """``var`` set to ``value(its value outside)`` within a ``with`` block (``Client.headers``,
    ``Client.deadline``)."""

    def __init__(self, var: contextvars.ContextVar, value: Callable[[Any], Any]) -> None:
        self._var, self._value = var, value
        self._token: contextvars.Token | None = None

    def __enter__(self) -> None:
        self._token = self._var.set(self._value(self._var.get()))

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            self._var.reset(self._token)


def _bounded(deadline: float) -> float:
    """``deadline``, or the ``deadline`` block's where that ends first."""
    scoped = _deadline_at.get()
    return deadline if scoped is None else min(deadline, scoped)


def _region_lost(exc: AccelError, name: str) -> bool:
    """Whether ``exc`` says that region ``name`` is not this client's (any more): registered with another
    object (another instance of the function took the name), or unknown to the server (a restart, or
    a server that ignores ``REGISTER_HEADER``, as Triton does)."""
    if f"'{name}'" not in exc.message:
        return False
    if isinstance(exc, OpNotFound):
        return "shared memory region" in exc.message
    return isinstance(exc, InvalidInput) and "already registered" in exc.message


def _gemm_shape(a: Any, b: Any) -> tuple[int, int, int]:
    """``(rows of a, columns of b, item size)`` of two 2-D operands (arrays or Tensors); item size 0
    when they are not both 2-D or their element size is unknown."""
    a_shape, b_shape = tuple(getattr(a, "shape", ())), tuple(getattr(b, "shape", ()))
    if isinstance(a, Tensor):
        itemsize = dt.FIXED[a.datatype][1] if a.datatype in dt.FIXED else 0
    else:
        itemsize = getattr(getattr(a, "dtype", None), "itemsize", 0)
    if len(a_shape) != 2 or len(b_shape) != 2:
        return 0, 0, 0
    return int(a_shape[0]), int(b_shape[1]), int(itemsize)


def _segment(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise InvalidInput(f"invalid op or model name {name!r}")
    return name


def _error_from(resp: Response, credentials: Credentials | None = None) -> AccelError:
    try:
        message = json.loads(resp.body)["error"]
    except (ValueError, KeyError, TypeError):
        message = resp.body[:200].decode("utf-8", "replace") or f"HTTP {resp.status}"
    why = credentials.explain() if credentials is not None and resp.status == 401 else ""
    if why:
        message = f"{message} ({why})"
    retry = resp.header("Retry-After")
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    return error_for_status(resp.status, message, retry_after)
