"""Servers for the agent's netns tests (run as processes inside the lab's Zone 0 namespace), the node
secrets they accept, and the udhcpc script the hosts behind the DPUs use.

* ``dhcp``: a minimal DHCPv4 responder that speaks option 82 + RFC 6607 VSS (pools keyed by
  (VSS VRF, link-selection subnet)), echoes option 82 without VSS-Control, replies to giaddr:67, and
  logs every request's relay information as JSON lines. It exists only until bootsvc's own DHCP server
  (bootsvc/dhcp/server.py) is usable; it uses bootsvc's codec, not its own.
* ``api``: the agent API of docs/agent-api.md (checkin/policy/report, Bearer secret, ETag/304) with
  test-only control endpoints ``PUT /test/policy/<node>`` and ``GET /test/state``.

Run as ``python tests/helpers/agent_labsrv.py dhcp|api ...`` (`SCRIPT`); imports only bootsvc's codec.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bootsvc.dhcp.packet import BOOTREQUEST, MessageType, ParseError, parse, vss_vrf

SCRIPT = Path(__file__).resolve()
TEST_KEY = b"ba-test-key"
# The hosts' DHCP client hook (busybox udhcpc): address, then the lab's routes via the DPU's gateway.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    for r in 10.0.0.0/8 10.98.0.0/16 10.255.0.0/16; do ip route replace $r via "$router" dev "$interface"; done
    ;;
  deconfig) ip -4 addr flush dev "$interface" ;;
esac
"""


def node_secret(node: str) -> str:
    return hmac.new(TEST_KEY, node.encode(), hashlib.sha256).hexdigest()


# ------------------------------------------------------------------ DHCP responder ----------------


def serve_dhcp(addr: str, log_path: str, pools_json: str) -> None:
    """pools_json: {"<vrf>|<subnet cidr>": {"gateway": "10.0.0.1", "first": 100, "bootfile"?: url,
    "reserved"?: {mac: address}}}"""
    pools: dict[tuple[str, IPv4Network], dict[str, Any]] = {}
    for k, v in json.loads(pools_json).items():
        vrf, net = k.split("|")
        pools[(vrf, IPv4Network(net))] = v
    leases: dict[tuple[str, IPv4Network, str], IPv4Address] = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 67))
    me = IPv4Address(addr)
    logf = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    while True:
        data, src = s.recvfrom(4096)
        try:
            pkt = parse(data)
            info = pkt.relay_info()
        except ParseError as e:
            logf.write(json.dumps({"drop": e.reason}) + "\n")
            continue
        if pkt.op != BOOTREQUEST or info is None or info.vss is None:
            logf.write(json.dumps({"drop": "no_vss"}) + "\n")
            continue  # RFC 6607 §3: a VSS names the pool; never fall back to a global one
        vrf = vss_vrf(info.vss)
        link = IPv4Address(info.link_selection or pkt.giaddr)
        pool_key = next(((v, n) for (v, n) in pools if v == vrf and link in n), None)
        rec = {"src": src[0], "giaddr": str(IPv4Address(pkt.giaddr)), "ciaddr": str(IPv4Address(pkt.ciaddr)),
               "hops": pkt.hops,
               "msg": pkt.msg_type, "mac": pkt.mac, "vrf": vrf, "vss_control": info.vss_control,
               "circuit_id": (info.circuit_id or b"").decode(errors="replace"),
               "remote_id": (info.remote_id or b"").decode(errors="replace"),
               "link_selection": str(link),
               "server_id_override": str(IPv4Address(info.server_id_override))
               if info.server_id_override else None,
               "pool": None if pool_key is None else f"{pool_key[0]}|{pool_key[1]}"}
        logf.write(json.dumps(rec) + "\n")
        if pool_key is None or pkt.msg_type not in (MessageType.DISCOVER, MessageType.REQUEST):
            continue
        net = pool_key[1]
        cfg = pools[pool_key]
        lk = (pool_key[0], net, pkt.mac)
        reserved = cfg.get("reserved", {})
        if pkt.mac in reserved:
            leases[lk] = IPv4Address(reserved[pkt.mac])
        if lk not in leases:
            used = {a for (v, n, _m), a in leases.items() if (v, n) == pool_key}
            ip = net.network_address + int(cfg["first"])
            while ip in used:
                ip += 1
            leases[lk] = ip
        reply = pkt.reply(MessageType.OFFER if pkt.msg_type == MessageType.DISCOVER else MessageType.ACK)
        reply.yiaddr = leases[lk].packed
        # RFC 5107: the override becomes our server identifier towards the client
        sid = info.server_id_override or me.packed
        reply.set(54, sid)
        reply.set(51, (600).to_bytes(4, "big"))
        reply.set(1, net.netmask.packed)
        reply.set(3, IPv4Address(cfg["gateway"]).packed)
        if cfg.get("bootfile"):
            reply.set(67, str(cfg["bootfile"]))  # e2e: iPXE chains to the HTTP script
        reply.set(82, info.echo())  # RFC 6607 §3.3: echo without 152 = "VSS understood"
        s.sendto(reply.encode(), (str(IPv4Address(pkt.giaddr)), 67))


# ------------------------------------------------------------------ agent API ---------------------


class ApiState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.policies: dict[str, dict[str, Any]] = {}
        self.checkins: dict[str, list[dict[str, Any]]] = {}
        self.reports: dict[str, list[dict[str, Any]]] = {}
        if path.exists():
            self.policies = json.loads(path.read_text())

    def save(self) -> None:
        self.path.write_text(json.dumps(self.policies))


def make_handler(st: ApiState) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
            raw = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            doc = json.loads(self.rfile.read(n) or b"{}")
            assert isinstance(doc, dict)
            return doc

        def _auth(self) -> str | None:
            node = self.headers.get("X-Bootsvc-Node", "")
            auth = self.headers.get("Authorization", "")
            if node not in st.policies:
                self._send(404, {"error": "unknown node"})
                return None
            if not hmac.compare_digest(auth, f"Bearer {node_secret(node)}"):
                self._send(401, {"error": "bad secret"})
                return None
            return node

        def do_GET(self) -> None:
            if self.path == "/test/state":
                with st.lock:
                    self._send(200, {"checkins": st.checkins, "reports": st.reports})
                return
            if self.path != "/api/v1/agent/policy":
                self._send(404, {"error": "no such endpoint"})
                return
            node = self._auth()
            if node is None:
                return
            with st.lock:
                pol = st.policies[node]
            etag = f'"{pol["version"]}"'
            if self.headers.get("If-None-Match") == etag:
                self._send(304, None, {"ETag": etag})
                return
            self._send(200, pol, {"ETag": etag})

        def do_POST(self) -> None:
            if self.path not in ("/api/v1/agent/checkin", "/api/v1/agent/report"):
                self._send(404, {"error": "no such endpoint"})
                return
            node = self._auth()
            if node is None:
                return
            body = self._body()
            with st.lock:
                if self.path.endswith("checkin"):
                    st.checkins.setdefault(node, []).append(body)
                    st.checkins[node] = st.checkins[node][-5:]
                    self._send(200, {"node": node, "policy_version": st.policies[node]["version"]})
                else:
                    st.reports.setdefault(node, []).append(body)
                    self._send(200, {"ok": True})

        def do_PUT(self) -> None:
            if not self.path.startswith("/test/policy/"):
                self._send(404, {"error": "no such endpoint"})
                return
            node = self.path.rsplit("/", 1)[1]
            with st.lock:
                st.policies[node] = self._body()
                st.save()
            self._send(200, {"ok": True})

    return H


def serve_api(addr: str, port: int, state_path: str) -> None:
    st = ApiState(Path(state_path))
    srv = ThreadingHTTPServer((addr, port), make_handler(st))
    srv.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "dhcp":
        serve_dhcp(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "api":
        serve_api(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit("usage: dhcp ADDR LOG POOLS | api ADDR PORT STATE")
