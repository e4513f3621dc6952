"""elementwise: the numpy twins of kernels.cu (float32 vectors of n elements)."""
import numpy as np

from shim.kaas.signature import Arg, Kernel


def axpy(n, alpha, x, y):
    y += np.float32(alpha) * x


def scale(n, alpha, x, y):
    np.multiply(np.float32(alpha), x, out=y)


def relu(n, x, y):
    np.maximum(x, np.float32(0), out=y)


def add(n, x, y, z):
    np.add(x, y, out=z)


def mul(n, x, y, z):
    np.multiply(x, y, out=z)


def fill(n, value, y):
    y[:] = np.float32(value)


def copy(n, x, y):
    y[:] = x


def _vec(name, access):
    return Arg(name, access, "float32", "n")


KERNELS = [
    Kernel("axpy", "n:Q alpha:f", [_vec("x", "i"), _vec("y", "io")], axpy, doc="y = alpha * x + y"),
    Kernel("scale", "n:Q alpha:f", [_vec("x", "i"), _vec("y", "o")], scale, doc="y = alpha * x"),
    Kernel("relu", "n:Q", [_vec("x", "i"), _vec("y", "o")], relu, doc="y = max(x, 0)"),
    Kernel("add", "n:Q", [_vec("x", "i"), _vec("y", "i"), _vec("z", "o")], add, doc="z = x + y"),
    Kernel("mul", "n:Q", [_vec("x", "i"), _vec("y", "i"), _vec("z", "o")], mul, doc="z = x * y"),
    Kernel("fill", "n:Q value:f", [_vec("y", "o")], fill, doc="y = value"),
    Kernel("copy", "n:Q", [_vec("x", "i"), _vec("y", "o")], copy, doc="y = x"),
]
