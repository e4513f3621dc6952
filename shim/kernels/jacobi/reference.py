"""jacobi: the numpy twins of kernels.cu (float32; sums accumulate in float32 as the kernels do)."""
import numpy as np

from shim.kaas.signature import Arg, Kernel


def jacobi_step(N, A, b, x, x_new):
    a = A.reshape(N, N)
    diag = np.diagonal(a)
    x_new[:] = (b - (a @ x - diag * x)) / diag


def residual(N, A, b, x, r):
    r[:] = b - A.reshape(N, N) @ x


_ARGS = [Arg("A", "i", "float32", "N*N"), Arg("b", "i", "float32", "N"), Arg("x", "i", "float32", "N")]

KERNELS = [
    Kernel("jacobi_step", "N:i", _ARGS + [Arg("x_new", "o", "float32", "N")], jacobi_step, block_multiple=32,
           doc="x_new = (b - (A - diag(A)) x) / diag(A): one Jacobi step; a solve is a graph with nIter"),
    Kernel("residual", "N:i", _ARGS + [Arg("r", "o", "float32", "N")], residual, block_multiple=32,
           doc="r = b - A x"),
]
