#!/usr/bin/env python3
"""The Redfish cost of the conductor's BMC steps against the storm's simulated BMCs (bench/storm/sim.py).

Serves sim.py's BMCs on 127.77.0.x:8000 (loopback only) in a thread and drives, in the main thread,
through the real RedfishDriver + SessionPool: the network-boot step (power state, DPU preflight, PXE
once, power on; bootsvc/conductor_bmc.py) on a new session, then the clear-override step on the pooled
one. Prints per step the driver thread's CPU (the simulator's thread not included) and the requests the
BMCs answered by (status, method, path). README "The simulated BMCs".

    .venv/bin/python bench/storm/redfish_cost.py [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE)]

import sim as S  # noqa: E402

from bootsvc.power.base import BootTarget, FatalBmcError, PowerSettings, PowerState  # noqa: E402
from bootsvc.power.redfish import RedfishDriver  # noqa: E402
from bootsvc.power.redfish_session import SessionPool  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="BMCs (one step each)")
    ap.add_argument("--streams", action="store_true", help="the simulated BMCs on asyncio streams (the storm's "
                    "earlier server) instead of sim.py's protocol")
    a = ap.parse_args()
    sim = S.Sim(argparse.Namespace(bmc_sessions=4, rack_size=40, rack_window=10, timeout=3600))
    sim.boot = lambda bmc: None  # type: ignore[method-assign]  # no firmware behind these BMCs
    counts: collections.Counter[str] = collections.Counter()
    answer = sim.redfish

    def counted(b: S.Bmc, method: str, path: str, h: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        st, doc, extra = answer(b, method, path, h, body)
        p = path.rstrip("/")
        counts[f"{st} {method} {'<session>' if p.startswith('/redfish/v1/SessionService/Sessions/') else p}"] += 1
        return st, doc, extra

    sim.redfish = counted  # type: ignore[method-assign]
    hosts = [f"127.77.{i // 250}.{i % 250 + 1}" for i in range(a.n)]
    ready = threading.Event()

    async def serve() -> None:
        if a.streams:
            await asyncio.start_server(sim.bmc_conn, hosts, 8000, backlog=4096)
        else:
            await asyncio.get_running_loop().create_server(sim.bmc_protocol, hosts, 8000, backlog=4096)
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    if not ready.wait(30):
        raise SystemExit("the simulated BMCs did not start")
    with tempfile.TemporaryDirectory() as td:
        cred = Path(td) / "cred"
        cred.write_text("admin\nsecret\n")
        os.chmod(cred, 0o600)
        settings = PowerSettings(credentials={"c": f"file:{cred}"})
        pool = SessionPool(idle_seconds=60)

        def drv(i: int) -> RedfishDriver:
            return RedfishDriver(f"http://{hosts[i]}:8000", "c", verify_tls=True, settings=settings, pool=pool)

        def boot(i: int) -> None:
            d = drv(i)
            before = d.power_state()
            try:
                d.dpu_facts()
            except FatalBmcError as e:
                if e.status != 404:  # not a BlueField: the conductor skips the preflight
                    raise
            d.boot_once(BootTarget.PXE)
            d.reset() if before is PowerState.ON else d.power_on()

        def clear(i: int) -> None:
            drv(i).clear_boot_override()

        for name, fn in (("network boot (new session)", boot), ("clear override (pooled session)", clear)):
            counts.clear()
            c0 = time.thread_time()
            for i in range(a.n):
                fn(i)
            cpu = time.thread_time() - c0
            print(json.dumps({"step": name, "driver_cpu_ms_per_step": round(cpu * 1000 / a.n, 2),
                              "requests_per_step": round(sum(counts.values()) / a.n, 2),
                              "by": {k: v / a.n for k, v in sorted(counts.items())}}))
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
