"""CUDA, cuBLAS and onnxruntime failures mapped to the shim's errors, once, for every CUDA module."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

import cupy as cp

from accel.errors import AccelError, InternalError, NotReady

from ..faults import DeviceLost

#: CUDA errors after which the context is unusable (illegal address, device assert, launch
#: failure, ECC, ...): the process must restart.
STICKY_CUDA_ERRORS = {214, 700, 702, 709, 710, 714, 715, 716, 717, 718, 719}
_ORT_CUDA_ERROR = re.compile(r"CUDA (?:failure|error) (\d+)")


@contextmanager
def device_errors(pool: Any = None) -> Iterator[None]:
    """Map CUDA, cuBLAS and onnxruntime failures to the shim's errors (sticky ones: DeviceLost)."""
    try:
        yield
    except AccelError:
        raise
    except cp.cuda.memory.OutOfMemoryError as exc:
        if pool is not None:
            pool.free_all_blocks()
        raise NotReady(f"GPU memory is held by other requests right now ({exc}); retry", retry_after=0.1) from exc
    except (cp.cuda.runtime.CUDARuntimeError, cp.cuda.driver.CUDADriverError) as exc:  # same codes
        if exc.status in STICKY_CUDA_ERRORS:
            raise DeviceLost(f"CUDA error {exc.status}: {exc}") from exc
        raise InternalError(f"CUDA error {exc.status}: {exc}") from exc
    except Exception as exc:  # cuBLAS, NVRTC, onnxruntime: classified by their message
        match = _ORT_CUDA_ERROR.search(str(exc))
        if match and int(match.group(1)) in STICKY_CUDA_ERRORS:
            raise DeviceLost(f"CUDA error {match.group(1)} in {type(exc).__name__}: {exc}") from exc
        if type(exc).__module__.startswith(("cupy", "onnxruntime")):
            raise InternalError(f"{type(exc).__name__}: {exc}") from exc
        raise
