"""The HTTP transport under python-redfish for one BMC: urllib3 directly, in place of the library's
``requests.Session``.

Owns `BmcHttp`: the part of ``requests.Session.request`` the library calls (redfish/rest/v1.py,
``RestClientBase._rest_request``) and the part of ``requests.Response`` it reads (``content``,
``status_code``, ``headers``, ``reason``), on one urllib3 pool manager that keeps the BMC's connection
alive between requests. requests costs about twice urllib3's CPU per request (measured: ~520 vs ~270 us
per keep-alive GET on this 2-core box) in work a BMC client does not need: merging session, environment
and per-request settings, cookies, hooks, and its own redirect loop.

What it keeps from requests: TLS verification with the CA file or CApath the driver gives (hostname
checked), a (connect, read) timeout per request, redirects followed for the library's GETs (up to 10,
Authorization dropped when a redirect leaves the host: urllib3 Retry.remove_headers_on_redirect), gzip
decoded if a BMC sends it anyway. What it drops on purpose: the process environment (HTTP(S)_PROXY,
NO_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc; ``power.proxy`` is the explicit proxy) and cookies (Redfish
authenticates with X-Auth-Token or Basic, DSP0266 §13.3, never a cookie). No retries: a failure
surfaces as the urllib3 error (connect errors and others wrapped in MaxRetryError with the cause as
``reason``), which `redfish_session.transport_error` classes by name; a request that may have been
carried out is never re-sent here.
"""

from __future__ import annotations

import os
from typing import Any

import urllib3
from urllib3.util import Retry, Timeout

USER_AGENT = "bootsvc (python-redfish; urllib3)"


class BmcResponse:
    """What python-redfish reads of a ``requests.Response``."""

    __slots__ = ("content", "headers", "reason", "status_code")

    def __init__(self, status: int, reason: str | None, headers: Any, content: bytes) -> None:
        self.status_code = status
        self.reason = reason or ""
        self.headers = headers  # urllib3 HTTPHeaderDict: case-insensitive, repeated fields joined by ", "
        self.content = content


class BmcHttp:
    """Stands in for python-redfish's ``requests.Session`` (``client._session``): one BMC, one kept-alive
    connection per origin, settings fixed at construction."""

    def __init__(self, *, cafile: str | None, proxy: str | None = None) -> None:
        self.headers: dict[str, str] = {"User-Agent": USER_AGENT, "Accept": "*/*", "Connection": "keep-alive"}
        kw: dict[str, Any] = {"num_pools": 4, "maxsize": 1, "block": False}
        if cafile:
            kw["cert_reqs"] = "CERT_REQUIRED"
            kw["ca_cert_dir" if os.path.isdir(cafile) else "ca_certs"] = cafile
        else:
            kw["cert_reqs"] = "CERT_NONE"  # the explicit lab opt-out (verify_tls=False)
        self._pm: urllib3.PoolManager = urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)
        self._retries = {follow: Retry(total=None, connect=0, read=False, other=0, status=0,
                                       redirect=10 if follow else 0, raise_on_redirect=False)
                         for follow in (True, False)}

    def request(self, method: str, url: str, *, data: Any = None, headers: dict[str, str] | None = None,
                timeout: Any = None, allow_redirects: bool = True, params: str | None = None,
                **_ignored: Any) -> BmcResponse:
        """``verify`` and ``proxies`` the library passes are the ones this object was built with."""
        if params:
            url = f"{url}?{params}"
        hdrs = {**self.headers, **(headers or {})}
        body = data.encode("utf-8") if isinstance(data, str) else bytes(data) if isinstance(data, bytearray) else data
        if isinstance(timeout, tuple):
            t = Timeout(connect=timeout[0], read=timeout[1])
        else:
            t = Timeout(connect=timeout, read=timeout) if timeout is not None else Timeout(connect=None, read=None)
        r = self._pm.request(method, url, body=body, headers=hdrs, timeout=t,
                             retries=self._retries[allow_redirects], redirect=allow_redirects,
                             preload_content=True)
        return BmcResponse(r.status, r.reason, r.headers, r.data)

    def close(self) -> None:
        self._pm.clear()
