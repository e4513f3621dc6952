"""Kernel libraries: folders of CUDA C plus numpy references, registered by the operator by name.

A library is a folder ``<name>/`` with ``kernels.cu`` (every kernel ``extern "C" __global__``) and
``reference.py`` (``KERNELS``: a list of :class:`~shim.kaas.signature.Kernel`). The built-ins are
the folders of ``shim/kernels/``; ``--kernels DIR`` adds the library folders in ``DIR`` (or ``DIR``
itself when it is one). Requests name libraries, never paths.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from accel.errors import OpNotFound

from .model import LIBRARY_NAME
from .signature import Kernel

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "kernels"
SOURCE, REFERENCE = "kernels.cu", "reference.py"
_GLOBAL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(')


@dataclass
class Library:
    """One loaded library: its CUDA source and its kernels by name."""

    name: str
    path: Path
    source: str
    kernels: dict[str, Kernel]

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "kernels": [k.as_json() for k in self.kernels.values()]}


class LibraryRegistry:
    """The libraries a shim serves, looked up by name."""

    def __init__(self, libraries: Iterable[Library]) -> None:
        self._libs: dict[str, Library] = {}
        for lib in libraries:
            if lib.name in self._libs:
                raise ValueError(f"two kernel libraries are named {lib.name!r}: {self._libs[lib.name].path} "
                                 f"and {lib.path}")
            self._libs[lib.name] = lib

    @classmethod
    def discover(cls, extra_dirs: Iterable[Path] = ()) -> "LibraryRegistry":
        """The built-in libraries plus those found in ``extra_dirs``.

        Raises:
            ValueError: a library folder that is malformed, or two libraries with one name.
        """
        folders = _library_folders(BUILTIN_DIR)
        for d in extra_dirs:
            d = Path(d)
            if not d.is_dir():
                raise ValueError(f"--kernels {d}: not a folder")
            found = _library_folders(d)
            if not found:
                raise ValueError(f"--kernels {d}: no library folder (with {SOURCE} and {REFERENCE}) in it")
            folders += found
        return cls(load_library(f) for f in folders)

    def names(self) -> list[str]:
        return list(self._libs)

    def libraries(self) -> list[Library]:
        return list(self._libs.values())

    def kernel(self, library: str, kernel: str) -> Kernel:
        """The kernel ``library.kernel``; raises OpNotFound naming what exists."""
        lib = self._libs.get(library)
        if lib is None:
            raise OpNotFound(f"unknown kernel library {library!r}; registered: {', '.join(self._libs)}")
        k = lib.kernels.get(kernel)
        if k is None:
            raise OpNotFound(f"library {library!r} has no kernel {kernel!r}; it has {', '.join(lib.kernels)}")
        return k


def _library_folders(root: Path) -> list[Path]:
    if (root / REFERENCE).is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / REFERENCE).is_file())


def load_library(folder: Path) -> Library:
    """Load one library folder: its source, its reference module, and check that they agree.

    Raises:
        ValueError: a bad name, a missing file, or a declared kernel that ``kernels.cu`` lacks.
    """
    name = folder.name
    if not LIBRARY_NAME.match(name):
        raise ValueError(f"kernel library folder {folder}: the name must match {LIBRARY_NAME.pattern}")
    if not (folder / SOURCE).is_file():
        raise ValueError(f"kernel library {folder}: no {SOURCE}")
    source = (folder / SOURCE).read_text()
    spec = importlib.util.spec_from_file_location(f"accelshim_kernels_{name}", folder / REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernels = getattr(module, "KERNELS", None)
    if not isinstance(kernels, list) or not all(isinstance(k, Kernel) for k in kernels) or not kernels:
        raise ValueError(f"kernel library {folder}: {REFERENCE} must define KERNELS, a list of Kernel")
    defined = set(_GLOBAL.findall(source))
    missing = [k.name for k in kernels if k.name not in defined]
    if missing:
        raise ValueError(f"kernel library {folder}: {SOURCE} has no extern \"C\" __global__ {missing[0]}")
    by_name = {k.name: k for k in kernels}
    if len(by_name) != len(kernels):
        raise ValueError(f"kernel library {folder}: two kernels with one name")
    log.info("kernel library %s: %s (%s)", name, ", ".join(by_name), folder)
    return Library(name, folder, source, by_name)
