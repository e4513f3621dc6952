"""KaaS as the routes see it: run a request, list libraries, and the buffer API."""
from __future__ import annotations

import logging
import time
from typing import Any

from accel.errors import NotReady

from ..metrics import Outcome
from .buffers import BufferInfo
from .executor import Executor, KaasResult
from .model import parse_request
from .store import DEFAULT_TENANT

log = logging.getLogger(__name__)


class KaasService:
    """Kernel-as-a-Service over one runner; ``load()`` (compile every kernel) before it serves.

    Args:
        executor: runs requests; its libraries, runner, buffers and metrics are the service's too.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.libraries, self.runner = executor.libraries, executor.runner
        self.buffers, self.metrics = executor.buffers, executor.metrics
        self.ready = False
        self.load_seconds = 0.0

    @property
    def device(self) -> str:
        return self.runner.name

    def load(self) -> None:
        """Compile every kernel of every library (NVRTC on CUDA); KaaS serves afterwards."""
        start = time.perf_counter()
        self.runner.load(self.libraries.libraries())
        self.load_seconds = time.perf_counter() - start
        self.ready = True
        log.info("kaas ready on %s: libraries %s (load %.3f s)", self.runner.name,
                 ", ".join(self.libraries.names()), self.load_seconds)

    def run(self, doc: Any, tenant: str = DEFAULT_TENANT) -> KaasResult:
        """Parse, check and run a request in the KaaS format (decoded JSON).

        Raises:
            NotReady: before ``load``.
            InvalidInput, OpNotFound, InsufficientStorage, InternalError: see Executor.run.
        """
        start = time.perf_counter()
        outcome = Outcome()
        try:
            with outcome:
                if not self.ready:
                    raise NotReady("KaaS is compiling its kernels")
                return self.executor.run(parse_request(doc), tenant)
        finally:
            self.metrics.requests.labels(str(outcome.status)).inc()
            if outcome.status == 200:
                self.metrics.latency.observe(time.perf_counter() - start)

    def describe_libraries(self) -> dict[str, object]:
        return {"device": self.runner.name, "libraries": [lib.as_json() for lib in self.libraries.libraries()]}

    # --- buffers ------------------------------------------------------------------------
    def put_buffer(self, key: str, data: bytes, tenant: str = DEFAULT_TENANT) -> None:
        self.buffers.put(key, data, tenant)

    def get_buffer(self, key: str, tenant: str = DEFAULT_TENANT) -> bytes:
        return self.buffers.get(key, tenant)

    def delete_buffer(self, key: str, tenant: str = DEFAULT_TENANT) -> None:
        self.buffers.delete(key, tenant)

    def list_buffers(self, tenant: str = DEFAULT_TENANT) -> list[BufferInfo]:
        return self.buffers.list(tenant)

    def usage(self, tenant: str = DEFAULT_TENANT) -> dict[str, int]:
        store, cache = self.buffers.store, self.buffers.cache
        return {"store_bytes": store.used_bytes(), "tenant_bytes": store.used_bytes(tenant),
                "store_capacity_bytes": store.capacity_bytes, "gpu_cache_bytes": cache.used_bytes,
                "gpu_cache_capacity_bytes": cache.capacity_bytes}
