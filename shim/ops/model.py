"""A raw model of the repository served by name: the generic ``infer``."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Mapping, Sequence

import numpy as np

from accel.datatypes import FIXED
from accel.errors import InvalidInput

from ..backends.base import Backend, ModelRunner
from ..batching import Batcher, BatchingFactory
from ..futures import gathered, then
from ..padding import padded_sizes
from ..modelrepo import ModelConfig
from .base import Op

Feeds = dict[str, np.ndarray]


class ModelOp(Op):
    """Any ONNX model of the repository; inputs and outputs are the model's own.

    When every input has a dynamic first (batch) axis, concurrent requests whose other dimensions
    agree are concatenated along it into one run (dynamic batching) and split back out. A runner that
    answers in a Future (``run_later``: a request worker's, over the link) has its batches started by
    the batcher, which goes on gathering, and answered as the device process replies.
    """

    platform = "onnxruntime_onnx"

    def __init__(self, backend: Backend, config: ModelConfig, max_batch: int,
                 batching: BatchingFactory | None = None) -> None:
        self._backend = backend
        self.backend = backend.name
        self.config = config
        self.name = config.name
        self._max_batch = max_batch
        self._batching = batching
        self._runner: ModelRunner | None = None
        self._batcher: Batcher[Feeds, Feeds] | None = None
        self._batchable = False
        self.inputs, self.outputs = [], []

    def load(self) -> None:
        self._runner = self._backend.load_model(self.config.onnx, self.config.instances())
        self.inputs, self.outputs = self._runner.inputs, self._runner.outputs
        self.backend = self._runner.device
        self._batchable = bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in self.inputs + self.outputs)
        if self._batching is not None and self._batchable:
            # never merge past what one request may carry: a request worker's merged batch is one request
            # to the device process
            later = self._run_batch_later if hasattr(self._runner, "run_later") else None
            self._batcher = self._batching.make(self.name, self._run_batch, min(self.config.max_batch_size,
                                                                                  self._max_batch),
                                                self.config.max_queue_delay_us, self.config.instances(),
                                                run_batch_later=later)

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["max_batch_size"] = self.config.max_batch_size
        meta["dynamic_batching"] = {"enabled": self._batcher is not None,
                                    "max_queue_delay_us": self.config.max_queue_delay_us,
                                    "instance_count": self.config.instances()}
        return meta

    def run(self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        rows = self._rows(inputs)
        if self._batcher is None or len(rows) != 1:
            return self._run_chunked(inputs)
        return self._batcher.submit(inputs, rows.pop())

    def run_later(self, inputs: Feeds) -> Future[Feeds] | None:
        """``run`` without waiting, where the request goes to the batcher (its Future set on the
        batcher's reply thread as its batch ends); None where it would run alone (no batcher, or
        inputs of several row counts): ``run`` it, on a thread that may wait.

        Raises:
            InvalidInput: as ``run``.
        """
        rows = self._rows(inputs)
        if self._batcher is None or len(rows) != 1:
            return None
        return self._batcher.submit_later(inputs, rows.pop())

    def _rows(self, inputs: Feeds) -> set[int]:
        """The row counts of ``inputs``' arrays (their first axes).

        Raises:
            InvalidInput: an input's batch over the request limit (``--max-batch``).
        """
        assert self._runner is not None, f"model {self.name} used before load()"
        for spec in self.inputs:
            array = inputs[spec.name]
            if spec.shape and spec.shape[0] == -1 and array.ndim and array.shape[0] > self._max_batch:
                raise InvalidInput(f"input {spec.name!r}: batch of {array.shape[0]} is over the limit of {self._max_batch}")
        return {array.shape[0] for array in inputs.values() if array.ndim}

    def _run_chunked(self, feeds: Feeds) -> Feeds:
        """Run ``feeds`` in chunks of at most ``max_batch_size`` rows (the shapes warmed up on a GPU)."""
        assert self._runner is not None
        rows = {a.shape[0] for a in feeds.values() if a.ndim}
        step = max(1, self.config.max_batch_size)
        if not self._batchable or len(rows) != 1 or (n := rows.pop()) <= step:
            return self._runner.run(feeds)
        parts = [self._runner.run({k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _run_batch(self, requests: Sequence[Feeds]) -> list[Feeds]:
        """Requests whose inputs agree but for the batch axis run as one; the rest alone."""
        assert self._runner is not None
        results: list[Feeds] = [{} for _ in requests]
        for members in _groups(requests):
            outputs = self._run_chunked(requests[members[0]]) if len(members) == 1 else \
                self._runner.run(_merged(requests, members))
            _split(requests, members, outputs, results)
        return results

    def _run_batch_later(self, requests: Sequence[Feeds]) -> Future[list[Feeds]]:
        """``_run_batch`` through a runner that answers in a Future (``run_later``; the device process
        chunks a request itself): each group's run started at once, the results split back out as
        the last of them comes in."""
        groups = _groups(requests)
        runner = self._runner
        assert runner is not None
        started: list[Future[Feeds]] = []
        for members in groups:
            try:
                started.append(runner.run_later(requests[members[0]] if len(members) == 1  # type: ignore[attr-defined]
                                                else _merged(requests, members)))
            except BaseException as exc:  # noqa: BLE001 - the batch fails once the calls already sent are back
                failed: Future[Feeds] = Future()
                failed.set_exception(exc)
                started.append(failed)
                break

        def split(outputs: list[Feeds]) -> list[Feeds]:
            results: list[Feeds] = [{} for _ in requests]
            for members, out in zip(groups, outputs):
                _split(requests, members, out, results)
            return results

        return then(gathered(started), split)

    def warmup(self) -> None:
        """One run with zeros; on a GPU, one per batch shape the runner pads to (``padded_sizes``: 1,
        2, 4, 6, 8, ... up to the padded ``max_batch_size``), so that no request pays for a new shape.
        No run is over the request limit (``--max-batch``): a worker's warm-up goes through the
        device's checks."""
        assert self._runner is not None, f"model {self.name} warmed up before load()"
        top = self.config.max_batch_size if self.backend == "cuda" else 1
        for n in padded_sizes(top):  # a batch of max_batch_size rows pads to the last: warm it too
            feeds = {}
            rows = min(n, self._max_batch)
            for spec in self.inputs:
                if spec.datatype is None or spec.datatype == "BYTES" or spec.shape is None:
                    return  # nothing sensible to make up; the first request warms it
                shape = tuple((rows if i == 0 else 1) if d < 0 else d for i, d in enumerate(spec.shape))
                feeds[spec.name] = np.zeros(shape, dtype=FIXED[spec.datatype][2])
            self._runner.run(feeds)
            if rows < n:  # capped by --max-batch: larger sizes would repeat this run
                break

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()


def _groups(requests: Sequence[Feeds]) -> list[list[int]]:
    """The indices of the requests whose inputs agree but for the batch axis, group by group."""
    groups: dict[tuple, list[int]] = {}
    for i, feeds in enumerate(requests):
        key = tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _merged(requests: Sequence[Feeds], members: list[int]) -> Feeds:
    """The ``members``' inputs concatenated along the batch axis."""
    return {n: np.concatenate([requests[i][n] for i in members]) for n in requests[members[0]]}


def _split(requests: Sequence[Feeds], members: list[int], outputs: Feeds, results: list[Feeds]) -> None:
    """``outputs`` of the ``members``' run cut back along the batch axis into ``results``."""
    cuts = np.cumsum([len(next(iter(requests[i].values()))) for i in members])[:-1]
    split = {n: np.split(v, cuts) for n, v in outputs.items()}
    for j, i in enumerate(members):
        results[i] = {n: parts[j] for n, parts in split.items()}
