"""Validate a request against its op, run it, time it, count it."""
from __future__ import annotations

import time

from accel.codec import InferRequest, InferResponse
from accel.errors import InvalidInput
from accel.tensor import Tensor

from .backends.base import TensorSpec
from .metrics import Metrics, Outcome
from .ops.base import Destinations, Op
from .registry import Registry
from .stats import Statistics


class Dispatcher:
    """The layer between the HTTP routes and the ops."""

    def __init__(self, registry: Registry, metrics: Metrics, stats: Statistics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.stats = stats or Statistics()

    def infer(self, op_name: str, request: InferRequest, destinations: Destinations | None = None) -> InferResponse:
        """Run ``request`` on op ``op_name``.

        Args:
            destinations: output name -> memory to write it into (its shared-memory region); an op
                that can compute an output there (``Op.direct_outputs``) does, others leave it to
                the caller, whose copy of an output that already is its destination is no copy.

        Raises:
            OpNotFound, NotReady: no such op, or not warmed up yet.
            InvalidInput: inputs, parameters or requested outputs that do not fit the op.
        """
        start = time.perf_counter_ns()
        items = compute_ns = 0
        self.metrics.inflight.inc()
        outcome = Outcome()
        try:
            with outcome:
                op = self.registry.get(op_name)
                _check_inputs(op_name, op.inputs, request)
                compute_start = time.perf_counter_ns()
                outputs = _run(op, request, destinations)
                compute_ns = time.perf_counter_ns() - compute_start
                if request.outputs is not None:
                    by_name = {t.name: t for t in outputs}
                    missing = [o.name for o in request.outputs if o.name not in by_name]
                    if missing:
                        raise InvalidInput(f"op {op_name!r} has no output {missing[0]!r}; it has "
                                           f"{', '.join(by_name) or 'none'}")
                    outputs = [by_name[o.name] for o in request.outputs]
                items = max((t.shape[0] if t.shape else 1) for t in request.inputs) if request.inputs else 1
                return InferResponse(op_name, outputs, model_version="1", id=request.id)
        finally:
            self.metrics.inflight.dec()
            self.record(op_name, outcome.status, time.perf_counter_ns() - start, items, compute_ns)

    def record(self, op_name: str, status: int, elapsed_ns: int, items: int = 0, compute_ns: int = 0) -> None:
        """Count one finished request: by status, its latency and the op's statistics (unknown
        ops, 404, are counted apart). Request workers report theirs here too (``--workers``)."""
        self.metrics.requests.labels(op_name if status != 404 else "_unknown", str(status)).inc()
        if status == 200:
            self.metrics.latency.labels(op_name).observe(elapsed_ns / 1e9)
            self.metrics.items.labels(op_name).inc(items)
        if status != 404:
            self.stats.record(op_name, status == 200, elapsed_ns, items, compute_ns=compute_ns)


def _run(op: Op, request: InferRequest, destinations: Destinations | None) -> list[Tensor]:
    """The op's outputs, computed into the destinations it can take (only ops that declare
    ``direct_outputs`` get the keyword at all)."""
    usable = {k: v for k, v in (destinations or {}).items() if k in op.direct_outputs}
    if usable:
        return op.run_tensors(request.inputs, request.parameters, destinations=usable)
    return op.run_tensors(request.inputs, request.parameters)


def _check_inputs(op_name: str, specs: list[TensorSpec], request: InferRequest) -> None:
    """Names, datatypes and shapes against the op's declared inputs (empty specs: anything goes)."""
    if not specs:
        return
    given = {t.name: t for t in request.inputs}
    known = {s.name for s in specs}
    unknown = [n for n in given if n not in known]
    if unknown:
        raise InvalidInput(f"op {op_name!r} has no input {unknown[0]!r}; its inputs are {', '.join(sorted(known))}")
    for spec in specs:
        tensor = given.get(spec.name)
        if tensor is None:
            if spec.optional:
                continue
            raise InvalidInput(f"op {op_name!r} needs input {spec.name!r}")
        if spec.datatype is not None and tensor.datatype != spec.datatype:
            raise InvalidInput(f"input {spec.name!r} of op {op_name!r} must be {spec.datatype}, not {tensor.datatype}")
        if spec.shape is not None:
            if len(tensor.shape) != len(spec.shape) or any(
                    want not in (-1, got) for want, got in zip(spec.shape, tensor.shape)):
                raise InvalidInput(f"input {spec.name!r} of op {op_name!r} has shape {list(tensor.shape)}; "
                                   f"expected {list(spec.shape)} (-1: any size)")
