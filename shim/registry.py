"""Name -> op, and each op's state: loaded, warmed up, ready."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from accel.errors import NotReady, OpNotFound

from .ops.base import Op

log = logging.getLogger(__name__)


class Registry:
    """The ops of one shim. Nothing is ready until ``load_all`` has loaded and warmed each op."""

    def __init__(self, ops: Iterable[Op]) -> None:
        self._ops: dict[str, Op] = {}
        for op in ops:
            if op.name in self._ops:
                raise ValueError(f"two ops are named {op.name!r}")
            self._ops[op.name] = op
        self._gates: list[Callable[[], bool]] = []
        self.loaded = threading.Event()  # set once every op is warmed up
        self.warmup_seconds: dict[str, float] = {}

    def add_gate(self, gate: Callable[[], bool]) -> None:
        """One more condition of the shim's readiness (KaaS has compiled its kernels, the request
        workers have started)."""
        self._gates.append(gate)

    def names(self) -> list[str]:
        return list(self._ops)

    def get(self, name: str) -> Op:
        """The op ``name``; raises OpNotFound, or NotReady while it warms up."""
        op = self._ops.get(name)
        if op is None:
            raise OpNotFound(f"unknown op or model {name!r}; available: {', '.join(self._ops)}")
        if not self.loaded.is_set():
            raise NotReady(f"op {name!r} is warming up")
        return op

    def lookup(self, name: str) -> Op:
        """The op ``name`` whether ready or not (for metadata); raises OpNotFound."""
        op = self._ops.get(name)
        if op is None:
            raise OpNotFound(f"unknown op or model {name!r}; available: {', '.join(self._ops)}")
        return op

    def is_ready(self, name: str | None = None) -> bool:
        """Whether op ``name`` (or, with None, every op, and the gates) is ready: the ops are ready
        together, once ``load_all`` has warmed them all."""
        if not self.loaded.is_set():
            return False
        return bool(name) or all(gate() for gate in self._gates)

    def load_all(self, warmed: Callable[[], None] | None = None) -> None:
        """Load and warm up every op, in order; they are ready together once every one has warmed up
        (on a GPU a model's warm-up captures CUDA graphs, which no other op's work may run beside),
        after ``warmed()`` (the backend's: no capture from then on)."""
        for name, op in self._ops.items():
            start = time.perf_counter()
            op.load()
            op.warmup()
            self.warmup_seconds[name] = time.perf_counter() - start
            log.info("op %s warm (%s backend, load + warm-up %.3f s)", name, op.backend, self.warmup_seconds[name])
        if warmed is not None:
            warmed()
        self.loaded.set()

    def close(self) -> None:
        """Close every op (batcher threads, device memory)."""
        for op in self._ops.values():
            op.close()
