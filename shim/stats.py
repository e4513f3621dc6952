"""Per-op inference statistics in the shape of the protocol's statistics extension (Triton's)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class OpStats:
    """What one op has done since the shim started."""

    inference_count: int = 0        # items (images, matrices, rows of a batch)
    execution_count: int = 0        # runs of the op (a dynamic batch counts once)
    last_inference_ms: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)


class Statistics:
    """Thread-safe counters per op; ``as_json`` answers ``GET /v2/models[/{op}]/stats``."""

    def __init__(self) -> None:
        self._ops: dict[str, OpStats] = {}
        self._lock = threading.Lock()

    def record(self, op: str, ok: bool, total_ns: int, items: int = 0, queue_ns: int = 0,
               compute_ns: int = 0) -> None:
        with self._lock:
            s = self._ops.setdefault(op, OpStats())
            (s.success if ok else s.fail).add(total_ns)
            if ok:
                s.inference_count += items
                s.execution_count += 1
                s.queue.add(queue_ns)
                s.compute_infer.add(compute_ns)
                s.last_inference_ms = int(time.time() * 1000)

    def as_json(self, names: list[str]) -> dict[str, Any]:
        with self._lock:
            return {"model_stats": [self._entry(n, self._ops.get(n, OpStats())) for n in names]}

    @staticmethod
    def _entry(name: str, s: OpStats) -> dict[str, Any]:
        def d(x: _Duration) -> dict[str, int]:
            return {"count": x.count, "ns": x.ns}

        return {"name": name, "version": "1", "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count, "execution_count": s.execution_count,
                "inference_stats": {"success": d(s.success), "fail": d(s.fail), "queue": d(s.queue),
                                    "compute_input": d(_Duration()), "compute_infer": d(s.compute_infer),
                                    "compute_output": d(_Duration())},
                "batch_stats": []}
