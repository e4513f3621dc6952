"""Kernel signatures: what a kernel library declares about each kernel, checked before any launch.

A library's ``reference.py`` declares every kernel of its ``kernels.cu`` as a :class:`Kernel`:
its literals (name and type), its buffer arguments (name, access, dtype, element count as an
expression of the literals) and the numpy function that computes the same result::

    Kernel("axpy", literals="n:Q alpha:f",
           args=[Arg("x", "i", "float32", "n"), Arg("y", "io", "float32", "n")], reference=axpy)

The CUDA kernel takes the literals first, then the buffers, in declaration order; the reference
takes the same values (literals as Python numbers, buffers as 1-D numpy views of ``count``
elements that it reads and writes in place).
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

# literal type codes of the KaaS request format -> numpy scalar type (and C type, for the docs)
LITERAL_TYPES: dict[str, type[np.generic]] = {"i": np.int32, "f": np.float32, "d": np.float64, "Q": np.uint64}
C_TYPES = {"i": "int", "f": "float", "d": "double", "Q": "unsigned long long"}
ACCESS = ("i", "o", "io")
DTYPES = ("float32", "float64", "int32", "int64", "uint32", "uint64", "uint8")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

_BINOPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod}
_CALLS: dict[str, Callable[..., int]] = {"min": min, "max": max}


class CountExpr:
    """An element count: integers, literal names, ``+ - * // %``, ``min``/``max``, parentheses."""

    def __init__(self, text: str, names: set[str]) -> None:
        self.text = text
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"count {text!r} is not an expression: {exc.msg}") from None
        self._check(tree.body, names)
        self._tree = tree.body

    def _check(self, node: ast.AST, names: set[str]) -> None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise ValueError(f"count {self.text!r} names {node.id!r}, which is not a literal")
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            self._check(node.left, names)
            self._check(node.right, names)
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS
                and node.args and not node.keywords):
            for a in node.args:
                self._check(a, names)
            return
        raise ValueError(f"count {self.text!r}: only integers, literal names, + - * // %, min and max")

    def evaluate(self, values: Mapping[str, int | float]) -> int:
        """The count for these literal values; raises ValueError when it is not an integer >= 0."""
        result = self._eval(self._tree, values)
        if not isinstance(result, (int, np.integer)) or isinstance(result, bool):
            raise ValueError(f"count {self.text!r} is not an integer for these literals")
        return int(result)

    def _eval(self, node: ast.AST, values: Mapping[str, int | float]) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            value = values[node.id]
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"count {self.text!r} uses {node.id}={value}, not an integer")
            return int(value)
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, values), self._eval(node.right, values)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
                raise ValueError(f"count {self.text!r} divides by zero for these literals")
            return _BINOPS[type(node.op)](left, right)
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return _CALLS[node.func.id](*(self._eval(a, values) for a in node.args))


@dataclass(frozen=True)
class Arg:
    """A buffer argument: ``access`` is ``i`` (read), ``o`` (written) or ``io`` (both)."""

    name: str
    access: str
    dtype: str
    count: str

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


@dataclass
class Kernel:
    """One kernel of a library: its signature and its numpy reference.

    Args:
        name: the ``extern "C" __global__`` function name in ``kernels.cu``.
        literals: ``"name:type name:type"`` (types i, f, d, Q), in the order the kernel takes them.
        args: the buffer arguments, after the literals.
        reference: numpy function with the same arguments that computes the same result.
        block: a block shape the kernel requires (e.g. ``(16, 16, 1)`` for a 16x16 tile), or None.
        block_multiple: ``blockDim.x`` must be a multiple of this (32: one warp per row).
        doc: one line for ``GET /v1/kaas/libraries``.
    """

    name: str
    literals: str
    args: list[Arg]
    reference: Callable[..., None]
    block: tuple[int, int, int] | None = None
    block_multiple: int = 1
    doc: str = ""
    literal_specs: list[tuple[str, str]] = field(init=False)
    counts: list[CountExpr] = field(init=False)

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"kernel name {self.name!r} is not a C identifier")
        self.literal_specs = []
        for item in self.literals.split():
            lname, _, ltype = item.partition(":")
            if not NAME.match(lname) or ltype not in LITERAL_TYPES:
                raise ValueError(f"kernel {self.name}: literal {item!r} must be name:type with type in i f d Q")
            self.literal_specs.append((lname, ltype))
        names = [n for n, _ in self.literal_specs] + [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise ValueError(f"kernel {self.name}: two literals or arguments have the same name")
        for a in self.args:
            if a.access not in ACCESS or a.dtype not in DTYPES or not NAME.match(a.name):
                raise ValueError(f"kernel {self.name}: argument {a.name!r} needs access in {ACCESS} "
                                 f"and dtype in {DTYPES}")
        int_literals = {n for n, t in self.literal_specs if t in ("i", "Q")}
        self.counts = [CountExpr(a.count, int_literals) for a in self.args]
        if self.block_multiple < 1:
            raise ValueError(f"kernel {self.name}: block_multiple must be >= 1")

    def literal_values(self, values: list[int | float]) -> dict[str, int | float]:
        return {n: v for (n, _), v in zip(self.literal_specs, values)}

    def as_json(self) -> dict[str, object]:
        """The signature as ``GET /v1/kaas/libraries`` shows it."""
        return {
            "name": self.name, "doc": self.doc,
            "literals": [{"name": n, "type": t, "ctype": C_TYPES[t]} for n, t in self.literal_specs],
            "arguments": [{"name": a.name, "type": a.access, "dtype": a.dtype, "count": a.count} for a in self.args],
            **({"blockDim": list(self.block)} if self.block else {}),
            **({"blockDimMultipleX": self.block_multiple} if self.block_multiple > 1 else {}),
        }
