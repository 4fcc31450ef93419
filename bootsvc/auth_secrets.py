"""Per-node secrets and API tokens: derivation and hashing, never storage in clear.

Owns: the site HMAC key (read from a ``file:`` or ``env:`` reference, a file created 0600 if
missing), per-node secrets derived as HMAC(key, node id + generation) — so the database never holds
one and rotating is bumping ``Node.secret_generation`` — and API token generation/hashing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets as _secrets
import tempfile
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
            _create_key_file(p)
        try:
            return p.read_bytes().strip()
        except OSError as e:
            raise SecretError(f"cannot read secret file {p}: {e.strerror}") from None
    raise SecretError(f"secret reference {ref!r} must start with 'file:' or 'env:'")


def _create_key_file(p: Path) -> None:
    """Write a new random key to ``p`` so that no process ever reads it half-written: the key goes to a
    private temporary file first, which is then linked into place (link(2) fails if ``p`` exists, so
    of several processes starting at once exactly one key wins and everybody reads that one)."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(_secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs is the key
            os.link(tmp, p)
    finally:
        os.unlink(tmp)


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
