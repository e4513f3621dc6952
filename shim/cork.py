"""Writes held back while a thread answers several calls at once (``corked``): a writer asks ``hold``
to keep what it would write now, and what one writer held goes out in one flush at the end of the
block (the device's replies to one request worker, a batch's, in one write instead of one per call).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Hashable, Iterator

log = logging.getLogger(__name__)

Flush = Callable[[list[Any]], None]

_local = threading.local()


@contextlib.contextmanager
def corked() -> Iterator[None]:
    """Within the block, what this thread's writers ``hold`` waits for its end, then goes out writer
    by writer in the order held, however the block ends (a flush that fails is logged; the others
    still go). Nested blocks are one: the outermost flushes."""
    if getattr(_local, "held", None) is not None:
        yield
        return
    held: dict[Hashable, tuple[Flush, list[Any]]] = {}
    _local.held = held
    try:
        yield
    finally:
        _local.held = None
        for flush, parts in held.values():
            try:
                flush(parts)
            except Exception:  # noqa: BLE001 - that writer's (it says how it failed); the others go on
                log.exception("writes held back for a batch's answers could not go out")


def hold(writer: Hashable, parts: list[Any], flush: Flush) -> bool:
    """Keep ``parts`` for ``flush(all parts writer held)`` at the end of this thread's ``corked``
    block; False (nothing held: the caller writes now) outside one."""
    held: dict[Hashable, tuple[Flush, list[Any]]] | None = getattr(_local, "held", None)
    if held is None:
        return False
    entry = held.get(writer)
    if entry is None:
        held[writer] = (flush, list(parts))
    else:
        entry[1].extend(parts)
    return True
