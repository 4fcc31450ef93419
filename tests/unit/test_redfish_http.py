"""BmcHttp (bootsvc.power.redfish_http), the urllib3 transport under python-redfish, against small
HTTP servers on loopback: what the library relies on from requests (redirects for GETs, none for the
session POST, bodies, headers, timeouts) and what a BMC client must not do (send Authorization to
another host after a redirect, read the environment's proxies)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import urllib3
from helpers.httpd import LoopbackHttpd, QuietHandler

from bootsvc.power.base import BmcNoAnswer, PowerSettings
from bootsvc.power.redfish_http import BmcHttp
from bootsvc.power.redfish_session import open_client, transport_error


class Server:
    def __init__(self, host: str) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.ports: list[int] = []  # client port of each request: one port = one kept-alive connection
        self.redirect_to: str | None = None
        self.delay = threading.Event()  # set: the handler never answers until released
        srv = self

        class H(QuietHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                srv.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                srv.ports.append(self.client_address[1])
                if srv.delay.is_set():
                    srv.release.wait(5)
                if srv.redirect_to and self.path == "/redfish/v1":
                    self.send_response(301)
                    self.send_header("Location", srv.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                out = json.dumps({"path": self.path}).encode()
                self.send_response(201 if self.command == "POST" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Auth-Token", "tok")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PATCH = do_DELETE = handle_one

        self.release = threading.Event()
        self.httpd = LoopbackHttpd(H, host)
        self.url = self.httpd.url

    def close(self) -> None:
        self.release.set()
        self.httpd.close()


@pytest.fixture
def servers() -> Iterator[tuple[Server, Server]]:
    a, b = Server("127.0.0.1"), Server("127.0.0.2")
    yield a, b
    a.close()
    b.close()


def test_get_follows_a_redirect_and_drops_authorization_leaving_the_host(servers: tuple[Server, Server]) -> None:
    a, b = servers
    a.redirect_to = b.url + "/redfish/v1/"
    http = BmcHttp(cafile=None)
    r = http.request("GET", a.url + "/redfish/v1", headers={"Authorization": "Basic c2VjcmV0", "X-Other": "1"},
                     timeout=(2, 2), allow_redirects=True)
    assert r.status_code == 200 and json.loads(r.content) == {"path": "/redfish/v1/"}
    assert r.headers.get("x-auth-token") == "tok"  # case-insensitive, as python-redfish reads it
    assert "authorization" in a.seen[0][2]
    assert "authorization" not in b.seen[0][2] and b.seen[0][2]["x-other"] == "1"
    http.close()


def test_no_redirect_followed_when_the_library_says_so(servers: tuple[Server, Server]) -> None:
    a, b = servers
    a.redirect_to = b.url + "/redfish/v1/"
    r = BmcHttp(cafile=None).request("GET", a.url + "/redfish/v1", timeout=(2, 2), allow_redirects=False)
    assert r.status_code == 301 and not b.seen


def test_body_headers_and_keep_alive(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    http = BmcHttp(cafile=None)
    http.headers["Accept-Encoding"] = "identity"
    for _ in range(3):
        r = http.request("PATCH", a.url + "/redfish/v1/Systems/1", data='{"Boot": {}}',
                         headers={"Content-Type": "application/json", "If-Match": '"7"'}, timeout=(2, 2))
        assert r.status_code == 200
    method, _, h, body = a.seen[-1]
    assert (method, body, h["if-match"], h["accept-encoding"]) == ("PATCH", b'{"Boot": {}}', '"7"', "identity")
    assert h["content-length"] == str(len(body))
    assert len(a.ports) == 3 and len(set(a.ports)) == 1  # one connection, kept alive, for all three
    http.close()


def test_read_timeout_after_sending_is_classed_maybe_applied(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    a.delay.set()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError) as ei:
        BmcHttp(cafile=None).request("POST", a.url + "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
                                     data="{}", timeout=(2, 0.3))
    err = transport_error(ei.value, bmc=a.url, what="reset", method="POST", read_timeout=0.3)
    assert isinstance(err, BmcNoAnswer) and err.maybe_applied and not err.dropped
    assert len(a.seen) == 1  # sent once, never re-sent
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):  # nor a GET: the driver decides
        BmcHttp(cafile=None).request("GET", a.url + "/redfish/v1/Systems/1", timeout=(2, 0.3))
    assert len(a.seen) == 2


def test_the_library_client_runs_on_bmchttp_and_ignores_proxy_variables(servers: tuple[Server, Server],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = servers
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    client = open_client(a.url, "u", "p", cafile=None, settings=PowerSettings(connect_timeout=2, read_timeout=2))
    assert isinstance(client._session, BmcHttp)
    resp = client.get("/redfish/v1/Systems", max_retry=0)
    assert resp.status == 200 and resp.dict == {"path": "/redfish/v1/Systems"}
    assert a.seen[0][2]["odata-version"] == "4.0"
