"""CUDA, cuBLAS and onnxruntime failures mapped to the shim's errors, once, for every CUDA module."""
from __future__ import annotations

import re
from contextlib import contextmanager, suppress
from typing import Any, Iterator

import cupy as cp

from accel.errors import AccelError, InternalError, NotReady

from ..faults import DeviceLost

#: CUDA errors after which the context is unusable (illegal address, device assert, launch
#: failure, ECC, ...): the process must restart.
STICKY_CUDA_ERRORS = {214, 700, 702, 709, 710, 714, 715, 716, 717, 718, 719}
#: out of memory: the runtime's cudaErrorMemoryAllocation and the driver's CUDA_ERROR_OUT_OF_MEMORY
OUT_OF_MEMORY = 2
_ORT_CUDA_ERROR = re.compile(r"CUDA (?:failure|error) (\d+)")
_OUT_OF_MEMORY_TEXT = re.compile(r"Failed to allocate memory|out of memory|CUBLAS_STATUS_ALLOC_FAILED", re.I)


@contextmanager
def device_errors(pool: Any = None) -> Iterator[None]:
    """Map CUDA, cuBLAS and onnxruntime failures to the shim's errors: sticky ones DeviceLost, out
    of memory (cupy's pool, a runtime or driver call, cuBLAS, onnxruntime's arena) NotReady, a 503
    to retry (``pool``'s cached blocks are freed first, where it lets them: the CUDA backend's
    ``CaptureSafePool`` does not while a graph may be being captured), any other InternalError."""
    try:
        yield
    except AccelError:
        raise
    except cp.cuda.memory.OutOfMemoryError as exc:
        raise _held(exc, pool) from exc
    except (cp.cuda.runtime.CUDARuntimeError, cp.cuda.driver.CUDADriverError) as exc:  # same codes
        if exc.status in STICKY_CUDA_ERRORS:
            raise DeviceLost(f"CUDA error {exc.status}: {exc}") from exc
        if exc.status == OUT_OF_MEMORY:
            raise _held(exc, pool) from exc
        raise InternalError(f"CUDA error {exc.status}: {exc}") from exc
    except Exception as exc:  # cuBLAS, NVRTC, onnxruntime: classified by their message
        match = _ORT_CUDA_ERROR.search(str(exc))
        if match and int(match.group(1)) in STICKY_CUDA_ERRORS:
            raise DeviceLost(f"CUDA error {match.group(1)} in {type(exc).__name__}: {exc}") from exc
        if type(exc).__module__.startswith(("cupy", "onnxruntime")):
            if (match and int(match.group(1)) == OUT_OF_MEMORY) or _OUT_OF_MEMORY_TEXT.search(str(exc)):
                raise _held(exc, pool) from exc
            raise InternalError(f"{type(exc).__name__}: {exc}") from exc
        raise


def _held(exc: BaseException, pool: Any) -> NotReady:
    """Out of GPU memory: a 503 to retry, once ``pool``'s cached blocks are given back."""
    if pool is not None:
        with suppress(Exception):  # the answer stands whatever the freeing does
            pool.free_all_blocks()
    return NotReady(f"out of memory for now, on the GPU or in its pinned host memory ({exc}); retry",
                    retry_after=0.1)
