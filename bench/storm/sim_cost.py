#!/usr/bin/env python3
"""The simulator's own CPU per request, on loopback, in seconds (its CPU counts in the storm's total).

``client``: sim.py's firmware/agent HTTP client (one TCP connection per request, ``Connection: close``)
against a loopback server in a child process; CPU of the client per request. ``bmc``: sim.py's simulated
BMC server (in a child process) answering keep-alive GETs from ``requests.Session`` threads (as
python-redfish sends them); CPU of the server per request, ``--streams`` for the asyncio-streams server
(``Sim.bmc_conn``) next to the protocol one (``Sim.bmc_protocol``). uvloop when installed.

    .venv/bin/python bench/storm/sim_cost.py client --n 3000 --size 200
    .venv/bin/python bench/storm/sim_cost.py bmc --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]
import sim as S  # noqa: E402


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _http_server(port: int, size: int, ready: Any) -> None:
    body = b"x" * size

    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (await r.readline()) not in (b"\r\n", b""):
            pass
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await w.drain()
        w.close()

    async def main() -> None:
        await asyncio.start_server(h, "127.0.0.1", port, backlog=4096)
        ready.set()
        await asyncio.Event().wait()

    _run(main())


def client(a: argparse.Namespace) -> None:
    ready = mp.Event()
    srv = mp.Process(target=_http_server, args=(a.port, a.size, ready), daemon=True)
    srv.start()
    ready.wait(10)

    async def main() -> float:
        sem = asyncio.Semaphore(64)

        async def one() -> None:
            async with sem:
                st, _ = await S.http("POST", f"http://127.0.0.1:{a.port}/api/v1/agent/checkin", "127.0.0.1",
                                     headers={"Content-Type": "application/json"}, body=b'{"a": 1}')
                assert st == 200

        t = time.process_time()
        await asyncio.gather(*(one() for _ in range(a.n)))
        return time.process_time() - t

    for k in range(a.rounds):
        print(f"client, body {a.size} B: {_run(main()) / a.n * 1e6:.0f} us CPU per request (round {k})", flush=True)
    srv.kill()


def _bmc_server(streams: bool, port: int, ready: Any) -> None:
    sm = S.Sim(argparse.Namespace(bmc_sessions=10**6, rack_size=40, rack_window=10, timeout=3600, pairs=1))

    async def main() -> None:
        if streams:
            await asyncio.start_server(sm.bmc_conn, "127.0.0.1", port, backlog=4096)
        else:
            await asyncio.get_running_loop().create_server(sm.bmc_protocol, "127.0.0.1", port, backlog=4096)
        ready.set()
        await asyncio.Event().wait()

    _run(main())


def _cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def bmc(a: argparse.Namespace) -> None:
    import requests

    for k in range(a.rounds):
        for streams in (True, False):
            port = a.port + 1 + 2 * k + streams
            ready = mp.Event()
            p = mp.Process(target=_bmc_server, args=(streams, port, ready), daemon=True)
            p.start()
            ready.wait(10)
            c0 = _cpu(p.pid)

            def work(port: int = port) -> None:
                s = requests.Session()
                r = s.post(f"http://127.0.0.1:{port}/redfish/v1/SessionService/Sessions",
                           json={"UserName": "a", "Password": "b"})
                s.headers["X-Auth-Token"] = r.headers["X-Auth-Token"]
                for _ in range(a.n):
                    assert s.get(f"http://127.0.0.1:{port}/redfish/v1/Systems/1").status_code == 200

            ths = [threading.Thread(target=work) for _ in range(8)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            per = (_cpu(p.pid) - c0) / (8 * (a.n + 1))
            print(f"bmc {'streams ' if streams else 'protocol'}: {per * 1e6:.0f} us server CPU per request "
                  f"(round {k})", flush=True)
            p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("client", "bmc"))
    ap.add_argument("--n", type=int, default=400, help="requests (client: in all; bmc: per thread)")
    ap.add_argument("--size", type=int, default=200, help="client: the answer's body bytes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=18080)
    a = ap.parse_args()
    (client if a.what == "client" else bmc)(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
