"""Per-node secrets and API tokens: derivation and hashing, never storage in clear.

Owns: the site HMAC key (read from a ``file:`` or ``env:`` reference, a file created 0600 if
missing), per-node secrets derived as HMAC(key, node id + generation) — so the database never holds
one and rotating is bumping ``Node.secret_generation`` — and API token generation/hashing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets as _secrets
from pathlib import Path


class SecretError(Exception):
    pass


def read_ref(ref: str, *, create: bool = False) -> bytes:
    """Resolve ``file:/path`` or ``env:NAME``; ``create`` makes a random 32-byte key file if absent."""
    if ref.startswith("env:"):
        val = os.environ.get(ref[4:])
        if not val:
            raise SecretError(f"environment variable {ref[4:]} (from {ref!r}) is not set")
        return val.encode()
    if ref.startswith("file:"):
        p = Path(ref[5:])
        if not p.exists() and create:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(_secrets.token_hex(32) + "\n")
        try:
            return p.read_bytes().strip()
        except OSError as e:
            raise SecretError(f"cannot read secret file {p}: {e.strerror}") from None
    raise SecretError(f"secret reference {ref!r} must start with 'file:' or 'env:'")


def node_secret(key: bytes, node_id: int, generation: int) -> str:
    return hmac.new(key, f"node:{node_id}:{generation}".encode(), hashlib.sha256).hexdigest()


def verify_node_secret(key: bytes, node_id: int, generation: int, presented: str) -> bool:
    # Bytes, not str: compare_digest raises TypeError on a non-ASCII str, and a header may carry one.
    return hmac.compare_digest(node_secret(key, node_id, generation).encode(),
                               presented.encode("utf-8", "surrogateescape"))


def new_token() -> str:
    return "bsv_" + _secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
