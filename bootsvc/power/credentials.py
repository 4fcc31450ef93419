"""BMC credential references, resolved at call time and never logged or kept.

Owns: parsing ``env:USER_VAR:PASS_VAR`` and ``file:/path`` references (file = two lines ``user`` /
``password``, or one line ``user:password``), looking up reference *names* in the site config's
``bmc_credentials`` mapping (the database stores only such a name or a reference, never a secret),
and the `Credentials` value whose repr hides the password. Callers resolve right before a login and
drop the object afterwards.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bootsvc.power.base import FatalBmcError


class CredentialError(FatalBmcError):
    """A credential reference that cannot be resolved (not retryable: fix the config or the secret)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    ref: str = ""

    def __repr__(self) -> str:  # belt and braces: dataclass repr already hides password
        return f"Credentials(username={self.username!r}, password=<hidden>, ref={self.ref!r})"

    __str__ = __repr__


def _from_env(ref: str, env: Mapping[str, str]) -> Credentials:
    parts = ref.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise CredentialError(f"credential ref {ref!r} must be env:USER_VAR:PASS_VAR")
    missing = [v for v in parts[1:] if v not in env]
    if missing:
        raise CredentialError(f"credential ref {ref!r}: environment variable(s) {missing} not set",
                              hint="export them in the bootsvc service environment")
    user, pw = env[parts[1]], env[parts[2]]
    if not user or not pw:
        raise CredentialError(f"credential ref {ref!r}: empty user or password")
    return Credentials(user, pw, ref)


def _from_file(ref: str) -> Credentials:
    path = Path(ref[len("file:"):])
    if not str(path):
        raise CredentialError(f"credential ref {ref!r} has no path")
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CredentialError(f"credential file {path}: {e.strerror}",
                              hint="create it (mode 0600) with 'user:password' or two lines") from None
    if st.st_mode & stat.S_IROTH:
        # A world-readable secret is a leak already; refuse rather than use it (like ssh does for keys).
        raise CredentialError(f"credential file {path} is readable by others (mode {st.st_mode & 0o777:o})",
                              hint=f"chmod 600 {path}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) == 1 and ":" in lines[0]:
        user, pw = lines[0].split(":", 1)
    elif len(lines) == 2:
        user, pw = lines
    else:
        raise CredentialError(f"credential file {path}: expected 'user:password' or two lines user/password")
    if not user or not pw:
        raise CredentialError(f"credential file {path}: empty user or password")
    return Credentials(user, pw, ref)


def resolve(ref: str | None, *, names: Mapping[str, str] | None = None,
            env: Mapping[str, str] | None = None) -> Credentials:
    """Resolve a reference (``env:..``/``file:..``) or a name from ``names`` (config bmc_credentials)."""
    if not ref:
        raise CredentialError("no BMC credential reference set for this node",
                              hint="set bmc_credential_ref to a bmc_credentials name or env:/file: ref")
    environ = os.environ if env is None else env
    if not (ref.startswith("env:") or ref.startswith("file:")):
        if names is None or ref not in names:
            raise CredentialError(f"unknown credential name {ref!r}",
                                  hint="add it under bmc_credentials in the site config")
        ref = names[ref]
    if ref.startswith("env:"):
        return _from_env(ref, environ)
    if ref.startswith("file:"):
        return _from_file(ref)
    raise CredentialError(f"credential ref {ref!r} must start with env: or file:")
