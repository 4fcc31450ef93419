"""The boot plane over real HTTP: `bootsvc serve --only http` (gunicorn) inside a namespace this test
creates (``bbi`` + a random suffix, tests/helpers/netns.py), curl as the client. Range/HEAD/ETag on an
image, traversal and oversized requests refused by the server stack, and no secret in the server's log."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from helpers.netns import Netns
from helpers.serve import http_serve

from bootsvc import auth_secrets, inventory, lifecycle, render
from bootsvc import images as im
from bootsvc.db import make_engine, session_factory

pytestmark = pytest.mark.netns
URL = "http://127.0.0.1:8080"
MAC = "52:54:00:bb:10:01"


def curl(ns: Netns, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", ns.name, "curl", "-s", "--max-time", "10", *args],
                          capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespace)")
    with Netns("bbi") as ns:
        yield from _serve(tmp_path_factory, ns)


def _serve(tmp_path_factory: pytest.TempPathFactory, ns: Netns) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("httpboot")
    disk = os.urandom(3 << 20)
    (work / "root.img.gz").write_bytes(disk)
    for n in ("vmlinuz", "initrd.gz"):
        (work / n).write_bytes(n.encode() * 100)
    (work / "secret.txt").write_text("do not serve")
    img = im.make_image("os", "1", "bfb", {"kernel": work / "vmlinuz", "initrd": work / "initrd.gz",
                                          "image": work / "root.img.gz"})
    (work / "catalog.yaml").write_text(yaml.safe_dump(im.dump_catalog(im.Catalog((img,), {"dpu": "os"}), work)))
    cfg = {"database": {"url": f"sqlite:///{work}/db.sqlite"}, "state_dir": str(work / "state"),
           "images": {"catalog": str(work / "catalog.yaml")},
           "security": {"node_key_ref": f"file:{work}/node.key"},
           "listeners": {"http": [{"address": "127.0.0.1", "port": 8080, "netns": ns.name}]}}
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    ready = lambda: curl(ns, "-o", "/dev/null", "-w", "%{http_code}", f"{URL}/healthz").stdout == b"200"  # noqa: E731
    # the schema from the migrations (http_serve runs `db upgrade`), the node enrolled once the server is up
    with http_serve(work / "c.yaml", work, ready, {"BOOTSVC_HTTP_WORKERS": "1", "BOOTSVC_HTTP_THREADS": "4"}):
        engine = make_engine(cfg["database"]["url"])  # type: ignore[index]
        with session_factory(engine)() as s:
            # curl runs on the namespace's loopback: reserve that address for the DPU (the boot plane answers
            # a node only from an address that holds its lease or reservation, docs/security.md)
            (n,) = inventory.enroll(s, [inventory.NodeSpec("dpu-h", "dpu", "SN",
                                                           nics=[inventory.NicSpec(MAC, "oob", "127.0.0.1")])],
                                    actor="t")
            lifecycle.apply(s, n, "provision", actor="t")
            secret = auth_secrets.node_secret(auth_secrets.read_ref(f"file:{work}/node.key", create=True), n.id, 1)
        engine.dispose()
        yield {"work": work, "disk": disk, "secret": secret, "ns": ns}
    text = (work / "serve.log").read_text(errors="replace")
    assert secret not in text and render.boot_token(secret) not in text


def test_image_range_head_etag(server: dict) -> None:  # type: ignore[type-arg]
    disk, url = server["disk"], f"{URL}/images/os/1/root.img.gz"
    assert hashlib.sha256(curl(server["ns"], url).stdout).digest() == hashlib.sha256(disk).digest()
    r = curl(server["ns"], "-H", "Range: bytes=1048576-1048675", "-D", "-", "-o", "/dev/null", url).stdout.decode()
    assert r.startswith("HTTP/1.1 206") and f"Content-Range: bytes 1048576-1048675/{len(disk)}" in r
    assert curl(server["ns"], "-r", "1048576-1048675", url).stdout == disk[1048576:1048676]
    h = curl(server["ns"], "-I", url).stdout.decode()
    assert h.startswith("HTTP/1.1 200") and f"Content-Length: {len(disk)}" in h
    etag = hashlib.sha256(disk).hexdigest()
    assert f'ETag: "{etag}"' in h
    r = curl(server["ns"], "-H", f'If-None-Match: "{etag}"', "-o", "/dev/null", "-w", "%{http_code}", url).stdout
    assert r == b"304"


def test_script_over_real_http(server: dict) -> None:  # type: ignore[type-arg]
    body = curl(server["ns"], f"{URL}/boot/ipxe?mac={MAC}").stdout.decode()
    assert body.startswith("#!ipxe") and "bootsvc.mode=dpu-install" in body
    assert curl(server["ns"], f"{URL}/boot/ipxe?mac={MAC}").stdout.decode() == body  # second one: the cached fast path


@pytest.mark.parametrize("path", ["/images/os/1/../../../secret.txt", "/images/os/1/%2e%2e%2f%2e%2e%2fsecret.txt",
                                  "/images/os/1/..%2f..%2fsecret.txt", "/images/", "/images/os/1/",
                                  "/boot/nbp/..%2f..%2fsecret.txt", "/images/os/1/secret.txt"])
def test_traversal_over_real_http(server: dict, path: str) -> None:  # type: ignore[type-arg]
    r = curl(server["ns"], "--path-as-is", "-w", "\n%{http_code}", f"{URL}{path}").stdout.decode()
    code = r.rsplit("\n", 1)[1]
    assert code in ("400", "404"), (path, r)
    assert "do not serve" not in r


def test_oversized_requests_refused(server: dict) -> None:  # type: ignore[type-arg]
    long_url = f"{URL}/boot/ipxe?mac={MAC}&x={'a' * 9000}"
    assert curl(server["ns"], "-o", "/dev/null", "-w", "%{http_code}", long_url).stdout in (b"414", b"400")
    big_header = "X-Big: " + "b" * 10000
    code = curl(server["ns"], "-o", "/dev/null", "-w", "%{http_code}", "-H", big_header, f"{URL}/healthz").stdout
    assert code in (b"400", b"431")
    work = server["work"]
    blob = work / "big.json"
    blob.write_bytes(b'{"event": "progress", "pad": "' + b"p" * (2 << 20) + b'"}')
    code = curl(server["ns"], "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json",
                "--data-binary", f"@{blob}", f"{URL}/boot/callback/dpu-h").stdout
    assert code == b"413"
