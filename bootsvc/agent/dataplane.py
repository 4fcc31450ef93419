"""Kernel side of the agent: observe the DPU's network state (``ip -j``, ``bridge -j``, ``nft``,
``/proc/sys``) into :class:`bootsvc.agent.plan.Observed`, and execute planned commands.

Owns: every subprocess the agent runs and the parsing of their JSON. Decisions live in
:mod:`bootsvc.agent.plan`; this module only translates. Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bootsvc.agent.plan import (
    LO_LABEL,
    NFT_TABLE,
    NFT_TAG,
    OWNER_ALIAS,
    RT_PROTO,
    RULE_PREFS,
    Addr,
    Cmd,
    Env,
    Fdb,
    Link,
    Neigh,
    Observed,
    Route,
    Rule,
    sysctl_keys,
)

log = logging.getLogger(__name__)

_TAG_RE = re.compile(r'comment "' + re.escape(NFT_TAG) + r'([0-9a-f]+)"')


class ApplyError(RuntimeError):
    """A command failed; ``cmd`` is the one that failed, the message carries its stderr."""

    def __init__(self, cmd: Cmd, detail: str) -> None:
        super().__init__(f"{cmd.argv[0]}: `{cmd}` failed: {detail}")
        self.cmd = cmd


@dataclass(frozen=True)
class Tools:
    """Binaries to run (configurable so a site can pin paths; the tests use it to inject faults)."""

    ip: str = "ip"
    bridge: str = "bridge"
    nft: str = "nft"
    proc_sys: str = "/proc/sys"


class Dataplane:
    def __init__(self, tools: Tools | None = None, *, timeout: float = 30.0) -> None:
        self.tools = tools or Tools()
        self.timeout = timeout

    # ---- running ---------------------------------------------------------------------------
    def _bin(self, tool: str) -> str:
        m = {"ip": self.tools.ip, "bridge": self.tools.bridge, "nft": self.tools.nft}
        if tool not in m:
            raise ValueError(f"unknown tool {tool}")
        return m[tool]

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._bin(argv[0]), *argv[1:]], input=stdin, capture_output=True,
                              text=True, timeout=self.timeout, check=False)

    def _json(self, argv: Sequence[str]) -> Any:
        res = self._run(argv)
        if res.returncode != 0:
            raise ApplyError(Cmd(tuple(argv)), res.stderr.strip() or f"exit {res.returncode}")
        return json.loads(res.stdout or "[]")

    def execute(self, cmds: Sequence[Cmd]) -> None:
        """Run commands in order; stop at the first failure with :class:`ApplyError`."""
        for cmd in cmds:
            log.info("apply: %s", cmd)
            if cmd.argv[0] == "sysctl":
                key, _, val = cmd.argv[-1].partition("=")
                try:
                    (Path(self.tools.proc_sys) / key).write_text(val + "\n")
                except OSError as e:
                    raise ApplyError(cmd, str(e)) from None
                continue
            try:
                res = self._run(cmd.argv, cmd.stdin)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise ApplyError(cmd, str(e)) from None
            if res.returncode != 0:
                raise ApplyError(cmd, (res.stderr.strip() or f"exit {res.returncode}")[:500])

    # ---- capability and facts ---------------------------------------------------------------
    def vrf_supported(self) -> bool:
        """Can this kernel create VRF devices (``CONFIG_NET_VRF``)? Probe with a throwaway device."""
        probe = "baprobevrf"
        res = self._run(["ip", "link", "add", probe, "type", "vrf", "table", "4242"])
        if res.returncode != 0:
            return False
        self._run(["ip", "link", "del", probe])
        return True

    def route_src(self, dst: IPv4Address) -> IPv4Address | None:
        """Source address the kernel picks towards ``dst`` in the main table (Zone 0)."""
        try:
            out = self._json(["ip", "-j", "route", "get", str(dst)])
        except (ApplyError, ValueError):
            return None
        for r in out:
            if r.get("prefsrc"):
                return IPv4Address(r["prefsrc"])
        return None

    def link_mac(self, dev: str) -> str | None:
        try:
            out = self._json(["ip", "-j", "link", "show", "dev", dev])
        except (ApplyError, ValueError):
            return None
        return str(out[0].get("address")) if out else None

    # ---- observation -----------------------------------------------------------------------
    def observe(self, env: Env) -> Observed:
        links: dict[str, Link] = {}
        for li in self._json(["ip", "-j", "-d", "link", "show"]):
            info = li.get("linkinfo") or {}
            data = info.get("info_data") or {}
            kind = info.get("info_kind")
            links[li["ifname"]] = Link(
                name=li["ifname"], kind=kind, master=li.get("master"),
                up="UP" in (li.get("flags") or []), mac=str(li.get("address", "")),
                alias=li.get("ifalias"),
                vxlan_id=data.get("id") if kind == "vxlan" else None,
                vxlan_local=data.get("local") if kind == "vxlan" else None,
                vxlan_port=data.get("port") if kind == "vxlan" else None,
                vxlan_learning=data.get("learning") if kind == "vxlan" else None,
                vrf_table=data.get("table") if kind == "vrf" else None,
            )
        addrs: list[Addr] = []
        for li in self._json(["ip", "-j", "-4", "addr", "show"]):
            for a in li.get("addr_info") or []:
                if a.get("family") != "inet":
                    continue
                if li["ifname"] == env.host_port or (li["ifname"] == "lo" and a.get("label") == LO_LABEL):
                    addrs.append(Addr(li["ifname"], f"{a['local']}/{a['prefixlen']}",
                                      bool(a.get("noprefixroute"))))
        rules: list[Rule] = []
        for r in self._json(["ip", "-j", "-4", "rule", "show"]):
            pref = int(r.get("priority", -1))
            if pref not in RULE_PREFS:
                continue
            dst = None
            if r.get("dst") and r["dst"] != "all":
                dst = str(IPv4Network(f"{r['dst']}/{r.get('dstlen', 32)}", strict=False))
            src = None
            if r.get("src") and r["src"] != "all":
                src = str(IPv4Network(f"{r['src']}/{r.get('srclen', 32)}", strict=False))
            mark = r.get("fwmark")
            rules.append(Rule(pref, str(r.get("table")), iif=r.get("iif") or r.get("iifname"),
                              oif=r.get("oif") or r.get("oifname"), dst=dst,
                              fwmark=int(mark, 0) if isinstance(mark, str) else mark, src=src,
                              suppress=r.get("suppress_prefixlength")))
        routes: list[Route] = []
        for r in self._json(["ip", "-j", "-4", "route", "show", "table", "all", "proto", RT_PROTO]):
            dst = r.get("dst", "default")
            if dst != "default":
                dst = str(IPv4Network(dst, strict=False))
            metric = r.get("metric")
            routes.append(Route(
                table=str(r.get("table", "main")), dst=dst, type=r.get("type", "unicast"),
                dev=r.get("dev"), via=r.get("gateway"), src=r.get("prefsrc"),
                onlink="onlink" in (r.get("flags") or []),
                metric=None if metric is None else str(metric)))
        neighs: list[Neigh] = []
        fdbs: list[Fdb] = []
        for name, link in links.items():
            if link.alias != OWNER_ALIAS:
                continue
            # With EVPN, FRR's zebra programs these same devices (remote router MACs and VTEPs,
            # FRR zebra/rt_netlink.c: NUD_REACHABLE/NUD_NOARP with NTF_EXT_LEARNED, the all-zero MAC
            # flood entry NUD_PERMANENT): never count those as ours, or converging would delete them.
            if link.kind == "bridge":
                for n in self._json(["ip", "-j", "-4", "neigh", "show", "dev", name, "nud", "permanent"]):
                    if n.get("lladdr") and "extern_learn" not in (n.get("flags") or []):
                        neighs.append(Neigh(name, n["dst"], n["lladdr"]))
            elif link.kind == "vxlan":
                for f in self._json(["bridge", "-j", "fdb", "show", "dev", name]):
                    if (f.get("dst") and f.get("state") == "permanent" and f.get("mac") != "00:00:00:00:00:00"
                            and "extern_learn" not in (f.get("flags") or [])):
                        fdbs.append(Fdb(name, f["mac"], f["dst"]))
        sysctls: dict[str, str] = {}
        for key in sysctl_keys(env):
            with contextlib.suppress(OSError):
                sysctls[key] = (Path(self.tools.proc_sys) / key).read_text().strip()
        tag, nrules = self._observe_nft()
        return Observed(links, tuple(addrs), tuple(rules), tuple(routes), tuple(neighs), tuple(fdbs),
                        sysctls, tag, nrules)

    def _observe_nft(self) -> tuple[str | None, int]:
        res = self._run(["nft", "list", "table", "inet", NFT_TABLE])
        if res.returncode != 0:
            return None, -1
        m = _TAG_RE.search(res.stdout)
        tag = m.group(1) if m else ""
        res = self._run(["nft", "-j", "list", "table", "inet", NFT_TABLE])
        if res.returncode != 0:
            return tag, -1
        try:
            items = json.loads(res.stdout).get("nftables", [])
        except ValueError:
            return tag, -1
        return tag, sum(1 for it in items if "rule" in it)
