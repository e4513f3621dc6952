"""Builders of KaaS requests and of KaaS services, shared by the CPU and GPU tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from shim.kaas import KaasService, build_kaas


def new_kaas(device: str = "cpu", **kw: Any) -> KaasService:
    """A loaded KaaS service with a registry of its own."""
    kaas = build_kaas(device, kw.pop("registry", None) or CollectorRegistry(), **kw)
    kaas.load()
    return kaas


def buf(name: str, size: int | None = None, **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, **kw}
    if size is not None:
        spec["size"] = size
    return spec


def kernel(library: str, name: str, args: list[tuple[dict[str, Any], str]], literals: list[tuple[str, Any]],
           grid: Any = 1, block: Any = 128, **kw: Any) -> dict[str, Any]:
    return {"library": library, "kernel": name, "arguments": [[b, t] for b, t in args],
            "literals": [{"type": t, "val": v} for t, v in literals], "nGrid": grid, "nBlock": block, **kw}


def jacobi_system(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A strictly diagonally dominant float32 system (Jacobi converges)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    a[np.diag_indices(n)] = np.abs(a).sum(axis=1) + 1.0
    return a, rng.uniform(-1, 1, n).astype(np.float32)


def jacobi_request(n: int, steps: int, a_key: str = "A", b_key: str = "b", x_key: str = "x",
                   grid: int = 8) -> dict[str, Any]:
    """``steps`` Jacobi steps (even) from x: x -> xn -> x, ``steps // 2`` times; A const."""
    lit = [("i", n)]
    a, b = buf("A", n * n * 4, key=a_key, const=True), buf("b", n * 4, key=b_key)
    x, xn = buf("x", n * 4, key=x_key), buf("xn", n * 4, ephemeral=True)
    return {"kernels": [kernel("jacobi", "jacobi_step", [(a, "i"), (b, "i"), (x, "i"), (xn, "o")], lit, grid),
                        kernel("jacobi", "jacobi_step", [(a, "i"), (b, "i"), (xn, "i"), (x, "o")], lit, grid)],
            "nIter": steps // 2}


def sgemm_kernel(m: int, n: int, k: int, a: dict[str, Any], b: dict[str, Any], c: dict[str, Any],
                 c_type: str = "o") -> dict[str, Any]:
    return kernel("blas", "sgemm", [(a, "i"), (b, "i"), (c, c_type)], [("i", m), ("i", n), ("i", k)],
                  grid=[(n + 15) // 16, (m + 15) // 16], block=[16, 16])


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def write_library(root: Path, name: str, cu: str, reference: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "kernels.cu").write_text(cu)
    (folder / "reference.py").write_text(reference)
    return folder
