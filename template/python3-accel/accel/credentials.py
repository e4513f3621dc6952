"""The client's bearer token, and the secret file it comes from, which the platform may rotate.

A token given to the client, or in ``$ACCEL_TOKEN``, is fixed. A token in a file (the OpenFaaS secret
``/var/openfaas/secrets/accel-token``, or ``$ACCEL_TOKEN_FILE``) is read when the client is made and
again whenever the shim refuses it (401): Kubernetes rotates a mounted Secret in place (it writes a
new directory and swaps the volume's ``..data`` symlink), so the same path then names the new token.
The file is opened anew each time and never watched: a call costs no ``stat``, and only a refused
call pays for the read.

A file that cannot be read never fails the client's construction (a shim without ``--tokens`` needs
no token, and a secret mounted late or fixed later is picked up at the next refusal): the problem
is logged once, and a refused call raises ``Unauthorized`` naming it.
"""
from __future__ import annotations

import os
import re
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import logging
    from typing import Mapping

#: where OpenFaaS mounts the function's secret ``accel-token`` (stack.yml: ``secrets: [accel-token]``)
SECRET_FILE = "/var/openfaas/secrets/accel-token"


def read_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The token a client would send: from ``$ACCEL_TOKEN``, else from the file ``$ACCEL_TOKEN_FILE``
    (default SECRET_FILE); None when neither holds one a header can carry (a file that cannot be
    read included)."""
    return Credentials.from_environment(environ).token


class Credentials:
    """The token a client sends, and where it came from; shared by the client's threads.

    Args:
        token: the token to send, fixed ('' or None: none); ``path`` then is None.
        path: the file to read the token from (``token`` is then ignored).
        named: whether ``path`` was asked for (``$ACCEL_TOKEN_FILE``) rather than the default
            SECRET_FILE, whose absence is no problem as such: a shim without tokens needs none.
        source: what the fixed token is, for error messages (e.g. ``$ACCEL_TOKEN``).
    """

    def __init__(self, token: str | None = None, path: str | None = None, *, named: bool = True,
                 source: str = "") -> None:
        self.path = path
        self._named = named
        self._source = source
        self._lock = threading.Lock()
        self._problem: str | None = None  # why the file's last read gave no token
        self.token: str | None = None if path is not None else (token or None)
        if path is not None:
            self.token = self._read(quiet=not named)
        elif self.token is not None and not _TOKEN.fullmatch(self.token):  # it could not go in a header
            self._problem = f"{source or 'the token given'} {_NOT_A_TOKEN}"
            self.token = None
            _log().warning("accel: %s; calls go without a token (a shim with --tokens refuses them: 401)",
                           self._problem)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Credentials":
        """``$ACCEL_TOKEN`` (fixed), else the file ``$ACCEL_TOKEN_FILE``, else SECRET_FILE."""
        env = os.environ if environ is None else environ
        if env.get("ACCEL_TOKEN"):
            return cls(env["ACCEL_TOKEN"].strip(), source="$ACCEL_TOKEN")
        return cls(path=env.get("ACCEL_TOKEN_FILE") or SECRET_FILE, named=bool(env.get("ACCEL_TOKEN_FILE")))

    def renew(self, refused: str | None) -> str | None:
        """After the shim refused ``refused`` (401): the token to send instead, once, or None.

        The file is read again; a token other than the refused one is returned (and sent from then
        on). A fixed token, an unchanged or empty file, or one that cannot be read give None: a
        retry would only be refused again. A file that cannot be read leaves the last token it gave
        in use, so that a passing failure (EMFILE, say) does not cost the calls that still work.
        """
        if self.path is None:
            return None
        with self._lock:
            if self.token is not None and self.token != refused:  # another thread renewed it already
                return self.token
            fresh = self._read(quiet=False)
            if fresh is None or fresh == refused:
                return None
            _log().info("accel: the shim refused the token; %s holds a new one (the secret was rotated "
                        "or mounted): sending that from now on", self.path)
            self.token = fresh
            return fresh

    def explain(self) -> str:
        """Why a token may have been refused, for the Unauthorized message ('' when nothing is known)."""
        if self.path is None:
            if self._problem is not None:
                return f"{self._problem}; the client sends no token"
            return f"the token from {self._source}" if self._source and self.token else \
                ("" if self.token else "this client has no token")
        problem = self._problem
        if problem is None:
            return f"the token from {self.path}, as it reads now"
        if self.token is not None:
            return f"{problem}; the client still sends the token it read from it before"
        if not self._named and problem == _MISSING.format(self.path):
            return (f"this client has no token: set $ACCEL_TOKEN, or mount the secret accel-token as "
                    f"{SECRET_FILE}, or name its file in $ACCEL_TOKEN_FILE")
        return f"{problem}; the client sends no token"

    def _read(self, quiet: bool) -> str | None:
        """The file's token, or None with the problem noted; a problem is logged once (``quiet``: a
        missing default file is not logged until the shim asks for a token)."""
        path: str = self.path  # type: ignore[assignment]
        token, problem = _read_file(path)
        self._problem = problem
        if problem is None:
            _reported.pop(path, None)  # the next problem is news again
        elif not (quiet and problem == _MISSING.format(path)):
            with _reported_lock:
                news = _reported.get(path) != problem
                _reported[path] = problem
            if news:
                kept = "calls keep the token read before" if self.token is not None else "calls go without a token"
                _log().warning("accel: %s; %s (a shim with --tokens refuses them: 401)", problem, kept)
        return token


#: token file -> the problem last logged for it: each is logged once per process, whichever client
#: (or thread) meets it, not once per call
_reported: dict[str, str] = {}
_reported_lock = threading.Lock()
_MISSING = "the token file {} does not exist"


def _read_file(path: str) -> tuple[str | None, str | None]:
    """``(token, None)``, or ``(None, why not)`` for a file that is missing, unreadable or empty."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except FileNotFoundError:
        return None, _MISSING.format(path)
    except OSError as exc:
        return None, f"cannot read the token file {path}: {exc.strerror or exc}"
    except UnicodeDecodeError:
        return None, f"the token file {path} is not UTF-8 text"
    token = text.strip()
    if not token:
        return None, f"the token file {path} is empty"
    if not _TOKEN.fullmatch(token):
        return None, f"the token file {path} {_NOT_A_TOKEN}"
    return token, None


_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII, no spaces: what a header carries and --tokens holds
_NOT_A_TOKEN = "holds no bearer token (a second line, spaces or characters other than visible ASCII)"


def _log() -> logging.Logger:
    import logging  # noqa: PLC0415 - only when there is something to say: not on every cold start

    return logging.getLogger("accel")
