"""File responses of the boot plane: ranges, conditional requests and HEAD as RFC 9110 says.

Owns: :func:`file_response` (images, the agent wheel: anything sent from a file with a known strong
validator) and :class:`Preconditions` (a WSGI wrapper that answers ``If-Match`` on responses that
carry no entity tag - iPXE/GRUB scripts, API documents). Every requirement, what bootsvc does and the
test that shows it: docs/conformance.md (HTTP).

Decisions (RFC 9110):

* §13.2.2: preconditions in the RFC's order - If-Match (strong comparison, §13.1.1; false: 412),
  else If-Unmodified-Since (§13.1.4); then If-None-Match (weak comparison, §13.1.2; a match: 304 on
  GET/HEAD, 412 otherwise), else If-Modified-Since (§13.1.3, GET/HEAD only); then Range, with
  If-Range (§13.1.5: a strong entity-tag match or an exact Last-Modified date, else the whole file).
* §14.2: Range only on GET (HEAD answers as GET would without one). One satisfiable ``bytes`` range:
  206 with Content-Range (§14.4, §15.3.7). Unsatisfiable: 416 with ``Content-Range: bytes */<size>``
  (§15.5.17). More than one range: the whole file, 200 - §14.2 lets a server ignore Range, and §17.15
  names many small or overlapping ranges as a denial-of-service risk; no firmware we serve asks for
  more than one, and a single sendfile keeps the image path at nginx's speed. A Range in another unit
  or that does not parse is ignored the same way (§14.2).
* §9.3.2: HEAD sends the headers GET would send (Content-Length included) and no body.
* §15.4.5: 304 carries ETag, Cache-Control and Date (no body, no Content-Length).

The body goes out through the server's ``wsgi.file_wrapper`` (gunicorn: ``sendfile`` of exactly
Content-Length bytes from the current offset, so a 206 is a seek plus sendfile too); other servers
(granian, tests) get a reader bounded to the range.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from flask import Response, abort, json, request
from werkzeug.http import http_date, parse_date, parse_etags

CHUNK = 1 << 20

_RANGE = re.compile(r"^\s*bytes\s*=\s*(.*)$", re.IGNORECASE)
_SPEC = re.compile(r"^(\d{0,19})-(\d{0,19})$")


def parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """The one byte range ``value`` asks for, inclusive (§14.1.2), as (first, last); ``"unsatisfiable"``
    when it names no byte of a ``size``-byte file (§14.1.1); None to ignore it and send the whole
    file: no Range, another unit, a syntax error, or more than one range (see the module docstring)."""
    m = _RANGE.match(value or "")
    if m is None:
        return None
    specs = [s.strip() for s in m.group(1).split(",") if s.strip()]
    if len(specs) != 1:
        return None
    r = _SPEC.match(specs[0])
    if r is None or (r.group(1) == "" and r.group(2) == ""):
        return None
    if r.group(1) == "":  # suffix-range: the last N bytes
        n = int(r.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(r.group(1))
    if r.group(2) and int(r.group(2)) < first:
        return None  # §14.1.1: invalid when last-pos < first-pos
    if first >= size:
        return "unsatisfiable"
    last = int(r.group(2)) if r.group(2) else size - 1
    return first, min(last, size - 1)


def _date(value: str | None) -> int | None:
    d = parse_date(value) if value else None
    return int(d.timestamp()) if d is not None else None


def _not_modified(headers: dict[str, str]) -> Response:
    resp = Response(status=304)
    for k in ("ETag", "Cache-Control", "Last-Modified"):
        resp.headers[k] = headers[k]
    return resp


def file_response(path: str | os.PathLike[str], *, etag: str, mimetype: str = "application/octet-stream",
                  max_age: int = 3600, download_name: str | None = None) -> Response:
    """Send ``path`` with the strong validator ``etag`` (e.g. its sha256) for the current request."""
    p = Path(path)
    st = p.stat()
    size, mtime = st.st_size, int(st.st_mtime)
    headers = {"ETag": f'"{etag}"', "Last-Modified": http_date(mtime), "Accept-Ranges": "bytes",
               "Cache-Control": f"public, max-age={max_age}"}
    if download_name:
        headers["Content-Disposition"] = f"inline; filename={download_name}"
    method = request.method
    env = request.environ

    # §13.2.2 step 1-2: If-Match, else If-Unmodified-Since
    if_match = env.get("HTTP_IF_MATCH")
    if if_match is not None:
        tags = parse_etags(if_match)
        if not (tags.star_tag or tags.contains(etag)):
            abort(412, description="If-Match names no current entity tag of this file")
    else:
        since = _date(env.get("HTTP_IF_UNMODIFIED_SINCE"))
        if since is not None and mtime > since:
            abort(412, description="the file was modified after If-Unmodified-Since")
    # step 3-4: If-None-Match, else If-Modified-Since (GET/HEAD)
    if_none = env.get("HTTP_IF_NONE_MATCH")
    if if_none is not None:
        tags = parse_etags(if_none)
        if tags.star_tag or tags.contains_weak(etag):
            if method in ("GET", "HEAD"):
                return _not_modified(headers)
            abort(412, description="If-None-Match matches the current entity tag")
    elif method in ("GET", "HEAD"):
        since = _date(env.get("HTTP_IF_MODIFIED_SINCE"))
        if since is not None and mtime <= since:
            return _not_modified(headers)

    # step 5: Range (GET only), guarded by If-Range
    first, last, status = 0, size - 1, 200
    rng = parse_range(env.get("HTTP_RANGE", ""), size) if method == "GET" else None
    if rng is not None and "HTTP_IF_RANGE" in env:
        cond = env["HTTP_IF_RANGE"].strip()
        # an entity tag: a strong match only, a weak tag never matches (§13.1.5); else an exact date
        ok = cond == f'"{etag}"' if cond.startswith(('"', "W/")) else _date(cond) == mtime
        if not ok:
            rng = None
    if rng == "unsatisfiable":
        resp = Response(json.dumps({"error": "range_not_satisfiable",
                                    "reason": f"the range starts past the end of this {size}-byte file"}),
                        status=416, mimetype="application/json")
        resp.headers["Content-Range"] = f"bytes */{size}"
        resp.headers["Accept-Ranges"] = "bytes"
        return resp
    if isinstance(rng, tuple):
        first, last, status = rng[0], rng[1], 206
    length = last - first + 1 if size else 0

    if method == "HEAD":
        body: Iterable[bytes] = []
    else:
        f = p.open("rb")
        body = _body(f, first, length, env)
    resp = Response(body, status=status, mimetype=mimetype, direct_passthrough=True)
    for k, v in headers.items():
        resp.headers[k] = v
    resp.headers["Content-Length"] = str(length)
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return resp


def _body(f: IO[bytes], first: int, length: int, env: dict[str, Any]) -> Iterable[bytes]:
    f.seek(first)
    wrapper = env.get("wsgi.file_wrapper")
    if wrapper is not None and "gunicorn.socket" in env:
        # gunicorn sendfile()s min(Content-Length, rest of file) from the file's offset
        return wrapper(f, CHUNK)  # type: ignore[no-any-return]
    if wrapper is not None and first + length == os.fstat(f.fileno()).st_size:
        return wrapper(f, CHUNK)  # type: ignore[no-any-return]  # to the end: any server's wrapper
    return _Bounded(f, length)


class _Bounded:
    """Exactly ``length`` bytes of ``f`` from its offset, then closed (a range under non-gunicorn
    servers, whose file wrappers read to the end of the file)."""

    def __init__(self, f: IO[bytes], length: int) -> None:
        self.f, self.left = f, length

    def __iter__(self) -> Iterator[bytes]:
        while self.left > 0:
            data = self.f.read(min(CHUNK, self.left))
            if not data:
                break
            self.left -= len(data)
            yield data

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------- If-Match without an entity tag
_PRECONDITION_FAILED = json.dumps({"error": "precondition_failed",
                                   "reason": "If-Match: this resource has no entity tag to match"}).encode()


class Preconditions:
    """WSGI wrapper for responses that carry no ETag (scripts are rendered per request with a one-time
    token and sent ``no-store``; API documents): RFC 9110 §13.1.1 - an If-Match other than ``*``
    cannot match a representation without an entity tag, so the method must not be performed: 412.
    On GET/HEAD the response is produced and replaced (nothing changes); other methods are refused
    before they run. §13.2.1: a response that would not be 2xx keeps its status. A response with an
    ETag (file responses, which evaluate their preconditions themselves) passes unchanged. And
    §13.1.2: ``If-None-Match: *`` is false whenever a representation exists - 304 on GET/HEAD."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        cond = environ.get("HTTP_IF_MATCH")
        safe = environ.get("REQUEST_METHOD") in ("GET", "HEAD")
        # §13.1.2: "If-None-Match: *" is false when a representation exists: 304 on GET/HEAD
        none_star = safe and environ.get("HTTP_IF_NONE_MATCH", "").strip() == "*"
        if (cond is None or parse_etags(cond).star_tag) and not none_star:
            return self.inner(environ, start_response)
        if not safe:
            return self._refuse(start_response)
        seen: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen.update(status=status, headers=headers)
            return lambda data: None  # the legacy write(): nothing here writes through it

        body = self.inner(environ, capture)
        status = str(seen.get("status", "500"))
        has_etag = any(k.lower() == "etag" for k, _ in seen.get("headers", []))
        if status.startswith("2") and not has_etag:
            if hasattr(body, "close"):
                body.close()
            if cond is not None and not parse_etags(cond).star_tag:
                return self._refuse(start_response)
            keep = [(k, v) for k, v in seen.get("headers", []) if k.lower() in ("cache-control", "expires", "vary")]
            start_response("304 Not Modified", keep)
            return []
        start_response(status, seen.get("headers", []))
        return body

    @staticmethod
    def _refuse(start_response: Callable[..., Any]) -> list[bytes]:
        start_response("412 Precondition Failed", [("Content-Type", "application/json"),
                                                   ("Content-Length", str(len(_PRECONDITION_FAILED)))])
        return [_PRECONDITION_FAILED]
