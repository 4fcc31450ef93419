"""BMC credential references, resolved at call time and never logged or kept.

Owns: parsing ``env:USER_VAR:PASS_VAR`` and ``file:/path`` references (file = two lines ``user`` /
``password``, or one line ``user:password``), looking up reference *names* in the site config's
``bmc_credentials`` mapping (the database stores only such a name or a reference, never a secret),
and the `Credentials` value whose repr hides the password. Callers resolve right before a login and
drop the object afterwards.

Also owns where a credential may go: a credential *name* is bound in the site config to the BMC
networks it may be sent to (``bmc_credentials.<name>.networks``), over HTTPS unless the network is
marked ``lab`` (Redfish is HTTPS, DSP0266 §8.1). `check_destination` refuses any other BMC address
before a connection is made, so a node enrolled over the API, a webhook or the UI cannot make bootsvc
log in to a host of the enroller's choosing. Raw ``env:``/``file:`` references carry no binding: only
the site config and the CLI (people with access to the service's files) may set them
(`enroll_problem` refuses them at the network front doors).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from bootsvc.power.base import BmcAddress, BmcError, FatalBmcError

log = logging.getLogger("bootsvc.power.credentials")


class CredentialError(FatalBmcError):
    """A credential reference that cannot be resolved (not retryable: fix the config or the secret)."""


class _Unusable(Exception):
    """Why a secret could not be read: for the log only (`resolve` answers callers generically)."""

    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(detail)
        self.detail, self.hint = detail, hint


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
        raise _Unusable(f"environment variable(s) {missing} not set",
                        hint="export them in the bootsvc service environment")
    user, pw = env[parts[1]], env[parts[2]]
    if not user or not pw:
        raise _Unusable("empty user or password")
    return Credentials(user, pw, ref)


def _from_file(ref: str) -> Credentials:
    path = Path(ref[len("file:"):])
    if not str(path):
        raise CredentialError(f"credential ref {ref!r} has no path")
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _Unusable(f"credential file {path}: {e.strerror}",
                        hint="create it (mode 0600) with 'user:password' or two lines") from None
    if st.st_mode & stat.S_IROTH:
        # A world-readable secret is a leak already; refuse rather than use it (like ssh does for keys).
        raise _Unusable(f"credential file {path} is readable by others (mode {st.st_mode & 0o777:o})",
                        hint=f"chmod 600 {path}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) == 1 and ":" in lines[0]:
        user, pw = lines[0].split(":", 1)
    elif len(lines) == 2:
        user, pw = lines
    else:
        raise _Unusable(f"credential file {path}: expected 'user:password' or two lines user/password")
    if not user or not pw:
        raise _Unusable(f"credential file {path}: empty user or password")
    return Credentials(user, pw, ref)


def resolve(ref: str | None, *, names: Mapping[str, str] | None = None,
            env: Mapping[str, str] | None = None) -> Credentials:
    """Resolve a reference (``env:..``/``file:..``) or a name from ``names`` (config bmc_credentials).

    Why a secret could not be read (a missing file or variable, a file's mode) is logged, one line, and
    not put in the error: errors reach API answers, events and a node's ``last_error``, and would tell
    their reader what exists on the service's disk and in its environment.
    """
    if not ref:
        raise CredentialError("no BMC credential reference set for this node",
                              hint="set bmc_credential_ref to a bmc_credentials name or env:/file: ref")
    environ = os.environ if env is None else env
    label = ref
    if not is_raw_ref(ref):
        if names is None or ref not in names:
            raise CredentialError(f"unknown credential name {ref!r}",
                                  hint="add it under bmc_credentials in the site config")
        ref = names[ref]
    try:
        if ref.startswith("env:"):
            return _from_env(ref, environ)
        if ref.startswith("file:"):
            return _from_file(ref)
    except _Unusable as e:
        log.warning("bmc credential unusable credential=%s reason=%s%s", label, e.detail,
                    f" fix={e.hint}" if e.hint else "")
        raise CredentialError(f"BMC credential {label!r} cannot be used; the reason is in the bootsvc log",
                              hint="an admin finds it there ('bmc credential unusable'): fix the secret "
                                   "or bmc_credentials") from None
    raise CredentialError(f"credential ref {ref!r} must start with env: or file:")


# ------------------------------------------------------------------------------ where a credential may go
class BmcNetwork(Protocol):
    """One entry of ``bmc_credentials.<name>.networks`` (`bootsvc.config.BmcNetworkConfig` fits)."""

    @property
    def cidr(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network: ...
    @property
    def lab(self) -> bool: ...


class BoundCredential(Protocol):
    """A site-config credential with its networks (`bootsvc.config.CredentialConfig` fits)."""

    @property
    def networks(self) -> Sequence[BmcNetwork]: ...


class CredentialDestinationError(CredentialError):
    """The node's BMC address is not one its credential may be sent to (nothing was sent)."""


def is_raw_ref(ref: str) -> bool:
    return ref.startswith("env:") or ref.startswith("file:")


def destination_problem(name: str, address: str, bindings: Mapping[str, BoundCredential] | None) -> str | None:
    """Why credential ``name`` may not be sent to ``address`` (None: it may). Pure; names no secret."""
    cred = (bindings or {}).get(name)
    if cred is None:
        return f"no BMC credential named {name!r} in the site config (bmc_credentials)"
    try:
        addr = BmcAddress.parse(address)
    except BmcError as e:
        return e.message
    u = urlsplit(addr.base_url)
    if "@" in u.netloc or "\\" in u.netloc:  # userinfo: clients disagree on which host it means
        return f"bmc_address {address!r} must not carry a user name or password"
    scheme = u.scheme
    try:
        ip = ipaddress.ip_address(u.hostname or "")
    except ValueError:
        # A name could resolve anywhere (and differently by the time we connect): only IPs are checked.
        return f"bmc_address {address!r} is a host name: credential {name!r} is only sent to BMC IP addresses"
    net = next((n for n in cred.networks if ip.version == n.cidr.version and ip in n.cidr), None)
    if net is None:
        return (f"bmc_address {ip} is outside the BMC networks credential {name!r} may be sent to "
                f"(bmc_credentials.{name}.networks)")
    if scheme != "https" and not net.lab:
        return (f"bmc_address {address!r} is plain http: credential {name!r} is only sent over https "
                f"(mark the network 'lab: true' for an emulator)")
    return None


def enroll_problem(ref: str | None, address: str | None, driver: str,
                   bindings: Mapping[str, BoundCredential] | None) -> str | None:
    """Why a node arriving over the API, a webhook or the UI may not have this credential/address."""
    if not ref:
        return None
    if is_raw_ref(ref):
        return ("raw env:/file: references are for the site config and the CLI only: "
                "give the name of a credential from bmc_credentials")
    if bindings is None or ref not in bindings:
        return f"no BMC credential named {ref!r} in the site config (bmc_credentials)"
    if driver != "redfish" or not address:
        return None  # the fake driver sends nothing anywhere
    return destination_problem(ref, address, bindings)


def check_destination(node: str, ref: str | None, address: str | None,
                      bindings: Mapping[str, BoundCredential] | None) -> None:
    """Refuse (CredentialDestinationError) before any connection when a credential name would be sent
    outside its networks. No credential, or a raw ref (config/CLI), passes: there is no binding."""
    if not ref or not address or is_raw_ref(ref):
        return
    why = destination_problem(ref, address, bindings)
    if why is not None:
        log.warning("bmc credential refused node=%s credential=%s reason=%s", node, ref, why)
        raise CredentialDestinationError(f"node {node}: {why}", hint="fix the node's bmc_address or the "
                                         "credential's networks in the site config")
