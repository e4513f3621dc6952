"""blas: the numpy twins of kernels.cu (row-major float32 matrices as flat buffers)."""
import numpy as np

from shim.kaas.signature import Arg, Kernel


def sgemm(M, N, K, A, B, C):
    np.matmul(A.reshape(M, K), B.reshape(K, N), out=C.reshape(M, N))


KERNELS = [
    Kernel("sgemm", "M:i N:i K:i",
           [Arg("A", "i", "float32", "M*K"), Arg("B", "i", "float32", "K*N"), Arg("C", "o", "float32", "M*N")],
           sgemm, block=(16, 16, 1), doc="C = A @ B (row-major, A MxK, B KxN); blockDim [16, 16, 1]"),
]
