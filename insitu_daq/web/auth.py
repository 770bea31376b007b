"""Who may watch and who may act: password and token checks, and the sessions of the web view.

Passwords are kept as scrypt hashes (hashlib, RFC 7914), with the cost parameters in the string
so they can be raised later without invalidating old hashes. Tokens (for scripts and kiosk
screens) are random 256-bit strings, kept as their SHA-256: a token is already high entropy,
so a slow hash would add nothing. Checks compare in constant time. A session is a random
256-bit id held in memory only (a restart logs everyone out), sent as an HttpOnly,
SameSite=Strict cookie, so another site's page cannot make a logged-in browser press Abort.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from insitu_daq.core.config import WebUser

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~50 ms and 16 MB a check: slow for guessing
SESSION_LIFETIME_S = 12 * 3600.0  # a long experiment day; then log in again


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The config's form of a password: `scrypt$n$r$p$<salt hex>$<hash hex>`."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = bytes.fromhex(digest)
        got = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
            maxmem=128 * 1024 * 1024, dklen=len(expected),
        )  # fmt: skip
    except ValueError:  # a malformed hash (the config check lets only well-formed ones in)
        return False
    return hmac.compare_digest(got, expected)


def new_token() -> tuple[str, str]:
    """(a token to give to its holder, the hash to put in the config)."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


def verify_token(token: str, stored: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored)


@dataclass(frozen=True)
class Session:
    user: str
    role: str  # "operator" or "viewer" (core/config.py WEB_ROLES)
    expires: float  # monotonic s

    @property
    def can_control(self) -> bool:
        return self.role == "operator"


class Users:
    """The configured users, and the sessions of those who logged in (thread-safe)."""

    def __init__(self, users: Sequence[WebUser]) -> None:
        self._users = {user.name: user for user in users}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def login(self, name: str | None, password: str | None, token: str | None) -> str | None:
        """A new session id, or None if the credentials match no user."""
        user = self._check(name, password, token)
        if user is None:
            return None
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            self._sessions[session_id] = Session(
                user.name, user.role, time.monotonic() + SESSION_LIFETIME_S
            )
        return session_id

    def _check(self, name: str | None, password: str | None, token: str | None) -> WebUser | None:
        if token:  # a token names its user by itself
            for user in self._users.values():
                if user.token is not None and verify_token(token, user.token):
                    return user
            return None
        user = self._users.get(name or "")
        if user is None or user.password is None or not password:
            return None
        return user if verify_password(password, user.password) else None

    def session(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires < time.monotonic():
                del self._sessions[session_id]
                return None
            return session

    def logout(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [key for key, s in self._sessions.items() if s.expires < now]:
            del self._sessions[key]
