"""RFC 9110 on the boot plane, over real HTTP: ranges (§14), conditional requests (§13) and HEAD
(§9.3.2) for a catalog image and for iPXE scripts, against `bootsvc serve --only http` (gunicorn,
loopback). Every response is read by two clients bootsvc does not contain: curl and Python's
http.client. The requirement each test checks is listed in docs/conformance.md (HTTP)."""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
from collections.abc import Iterator
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path

import pytest
import yaml
from helpers.serve import http_serve

from bootsvc import images as im

PORT = 18392
SIZE = 3 * 1024 * 1024 + 17  # odd size: the last byte of a range is not a chunk boundary
IMG = "/images/os/1/root.img.gz"
SCRIPT = "/boot/ipxe?mac=52:54:00:c0:ff:ee"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("conf")
    disk = os.urandom(SIZE)
    (work / "root.img.gz").write_bytes(disk)
    for n in ("vmlinuz", "initrd.gz"):
        (work / n).write_bytes(n.encode() * 100)
    img = im.make_image("os", "1", "bfb", {"kernel": work / "vmlinuz", "initrd": work / "initrd.gz",
                                          "image": work / "root.img.gz"})
    (work / "catalog.yaml").write_text(yaml.safe_dump(im.dump_catalog(im.Catalog((img,), {"dpu": "os"}), work)))
    cfg = {"database": {"url": f"sqlite:///{work}/db.sqlite"}, "state_dir": str(work / "state"),
           "images": {"catalog": str(work / "catalog.yaml")},
           "security": {"node_key_ref": f"file:{work}/node.key", "boot_sweep_rate": 1e6, "boot_sweep_burst": 10**6},
           "listeners": {"http": [{"address": "127.0.0.1", "port": PORT, "roles": ["boot"]}]}}
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {"BOOTSVC_HTTP_WORKERS": "1", "BOOTSVC_HTTP_THREADS": "4"}
    with http_serve(work / "c.yaml", work, lambda: req("GET", "/healthz")[0] == 200, env):
        yield {"work": work, "disk": disk, "etag": f'"{hashlib.sha256(disk).hexdigest()}"'}
    assert "Traceback" not in (work / "serve.log").read_text(errors="replace")


def req(method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """http.client: status, headers (lower-case names), body."""
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """curl: status, headers of the last response (lower-case names), body."""
    out = subprocess.run(["curl", "-sS", "--max-time", "30", "-D", "-", "-o", "/dev/stdout", *args],
                         capture_output=True, check=True)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), hdrs, body


def url(path: str) -> str:
    return f"http://127.0.0.1:{PORT}{path}"


def without_date(h: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in h.items() if k not in ("date", "connection", "keep-alive")}


# ---------------------------------------------------------------- images
def test_full_get_has_validators_and_length(server: dict[str, object]) -> None:
    for status, h, body in (req("GET", IMG), curl(url(IMG))):
        assert status == 200 and body == server["disk"]
        assert h["content-length"] == str(SIZE) and h["accept-ranges"] == "bytes"
        assert h["etag"] == server["etag"]  # strong: the content's sha256 (§8.8.3)
        parsedate_to_datetime(h["last-modified"])  # an IMF-fixdate (§8.8.2, §5.6.7)


def test_head_sends_the_get_headers_and_no_body(server: dict[str, object]) -> None:
    """§9.3.2: the same header fields as GET (Content-Length too), no content."""
    _, get_h, _ = req("GET", IMG)
    status, head_h, body = req("HEAD", IMG)
    assert status == 200 and body == b""
    assert without_date(head_h) == without_date(get_h)
    out = subprocess.run(["curl", "-sS", "-I", url(IMG)], capture_output=True, check=True)
    assert f"content-length: {SIZE}".encode() in out.stdout.lower()
    # Range is defined for GET only (§14.2): HEAD with one answers 200 as GET without it would
    status, h, _ = req("HEAD", IMG, {"Range": "bytes=0-9"})
    assert status == 200 and "content-range" not in h and h["content-length"] == str(SIZE)


@pytest.mark.parametrize(("spec", "first", "last"), [
    ("bytes=0-9", 0, 9), ("bytes=100-", 100, SIZE - 1), ("bytes=-5", SIZE - 5, SIZE - 1),
    (f"bytes=10-{SIZE + 1000}", 10, SIZE - 1), ("BYTES = 7-7", 7, 7), (f"bytes=-{SIZE * 2}", 0, SIZE - 1),
])
def test_one_range_is_206_with_content_range(server: dict[str, object], spec: str, first: int, last: int) -> None:
    """§14.2, §14.4, §15.3.7: the bytes asked for, Content-Range first-last/complete-length."""
    disk = server["disk"]
    assert isinstance(disk, bytes)
    for status, h, body in (req("GET", IMG, {"Range": spec}), curl("-H", f"Range: {spec}", url(IMG))):
        assert status == 206, (spec, status)
        assert h["content-range"] == f"bytes {first}-{last}/{SIZE}"
        assert h["content-length"] == str(last - first + 1) and body == disk[first:last + 1]
        assert h["etag"] == server["etag"]


@pytest.mark.parametrize("spec", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 10}", "bytes=-0"])
def test_unsatisfiable_range_is_416_with_the_size(server: dict[str, object], spec: str) -> None:
    """§15.5.17: 416 SHOULD carry Content-Range: bytes */<complete-length>."""
    for status, h, _ in (req("GET", IMG, {"Range": spec}), curl("-H", f"Range: {spec}", url(IMG))):
        assert status == 416 and h["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("spec", ["bytes=0-1,5-6", "bytes=0-0, -1", "items=0-9", "bytes=9-1", "bytes=x-y",
                                  "bytes=", f"bytes={SIZE}-,{SIZE + 1}-"])
def test_several_or_invalid_ranges_get_the_whole_file(server: dict[str, object], spec: str) -> None:
    """§14.2: a server MAY ignore Range (bootsvc does for several ranges - §17.15 - and must for an
    unknown unit or an invalid set): 200 with the complete content, never a 416 or a multipart."""
    status, h, body = req("GET", IMG, {"Range": spec})
    assert status == 200 and body == server["disk"] and "content-range" not in h


def test_curl_resumes_a_download(server: dict[str, object]) -> None:
    work = server["work"]
    assert isinstance(work, Path)
    part = work / "partial.img"
    disk = server["disk"]
    assert isinstance(disk, bytes)
    part.write_bytes(disk[:123_457])
    subprocess.run(["curl", "-sS", "--fail", "-C", "-", "-o", str(part), url(IMG)], check=True, timeout=60)
    assert part.read_bytes() == disk


def test_if_none_match_and_if_modified_since(server: dict[str, object]) -> None:
    """§13.1.2 (weak comparison) and §13.1.3; §13.2.2: If-Modified-Since is ignored when If-None-Match
    is present; §15.4.5: 304 carries ETag and Cache-Control, no content."""
    etag = str(server["etag"])
    _, h, _ = req("GET", IMG)
    lm = h["last-modified"]
    for hdrs in ({"If-None-Match": etag}, {"If-None-Match": f'"x", W/{etag}'}, {"If-None-Match": "*"},
                 {"If-Modified-Since": lm}):
        for status, rh, body in (req("GET", IMG, hdrs),
                                 curl(*(a for k, v in hdrs.items() for a in ("-H", f"{k}: {v}")), url(IMG))):
            assert status == 304 and body == b"", hdrs
            assert rh["etag"] == etag and "cache-control" in rh
            assert rh.get("content-length", str(SIZE)) == str(SIZE)  # §8.6: absent, or the 200's length
        assert req("HEAD", IMG, hdrs)[0] == 304
    old = formatdate(0, usegmt=True)
    for hdrs in ({"If-None-Match": '"other"'}, {"If-Modified-Since": old}, {"If-Modified-Since": "garbage"},
                 {"If-None-Match": '"other"', "If-Modified-Since": lm}):
        assert req("GET", IMG, hdrs)[0] == 200, hdrs


def test_if_match_and_if_unmodified_since(server: dict[str, object]) -> None:
    """§13.1.1 (strong comparison) and §13.1.4: false -> 412, the method not performed."""
    etag = str(server["etag"])
    _, h, _ = req("GET", IMG)
    for hdrs in ({"If-Match": etag}, {"If-Match": "*"}, {"If-Match": f'"x", {etag}'},
                 {"If-Unmodified-Since": h["last-modified"]}):
        assert req("GET", IMG, hdrs)[0] == 200, hdrs
    for hdrs in ({"If-Match": '"other"'}, {"If-Match": f"W/{etag}"},
                 {"If-Unmodified-Since": formatdate(0, usegmt=True)}):
        for status, _, _ in (req("GET", IMG, hdrs),
                             curl(*(a for k, v in hdrs.items() for a in ("-H", f"{k}: {v}")), url(IMG))):
            assert status == 412, hdrs
    # §13.2.2: If-Match first - a false If-Match is 412 even when If-None-Match would give 304
    assert req("GET", IMG, {"If-Match": '"other"', "If-None-Match": etag})[0] == 412


def test_if_range(server: dict[str, object]) -> None:
    """§13.1.5: the range only while the representation is the one the client holds."""
    etag = str(server["etag"])
    _, h, _ = req("GET", IMG)
    lm = h["last-modified"]
    for cond in (etag, lm):
        status, rh, body = req("GET", IMG, {"Range": "bytes=0-3", "If-Range": cond})
        assert status == 206 and len(body) == 4 and rh["content-range"] == f"bytes 0-3/{SIZE}"
    for cond in ('"other"', f"W/{etag}", formatdate(0, usegmt=True)):
        status, _, body = req("GET", IMG, {"Range": "bytes=0-3", "If-Range": cond})
        assert status == 200 and len(body) == SIZE, cond


# ---------------------------------------------------------------- scripts
def test_script_head_matches_get(server: dict[str, object]) -> None:
    g_status, g_h, g_body = req("GET", SCRIPT)
    h_status, h_h, h_body = req("HEAD", SCRIPT)
    assert g_status == h_status == 200 and g_body.startswith(b"#!ipxe") and h_body == b""
    assert without_date(h_h) == without_date(g_h)
    assert g_h["cache-control"] == "no-store"  # holds a one-time boot token: never stored (§5.2.2.5 RFC 9111)
    c_status, c_h, _ = curl("-I", url(SCRIPT))
    assert c_status == 200 and c_h["content-length"] == g_h["content-length"]


def test_script_ignores_range_and_answers_preconditions(server: dict[str, object]) -> None:
    """Scripts carry no validator: Range is ignored (§14.2), If-None-Match with a tag and
    If-Modified-Since cannot match (§13.1.2, §13.1.3), ``If-None-Match: *`` is false (304), and an
    If-Match other than ``*`` is false (§13.1.1): 412, through the cached fast path too."""
    for _ in range(2):  # the second request is answered from the worker's script cache
        status, h, body = req("GET", SCRIPT, {"Range": "bytes=0-3"})
        assert status == 200 and body.startswith(b"#!ipxe") and "content-range" not in h
        assert req("GET", SCRIPT, {"If-None-Match": '"abc"'})[0] == 200
        assert req("GET", SCRIPT, {"If-Modified-Since": formatdate(usegmt=True)})[0] == 200
        assert req("GET", SCRIPT, {"If-Match": "*"})[0] == 200
        status, _, body = req("GET", SCRIPT, {"If-Match": '"abc"'})
        assert status == 412 and b"precondition_failed" in body
        assert curl("-H", 'If-Match: "abc"', url(SCRIPT))[0] == 412
        assert req("GET", SCRIPT, {"If-None-Match": "*"})[0] == 304
