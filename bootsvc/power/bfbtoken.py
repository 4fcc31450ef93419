"""One-time, BMC-bound URLs for a BlueField BFB push (the BFB with the node's bf.cfg appended).

Owns: minting and checking the token in ``/bfb-push/<token>/<file>.bfb``, the URL a DPU's BMC pulls
through Redfish SimpleUpdate (bluefield-real.md §3.3-3.4). Pure: the key, the clock and the address
come in as arguments; the single-use check (an event per serve) lives with the blueprint
(`bootsvc.web.bfbpush`).

A token is ``b1.<node id>.<issued ms>.<expires s>.<mac>``: an HMAC-SHA256 (RFC 2104) under the
service's node key, domain-separated from node secrets and boot tokens, over the node id, the BMC
host it may be served to, the issue time and the expiry. The BMC host is not in the token (nothing
about the node leaks from a URL in a BMC log); changing the node's ``bmc_address`` voids the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

_DOMAIN = b"bootsvc bfb-push v1\0"
_TOKEN_RE = re.compile(r"b1\.(\d{1,12})\.(\d{1,16})\.(\d{1,12})\.([A-Za-z0-9_-]{22,64})")


@dataclass(frozen=True, slots=True)
class PushToken:
    node_id: int
    issued_ms: int  # also the token's identity for the single-use check
    expires: int  # unix seconds


def bmc_host(bmc_address: str) -> str:
    """The host part of a node's ``bmc_address`` (what a token is bound to); "" when unusable."""
    from bootsvc.power.base import BmcAddress, BmcError

    try:
        netloc = BmcAddress.parse(bmc_address).base_url.split("://", 1)[1]
    except BmcError:
        return ""
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def push_url(base_url: str, token: str, image_file: str) -> str:
    return f"{base_url.rstrip('/')}/bfb-push/{token}/{image_file}"


def _mac(key: bytes, node_id: int, bmc_host: str, issued_ms: int, expires: int) -> str:
    msg = _DOMAIN + f"{node_id}|{bmc_host.lower()}|{issued_ms}|{expires}".encode()
    return base64.urlsafe_b64encode(hmac.new(key, msg, hashlib.sha256).digest()[:24]).decode().rstrip("=")


def mint(key: bytes, node_id: int, bmc_host: str, *, now: float, ttl: float) -> str:
    issued_ms = int(now * 1000)
    expires = int(now + ttl)
    return f"b1.{node_id}.{issued_ms}.{expires}.{_mac(key, node_id, bmc_host, issued_ms, expires)}"


class TokenError(ValueError):
    """Why a token is refused (shown to the client as the reason; never echoes the token)."""


def parse(token: str) -> PushToken:
    m = _TOKEN_RE.fullmatch(token)
    if m is None:
        raise TokenError("malformed push token")
    return PushToken(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def check(key: bytes, token: str, bmc_host: str, *, now: float) -> PushToken:
    """The token's fields if it is genuine for this node's BMC and not expired; else TokenError."""
    t = parse(token)
    mac = token.rsplit(".", 1)[1]
    if not hmac.compare_digest(mac, _mac(key, t.node_id, bmc_host, t.issued_ms, t.expires)):
        raise TokenError("push token not valid for this node")
    if now >= t.expires:
        raise TokenError("push token expired")
    return t
