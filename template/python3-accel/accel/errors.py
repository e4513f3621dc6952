"""Typed errors shared by the shim and the client.

The shim raises these deep inside and maps them to HTTP statuses once, at its edge; the client maps
statuses back to the same classes, so a function sees ``accel.InvalidInput`` for what the shim
rejected as invalid input.
"""
from __future__ import annotations


class AccelError(Exception):
    """Base class: every error of the shim or the client. ``status`` is its HTTP status."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.retry_after = retry_after


class InvalidInput(AccelError):
    """The request is malformed or its tensors do not fit the op (400)."""

    status = 400


class Unauthorized(AccelError):
    """No valid credentials (401)."""

    status = 401


class Forbidden(AccelError):
    """Valid credentials, but not for this resource (403)."""

    status = 403


class OpNotFound(AccelError):
    """No op, model or resource of that name (404)."""

    status = 404


class PayloadTooLarge(AccelError):
    """The request body or an image is over a configured limit (413)."""

    status = 413


class QuotaExceeded(AccelError):
    """Over a quota or the queue is full; retry later (429)."""

    status = 429


class InternalError(AccelError):
    """A bug in the shim (500)."""

    status = 500


class NotReady(AccelError):
    """The shim or the op is not ready yet (warming up, draining); retry (503)."""

    status = 503


class InsufficientStorage(AccelError):
    """The device or store cannot hold what the request needs (507)."""

    status = 507


class DeadlineExceeded(AccelError):
    """The request's deadline passed before the shim could start on it (504); nothing was done."""

    status = 504


class ShimUnavailable(AccelError):
    """The client could not reach the shim at all (connection refused, timed out)."""

    status = 503


_BY_STATUS: dict[int, type[AccelError]] = {
    cls.status: cls
    for cls in (InvalidInput, Unauthorized, Forbidden, OpNotFound, PayloadTooLarge, QuotaExceeded,
                InternalError, NotReady, InsufficientStorage, DeadlineExceeded)
}


def error_for_status(status: int, message: str, retry_after: float | None = None) -> AccelError:
    """The exception that a response with ``status`` stands for."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidInput if 400 <= status < 500 else AccelError
    return cls(message, status=status, retry_after=retry_after)
