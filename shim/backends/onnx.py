"""ONNX models through onnxruntime: ``OnnxRunner`` (CPU provider here; the CUDA backend passes its
provider), and the names of ``onnx_fixed`` and ``onnx_runtime`` that its callers use."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import numpy as np

from ..padding import padded_batch
from .onnx_fixed import ComputeStream, DeviceCopy, FixedSession, QueuedDownload
from .onnx_runtime import NUMPY_TYPES, dtype_of, first_line, has_cuda_provider, ort, tensor_spec, version

__all__ = ["BoundInput", "ComputeStream", "FixedSession", "OnnxRunner", "QueuedDownload", "first_line", "padded_batch",
           "version", "has_cuda_provider"]

T = TypeVar("T")
log = logging.getLogger(__name__)
GRAPH_WARMUP_RUNS = 3  # onnxruntime captures the CUDA graph in the first runs: before any request


class BoundInput(NamedTuple):
    """A bound thread's session input (``OnnxRunner.input_buffer``): its device address and shape,
    and the stream (address) the session runs on, as onnxruntime reports it, None for a stream of
    its own."""

    pointer: int
    shape: tuple[int, ...]
    stream: int | None




class _Copy:
    """One copy of a batch size's session: its own buffers, CUDA graph and thread (onnxruntime keeps a
    captured graph with the thread's CUDA state); ``busy`` counts the runs handed to it."""

    __slots__ = ("session", "thread", "busy")

    def __init__(self, session: Any, thread: ThreadPoolExecutor) -> None:
        self.session, self.thread, self.busy = session, thread, 0


class OnnxRunner:
    """An onnxruntime session, thread-safe, with its inputs and outputs as protocol specs.

    On the CUDA provider a session re-plans every convolution (cuDNN) whenever its input shape
    changes, which costs most of a second, so each batch size gets a session of its own, run by a
    thread of its own (cuDNN state is per thread too): batches are padded to one of a few sizes
    (``padded_batch``), so a model has a handful of sessions, each warmed up at start and never
    seeing another shape.

    With ``fixed`` (and a model whose only free dimension is a named batch axis), each batch size's
    session is built for exactly that size and bound to fixed buffers (``FixedSession``), ``copies``
    times (a model's instance_count: as many batches of one size run side by side, each on a copy
    of its own with its own thread; a copy that cannot be built leaves the others serving); with
    ``graphs`` too, onnxruntime's CUDA provider captures the whole model as one CUDA graph and
    replays it: one launch instead of one per node, which is most of a small batch's time. A model
    that cannot be captured (a node off the GPU, say) runs without graphs, logged. A capture holds
    ``capture_lock`` (the backend's, which pinning host memory takes too: see ``PinnedRanges``).

    A thread that runs batches all the time (a batcher's) can instead ``bind_thread``: it gets fixed
    sessions of its own, built and captured on it, and runs them itself, with no hand-over to a
    session's thread and back; ``input_buffer`` lets it write a batch straight into their inputs.
    """

    def __init__(self, path: Path, providers: Sequence[Any], threads: int = 0, device_id: int = 0, *,
                 fixed: bool = False, graphs: bool = False, device_copy: DeviceCopy | None = None,
                 copies: int = 1, capture_lock: threading.Lock | None = None) -> None:
        self._path, self._providers, self.device_id = Path(path), list(providers), device_id
        self._threads = threads
        self.session = self._new_session()
        self.inputs = [tensor_spec(i) for i in self.session.get_inputs()]
        self.outputs = [tensor_spec(o) for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self._names = [o.name for o in self.outputs]
        self._batched = bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs)
        self._batch_axis = _batch_axis_name(self.session) if fixed and self._batched else None
        self.graphs = graphs and self.device == "cuda" and self._batch_axis is not None
        self._device_copy = device_copy
        self.copies = max(1, copies) if self.fixed else 1
        self._by_batch: dict[int, list[_Copy]] = {}
        self._lock = threading.Lock()
        self._building = threading.Lock()
        self._capture_lock = capture_lock or threading.Lock()
        self._local = threading.local()  # ``sessions``: a bound thread's own, by batch size

    @property
    def fixed(self) -> bool:
        """Whether each batch size runs on a session of fixed shapes and buffers."""
        return self._batch_axis is not None

    def _new_session(self, batch: int | None = None, graph: bool = False, stream: int | None = None) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            options.intra_op_num_threads = self._threads
        options.log_severity_level = 3
        providers = self._providers
        if batch is not None:
            options.add_free_dimension_override_by_name(self._batch_axis, batch)
        extra = {**({"enable_cuda_graph": "1"} if graph else {}),
                 **({"user_compute_stream": str(stream)} if stream is not None else {})}
        if extra:
            providers = [(p[0], {**p[1], **extra}) if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider"
                         else p for p in providers]
        return ort.InferenceSession(str(self._path), sess_options=options, providers=providers)

    def _session_for(self, batch: int) -> list[_Copy]:
        """The copies of the session of ``batch`` rows (built, with their threads, on first use)."""
        with self._lock:
            entry = self._by_batch.get(batch)
            if entry is None and (batch == 0 or not (self._by_batch or self.fixed)):  # the session made at load
                entry = self._by_batch[batch] = [_Copy(self.session, self._new_thread(batch))]
        if entry is not None:
            return entry
        with self._building:  # seconds, outside the lock: requests of other sizes go on; one build at a time
            with self._lock:
                entry = self._by_batch.get(batch)
            if entry is not None:  # built meanwhile by another request
                return entry
            built: list[_Copy] = []
            for i in range(self.copies):
                thread = self._new_thread(batch, i)
                try:
                    # a later copy that cannot be captured is not built at all: graphs stay on for
                    # the model (its first copies have theirs)
                    session = (self._new_fixed(batch, thread, fall_back=not built) if self.fixed
                               else self._new_session())
                except BaseException as exc:
                    thread.shutdown(wait=False)
                    if built and isinstance(exc, Exception):
                        # the copies that were built serve (out of GPU memory for another, say): no
                        # request of this size pays for a failed build again
                        log.warning("%s: %d of %d copies of the session of %d rows (%s: %s)", self._path.parent.name,
                                    len(built), self.copies, batch, type(exc).__name__, first_line(exc))
                        break
                    for copy in built:
                        copy.thread.shutdown(wait=False)
                    raise
                built.append(_Copy(session, thread))
            with self._lock:
                return self._by_batch.setdefault(batch, built)

    def _new_fixed(self, batch: int, thread: ThreadPoolExecutor | None, fall_back: bool = True,
                   stream: ComputeStream | None = None) -> FixedSession:
        """The fixed session of ``batch`` rows (on ``stream`` when given), its graph captured (on
        ``thread``, which will run it; None: the calling thread) where it can be; where it cannot,
        with ``fall_back`` and no ``stream`` the model runs node by node from now on (logged), else
        the capture's error is raised (a caller's stream that a failed capture may have left
        capturing is the caller's to drop)."""
        pointer = None if stream is None else stream.pointer

        def on_its_thread(job: Callable[[], None]) -> None:
            if thread is None:
                job()
            else:
                thread.submit(job).result()

        if self.graphs:
            try:
                fixed = FixedSession(self._new_session(batch, graph=True, stream=pointer), self.device,
                                     self.device_id, stream)
                with self._capture_lock:  # no pin on another thread may break the capture
                    on_its_thread(lambda: fixed.warm_up(GRAPH_WARMUP_RUNS))
                return fixed
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types; the model still runs
                if not fall_back or stream is not None:
                    raise
                self.graphs = False
                log.warning("%s: no CUDA graph (%s: %s); it runs node by node", self._path.parent.name,
                            type(exc).__name__, first_line(exc))
        fixed = FixedSession(self._new_session(batch, stream=pointer), self.device, self.device_id, stream)
        on_its_thread(lambda: fixed.warm_up(1))
        return fixed

    def bind_thread(self, sizes: Sequence[int] = (), stream: ComputeStream | None = None) -> None:
        """The calling thread (a batcher's, at its start) runs this model's batches itself from now
        on, on fixed sessions of its own (onnxruntime keeps a captured graph with the thread that
        captured it), on the thread's ``stream`` when given (CUDA): those of ``sizes`` built and
        captured here and now, any other size on first use. A runner without fixed sessions has none
        to bind.

        Raises:
            Exception: what building or capturing a session raised; the thread is then not bound.
        """
        if not self.fixed:
            return
        sessions: dict[int, FixedSession] = {}
        with self._building:  # one build, and so one capture, at a time
            for size in sizes:
                sessions[size] = self._new_fixed(size, None, stream=stream)
        self._local.sessions, self._local.stream = sessions, stream

    def _bound(self, batch: int) -> FixedSession | None:
        """The calling thread's own session of ``batch`` rows (built now if need be), or None when
        the thread is not bound."""
        sessions: dict[int, FixedSession] | None = getattr(self._local, "sessions", None)
        if sessions is None or batch < 1:  # 0: an unbatched run, on the session made at load
            return None
        session = sessions.get(batch)
        if session is None:
            with self._building:  # one build, and so one capture, at a time
                session = sessions[batch] = self._new_fixed(batch, None, stream=self._local.stream)
        return session

    def input_buffer(self, name: str, batch: int) -> BoundInput | None:
        """Where the calling thread's own session of ``batch`` rows takes its FP32 input ``name`` on
        the device, or None (a thread not bound, another type): a batch written there runs with
        ``run_device`` given that address, copied nowhere; on the stream it names, the batch's
        writes need no wait before the run."""
        session = self._bound(batch)
        value = None if session is None else session.inputs.get(name)
        if value is None or dtype_of(value) != np.float32:
            return None
        return BoundInput(value.data_ptr(), tuple(value.shape()), session.stream.pointer if session.follows else None)

    def launch_device(self, name: str, pointer: int, shape: tuple[int, ...], host: np.ndarray,
                      download: QueuedDownload) -> bool:
        """``FixedSession.launch_device`` on the calling thread's own session of ``shape[0]`` rows (the
        batch written at ``input_buffer``'s address): the run and the first output's download into
        ``host`` queued on the thread's stream; False, nothing queued, where that cannot be."""
        session = self._bound(shape[0])
        return session is not None and session.launch_device(name, pointer, shape, host, download)

    def _new_thread(self, batch: int, copy: int = 0) -> ThreadPoolExecutor:
        suffix = f"c{copy}" if copy else ""
        return ThreadPoolExecutor(1, thread_name_prefix=f"ort-{self._path.parent.name}-{batch}{suffix}")

    def _on_gpu(self, batch: int, job: Callable[[Any], T]) -> T:
        """``job(session)`` with the calling thread's own session of ``batch`` rows, on it (a bound
        thread), else with a copy of the session (the least busy), on that copy's thread."""
        bound = self._bound(batch)
        if bound is not None:
            return job(bound)
        copies = self._session_for(batch)
        if len(copies) == 1:
            return copies[0].thread.submit(job, copies[0].session).result()
        with self._lock:
            copy = min(copies, key=lambda c: c.busy)
            copy.busy += 1
        try:
            return copy.thread.submit(job, copy.session).result()
        finally:
            with self._lock:
                copy.busy -= 1

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out; on the CUDA provider through I/O binding (one copy each way), the
        batch padded (``padded_batch``; with ``fixed``, on the CPU too)."""
        rows = {a.shape[0] for a in feeds.values() if a.ndim}
        batched = self._batched and len(rows) == 1
        if self.device != "cuda" and not (self.fixed and batched):
            return dict(zip(self._names, self.session.run(self._names, feeds)))
        batch = rows.pop() if batched else 0
        # the session to use: 0 rows, that of 1; unbatched, that of 1 or, when fixed, the one made at load
        size = padded_batch(batch) if batched else (0 if self.fixed else 1)
        pad = size - batch if batched else 0
        if pad:
            feeds = {name: np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for name, a in feeds.items()}

        def run(session: Any) -> list[np.ndarray]:
            if isinstance(session, FixedSession):
                return session.run(feeds)
            binding = session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            for name in self._names:
                binding.bind_output(name, "cuda", self.device_id)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()

        outputs = self._on_gpu(size, run)
        if pad:
            outputs = [o[:batch] if o.ndim and o.shape[0] == size else o for o in outputs]
        return dict(zip(self._names, outputs))

    def run_device(self, name: str, pointer: int, shape: tuple[int, ...], device_id: int = 0) -> np.ndarray:
        """Run on an FP32 input already on the GPU (no host round trip; its batch a padded size, its
        producer synchronized, or queued on the stream the session follows: ``input_buffer``); the
        first output, on the host."""
        def run(session: Any) -> np.ndarray:
            if isinstance(session, FixedSession):
                assert self._device_copy is not None, "a fixed CUDA runner needs its device_copy"
                return session.run_device(name, pointer, shape, self._device_copy)
            binding = session.io_binding()
            binding.bind_input(name, "cuda", device_id, np.float32, list(shape), pointer)
            binding.bind_output(self._names[0], "cuda", device_id)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        return self._on_gpu(shape[0], run)


def _batch_axis_name(session: Any) -> str | None:
    """The name of the batch axis when it is every input's only free dimension (and the outputs'
    other dimensions are fixed, and every tensor has a fixed-size element type), else None: what a
    session of fixed shapes needs."""
    names = set()
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        first, rest = arg.shape[0] if arg.shape else None, arg.shape[1:]
        if not isinstance(first, str) or not all(isinstance(d, int) and d >= 0 for d in rest):
            return None
        if getattr(arg, "type", None) not in NUMPY_TYPES:  # strings, maps, sequences: no fixed buffer for them
            return None
        names.add(first)
    return names.pop() if len(names) == 1 else None

