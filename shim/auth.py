"""Tenants and their bearer tokens: ``accelshim serve --tokens FILE``.

The file has one tenant a line, ``NAME: TOKEN [TOKEN ...] [limit=value ...]``, ``#`` starting a
comment. A TOKEN is either ``sha256:<64 hex digits>`` (the digest of the token, so the file holds no
secret) or the token itself (at least 16 characters); a tenant may have several, each valid (while
a token is rotated: the old and the new; none of the form ``name=value``). Optional per-tenant
limits, after the tokens, override the global ``--tenant-*`` ones: ``max_inflight``,
``max_queue``, ``max_body_bytes``, ``max_buffer_bytes``::

    # tenant: token(s)
    alice: sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    bob:   s3cr3t-t0ken-of-bob-0123 max_inflight=2 max_buffer_bytes=1048576
    carol: sha256:<the old one's digest> sha256:<the new one's>

Only SHA-256 digests are kept in memory; a presented token is hashed and compared against every
tenant's digest in constant time (``hmac.compare_digest``, no early exit). A running shim reads the
file again when it changes (``reload_when_changed``: a Kubernetes Secret updated in place), keeping
the tokens it has when the new file cannot be used.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

from accel.errors import Unauthorized

log = logging.getLogger(__name__)

#: the tenant of every request when the shim runs without ``--tokens``
DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_TOKEN_CHARS = 16
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's own limits; None: the shim's ``--tenant-*`` default."""

    max_inflight: int | None = None
    max_queue: int | None = None
    max_body_bytes: int | None = None
    max_buffer_bytes: int | None = None


@dataclass(frozen=True)
class Tenant:
    """An authenticated caller."""

    name: str
    limits: TenantLimits = TenantLimits()


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the file and line."""


def hash_token(token: str) -> str:
    """The ``sha256:<hex>`` form of ``token``, for the tokens file."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


RELOAD_INTERVAL_S = 5.0  # how often a running shim looks whether its tokens file changed
_COMMENT = re.compile(r"(?:^|\s)#")
#: a per-tenant option (``name=value``, known or not): what ends a line's tokens
_OPTION = re.compile(r"^[A-Za-z_]+=")


class TokenStore:
    """Tenant name -> token digest (and limits); answers who a bearer token belongs to."""

    def __init__(self, tenants: Mapping[str, tuple[Sequence[bytes], TenantLimits]]) -> None:
        self._tenants = [Tenant(name, limits) for name, (_, limits) in tenants.items()]
        self._entries = [(tenant, digest) for tenant, (digests, _) in zip(self._tenants, tenants.values())
                         for digest in digests]

    def names(self) -> list[str]:
        return [tenant.name for tenant in self._tenants]

    def tenant(self, name: str) -> Tenant | None:
        return next((t for t in self._tenants if t.name == name), None)

    @classmethod
    def load(cls, path: Path) -> "TokenStore":
        """Read a tokens file (see the module docstring); raises TokenFileError or OSError."""
        text = Path(path).read_text(encoding="utf-8")
        store = cls.parse(text, str(path))
        mode = Path(path).stat().st_mode
        if store._has_plain and mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("%s holds plain tokens and is readable by others (mode %o): chmod 600 it, or store "
                        "sha256: digests instead", path, stat.S_IMODE(mode))
        return store

    @classmethod
    def parse(cls, text: str, source: str = "<tokens>") -> "TokenStore":
        tenants: dict[str, tuple[list[bytes], TenantLimits]] = {}
        seen: dict[bytes, str] = {}
        plain = False
        for number, line in enumerate(text.splitlines(), 1):
            line = _COMMENT.split(line, 1)[0].strip()  # '#' starts a comment only after a space
            if not line:
                continue
            where = f"{source}:{number}"
            name, sep, rest = line.partition(":")
            name, words = name.strip(), rest.split()
            if not sep or not words:
                raise TokenFileError(f"{where}: expected 'tenant: token', got {line[:40]!r}")
            if not TENANT_NAME.match(name):
                raise TokenFileError(f"{where}: tenant name {name!r} must match {TENANT_NAME.pattern}")
            if name in tenants:
                raise TokenFileError(f"{where}: tenant {name!r} appears twice")
            count = next((i for i, word in enumerate(words) if _OPTION.match(word)), len(words))
            tokens, options = words[:count], words[count:]
            if not tokens:
                raise TokenFileError(f"{where}: tenant {name!r} has no token before its options")
            digests = []
            for token in tokens:
                match = _DIGEST.match(token)
                if match:
                    digest = bytes.fromhex(match.group(1))
                elif token.startswith("sha256:"):
                    raise TokenFileError(f"{where}: a sha256: digest has 64 hex digits")
                elif len(token) < MIN_TOKEN_CHARS:
                    raise TokenFileError(f"{where}: a token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
                else:
                    digest, plain = hashlib.sha256(token.encode("utf-8")).digest(), True
                if digest in seen:
                    other = seen[digest]
                    raise TokenFileError(f"{where}: tenant {name!r} has the same token twice" if other == name else
                                         f"{where}: tenants {other!r} and {name!r} have the same token")
                seen[digest] = name
                digests.append(digest)
            tenants[name] = (digests, _limits(options, where))
        if not tenants:
            raise TokenFileError(f"{source}: no tenant in the tokens file")
        store = cls(tenants)
        store._has_plain = plain
        return store

    _has_plain = False

    def reload_when_changed(self, path: Path, interval_s: float = RELOAD_INTERVAL_S) -> None:
        """Read ``path`` again whenever it changes (its inode, size or time, the link followed: a
        Kubernetes Secret's swap), checked every ``interval_s`` on a thread of its own that ends with
        this store; the new tenants and tokens replace these at once. A file that cannot be used is
        logged (once per version of it) and these stay."""
        ref = weakref.ref(self)
        threading.Thread(target=_watch, args=(ref, Path(path), interval_s, _signature(Path(path))),
                         name="tokens-reload", daemon=True).start()

    def _replace(self, other: "TokenStore") -> None:
        self._tenants, self._entries, self._has_plain = other._tenants, other._entries, other._has_plain

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <token>`` header value.

        Raises:
            Unauthorized: no header, not a bearer token, or a token of no tenant.
        """
        if not authorization:
            raise Unauthorized("this shim needs a token: send Authorization: Bearer <token>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Tenant | None = None
        for tenant, digest in self._entries:  # every entry, match or not: no timing hint
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise Unauthorized("the token is not valid for this shim")
        return found


def _limits(options: list[str], where: str) -> TenantLimits:
    known = {f.name for f in fields(TenantLimits)}
    values: dict[str, int] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in known:
            raise TokenFileError(f"{where}: unknown option {option!r} (known: {', '.join(sorted(known))})")
        if not value.isdigit() or int(value) < 1:
            raise TokenFileError(f"{where}: {key} must be a positive integer, got {value!r}")
        values[key] = int(value)
    return TenantLimits(**values)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _watch(ref: "weakref.ref[TokenStore]", path: Path, interval_s: float, seen: tuple[int, int, int] | None) -> None:
    """``TokenStore.reload_when_changed``'s thread."""
    event = threading.Event()
    while not event.wait(interval_s):
        store = ref()
        if store is None:
            return
        now = _signature(path)
        if now == seen:
            del store
            continue
        seen = now
        try:
            store._replace(TokenStore.load(path))
        except (OSError, ValueError) as exc:  # TokenFileError is a ValueError
            log.error("tokens file %s changed but cannot be used (%s); the tokens read before stay", path, exc)
        else:
            log.info("tokens file %s read again: %d tenant(s)", path, len(store.names()))
        del store
