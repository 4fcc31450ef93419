"""The DHCPv4 server process: socket -> parse -> inventory -> decide -> persist -> send.

Owns: the UDP socket on one interface (SO_BINDTODEVICE, in whatever network namespace the
supervisor started us in), reply delivery per RFC 2131 §4.1 (relay port 67, unicast to ciaddr,
broadcast, or a raw Ethernet frame to chaddr for clients without an address), group commit of
bindings before their ACKs leave, drop/rate-limit accounting, the in-memory inventory cache (MAC ->
node view, reservations) and one structured log line per decision.

Threads: one loop thread per listener does everything on the packet path (no locks on the hot path
beyond the lease store's); one maintenance thread refreshes the inventory cache and, for several
instances on one PostgreSQL, the lease index. On PostgreSQL a committer thread runs the group
commits, so the loop goes on answering DISCOVERs while a commit waits for the database's WAL flush
(~3 ms here, longer than the packet work of a whole batch); the loop still sends every reply, after
the commit that makes it durable. Decisions are pure (``decide``), so this module is only plumbing.

Split by concern: interface facts and raw frames (``frames``), token buckets (``ratelimit``), the
inventory cache and the record of unknown clients (``clients``), the lease index (``leases``) and
its durable writes (``leasedb``). What stays here (~730 lines) is one piece on purpose: the receive
loop, the group commit and its committer thread, the paced sends and the overload shedding share
the loop's state (pending batch, outbox, in-flight count, receive-queue level) and their ordering
is the durability contract - an ACK only after its commit.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import queue
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import metrics
from bootsvc.config import Config, DhcpListener
from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.clients import DiscoveredClients, Inventory
from bootsvc.dhcp.frames import ETH_P_IP, IP_PKTINFO, SO_BINDTODEVICE, ether_frame, iface_ipv4, iface_mac
from bootsvc.dhcp.leases import LeaseStore, client_key
from bootsvc.dhcp.packet import (
    BOOTREQUEST,
    ZERO_IP,
    MessageType,
    Packet,
    ParseError,
    ip_str,
    parse,
)
from bootsvc.dhcp.ratelimit import RateLimiter
from bootsvc.views import NodeView

__all__ = ["DhcpService", "RateLimiter", "publish_metrics", "run", "run_dhcp"]

log = logging.getLogger("bootsvc.dhcp")

_MT_NAMES = {m.value: m.name.lower() for m in MessageType}
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # Linux: u32[] whose [0] is the bytes queued
_IPPROTO_IP = socket.IPPROTO_IP
_CMSG_SPACE = socket.CMSG_SPACE(12)
_BACKLOG_EVERY = 128  # packets between two looks at the receive queue
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_DISCOVER_HEAD = b"c\x82Sc\x35\x01\x01"  # magic cookie, then option 53 = DISCOVER
_RX_KEYS = {m: "rx_" + n for m, n in _MT_NAMES.items()}
# Options a reply keeps when it has to shed some to fit option 57: message type and server id
# (RFC 2131 §4.3.1 Table 3 MUST), lease time (MUST in OFFER/ACK), the echoed client identifier
# (RFC 6842 §3 MUST), the NAK's message (56). Relay agent information (82) goes before requested
# options: RFC 3046 §2.2 has the server send the reply without it when it does not fit.
_MUST_KEEP = frozenset({53, 54, 51, 61, 56})
_TX_KEYS_B = {bytes((m,)): "tx_" + n for m, n in _MT_NAMES.items()}  # keyed by option 53's value
_SEL_CACHE_MAX = 1024


@dataclass(slots=True)
class _Pending:
    pkt: Packet
    decision: dec.Decision
    staged: tuple[dec.LeaseIntent, int | None]
    inputs: dec.Inputs


class DhcpService:
    """One DHCP listener (interface). ``start()`` spawns the loop; ``stop()`` joins it."""

    def __init__(
        self,
        config: Config,
        listener: DhcpListener,
        sessions: sessionmaker[Session] | None,
        *,
        store: LeaseStore | None = None,
        inventory: Inventory | None = None,
        refresh_seconds: float = 2.0,
        batch_wait: float = 0.005,
        batch_max: int = 512,
        clock: Callable[[], float] = time.time,
        log_rate: int = 200,
        shed_above: int = 1 << 20,
        coalesce: float = 0.001,
        pipeline: bool | None = None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.sessions = sessions
        engine: Engine | None = None
        if sessions is not None:
            bind = sessions.kw.get("bind")
            engine = bind if isinstance(bind, Engine) else None
        self.engine = engine
        self.store = store or LeaseStore(engine, config.networks,
                                         offer_ttl=config.dhcp.offer_ttl_seconds,
                                         match_client_id=config.dhcp.match_client_id,
                                         instance=(config.dhcp.instance_index, config.dhcp.instance_count))
        self.inventory = inventory or Inventory(sessions)
        self._res_gen = -1  # the inventory's reservations generation the lease store holds
        self.refresh_seconds = refresh_seconds
        self.batch_wait = batch_wait
        self.batch_max = batch_max
        self.coalesce = coalesce
        self.clock = clock
        self.counters_: dict[str, int] = {"rx": 0}
        self.mac_limit = RateLimiter(config.dhcp.per_mac_rate)
        self.relay_limit = RateLimiter(config.dhcp.per_relay_rate)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sock: socket.socket | None = None
        self.raw: socket.socket | None = None
        self.my_ip: bytes | None = None
        self.my_mac: bytes | None = None
        self.networks: list[dec.NetworkView] = []
        self.local: list[dec.NetworkView] = []
        self.policy = dec.Policy()
        # network selection of relayed requests without option 82/221 depends on giaddr alone
        self._sel_cache: dict[bytes, dec.Selection] = {}
        self._sel_nets: list[dec.NetworkView] | None = None
        self.discovered = DiscoveredClients(sessions, clock, self._count)
        # committed replies waiting to be sent by the loop (``_flush(pace=True)``)
        self.outbox: deque[tuple[Packet, dec.Destination | None, Packet]] = deque()
        # commits on the committer thread (None: when the leases are in PostgreSQL, where a commit
        # is a network round trip plus a WAL flush; SQLite's ~50 µs commit stays on the loop)
        self.pipeline = pipeline
        self._commit_q: queue.SimpleQueue[list[_Pending] | None] = queue.SimpleQueue()
        # (batch, per-item success or None on a database error, commit time, batches merged)
        self._committed: deque[tuple[list[_Pending], list[bool] | None, float, int]] = deque()
        self._inflight = 0  # batches submitted and not yet settled (loop thread only)
        self._committer_thread: threading.Thread | None = None
        self.ready = threading.Event()
        # INFO logging on? Re-read by the maintenance thread (a level change shows within
        # refresh_seconds) instead of asking the logger for every decision.
        self._info = log.isEnabledFor(logging.INFO)
        # Decision lines: at most log_rate per second at INFO; above that (a PXE storm, a load test)
        # the rest go to DEBUG and one INFO line per second says how many were demoted. A log line
        # costs more CPU than the rest of the packet path (LogRecord + formatting + write).
        self.log_rate = log_rate
        # Overload: while more than shed_above bytes wait in the socket's receive queue (1 MiB ~
        # 800 datagrams; never more than 3/4 of the buffer), DISCOVERs are dropped
        # unparsed ("drop_overload") until it is below a quarter of that. Their clients
        # retransmit (RFC 2131 §4.1: ~4 s, with back-off); answering them late only delays the
        # REQUESTs queued behind them, which complete DORAs, and a full queue makes the kernel
        # drop REQUESTs and DISCOVERs alike. Sampled every _BACKLOG_EVERY packets (one
        # getsockopt), so the packet path pays one attribute test.
        self.shed_above = shed_above
        self.shedding = False
        # several instances behind relays that forward to all of them (config dhcp.instance_*): this
        # one answers the DISCOVERs of its share of the clients, and any client once it has been
        # trying for lb_max_seconds (secs, RFC 2131 §2) - so a dead instance's share is served too
        d = config.dhcp
        self.lb = (d.instance_index, d.instance_count, d.lb_max_seconds) if d.instance_count > 1 else None
        self._log_sec = 0
        self._log_n = 0

    # ---- lifecycle ----------------------------------------------------------------------------
    def _setup(self) -> None:
        lst = self.listener
        ip = lst.address.packed if lst.address is not None else iface_ipv4(lst.interface)
        self.my_ip = ip
        self.my_mac = iface_mac(lst.interface)
        default_sid = ipaddress.IPv4Address(ip) if ip is not None else None
        self.networks = [dec.NetworkView.from_config(n, default_sid) for n in self.config.networks]
        self.local = []
        if ip is not None:
            a = int.from_bytes(ip, "big")
            self.local = [n for n in self.networks if (a & n.mask) == n.net]
        ids = {n.server_id for n in self.networks}
        if ip is not None:
            ids.add(ip)
        d = self.config.dhcp
        self.policy = dec.Policy(unknown_clients=d.unknown_clients,
                                 discovery_lease_seconds=d.discovery_lease_seconds,
                                 http_port=self.config.boot.http_port,
                                 arm64_nbp=self.config.boot.arm64_nbp, my_ids=frozenset(ids))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # Not deeper (capped by net.core.rmem_max, ~400 KiB ~ 300 datagrams here): a 4 MiB queue
        # (SO_RCVBUFFORCE) did worse in the noisy runs of bench/dhcp/README.md, plausibly because
        # once behind, the server kept answering requests their clients had given up on (perfdhcp
        # counts a reply after 1 s as lost) instead of the kernel dropping them at the door.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, lst.interface.encode())
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        # 0.0.0.0 is required to receive broadcasts; SO_BINDTODEVICE confines us to one interface
        s.bind(("0.0.0.0", lst.port))
        self.sock = s
        try:
            r = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
            r.bind((lst.interface, 0))
            self.raw = r
        except OSError:
            self.raw = None  # no CAP_NET_RAW: fall back to broadcast for l2 replies
        self.inventory.reload()
        self._res_gen = self.inventory.reservations_gen
        self.store.set_reservations(self.inventory.reservations)
        self.store.load()

    def start(self) -> None:
        self._setup()
        # The lease index holds many long-lived objects; default GC thresholds would rescan them
        # every few hundred allocations. Packets create no reference cycles, so collect rarely and
        # keep start-up objects out of the scans.
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        if self.pipeline is None:
            self.pipeline = self.store.dialect == "postgresql"
        t = threading.Thread(target=self._loop, name=f"dhcp-{self.listener.interface}", daemon=True)
        m = threading.Thread(target=self._maintain, name="dhcp-maint", daemon=True)
        self._threads = [t, m]
        if self.pipeline:
            self._committer_thread = threading.Thread(target=self._committer, name="dhcp-commit", daemon=True)
            self._committer_thread.start()
        t.start()
        m.start()
        self.ready.set()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._commit_q.put(None)  # the loop has submitted its last batch: let the committer end
        if self._committer_thread is not None:
            self._committer_thread.join(timeout=10)
        self.discovered.write()
        for s in (self.sock, self.raw):
            if s is not None:
                s.close()
        self.store.close()

    def counters(self) -> dict[str, int]:
        return dict(self.counters_)

    def _count(self, key: str, n: int = 1) -> None:
        c = self.counters_
        c[key] = c.get(key, 0) + n

    # ---- maintenance --------------------------------------------------------------------------
    def _maintain(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self._info = log.isEnabledFor(logging.INFO)
                self.discovered.write()
                # a signature query, then only what changed (Inventory): flat in the fleet's size
                self.inventory.refresh()
                if self.inventory.reservations_gen != self._res_gen:
                    self._res_gen = self.inventory.reservations_gen
                    self.store.set_reservations(self.inventory.reservations)
                # other instances (another listener process, another host on one PostgreSQL)
                if self.store.dialect == "postgresql" or len(self.config.listeners.dhcp) > 1:
                    self.store.refresh()
                self.store.checkpoint()
                now = self.clock()
                # a full scan of the buckets every refresh costs ~1 % of a loaded server's CPU;
                # allow() prunes anyway when the table fills, so only tidy up once it is large
                for lim in (self.mac_limit, self.relay_limit):
                    if len(lim.buckets) > lim.max_keys // 8:
                        lim.prune(now)
            except Exception:  # keep serving with the last good view; the error is logged
                log.exception("dhcp maintenance failed")
                self._count("maint_errors")

    # ---- packet path --------------------------------------------------------------------------
    def _loop(self) -> None:
        """Receive, decide, group-commit, send - in two modes.

        Quiet: a blocking receive with a kernel timeout (SO_RCVTIMEO: the group-commit deadline while
        writes are pending, else an idle tick that lets ``stop()`` end the loop). Busy (a packet just
        arrived): read with MSG_DONTWAIT until the queue is empty, then nap ``coalesce`` seconds and
        take whatever queued meanwhile in one pass - interrupt moderation as NAPI does it for NICs. One
        wake-up then serves several packets with warm caches instead of one packet per wake-up, and
        the pass ends in one commit. A pass that finds nothing returns to the blocking receive, so an
        idle server does not tick. The nap adds at most ``coalesce`` to a reply (DHCP clients wait
        seconds: RFC 2131 §4.1)."""
        sock = self.sock
        assert sock is not None
        sock.setblocking(True)
        idle = struct.pack("ll", 0, 200_000)
        us = max(1000, int(self.batch_wait * 1e6))
        short = struct.pack("ll", us // 1_000_000, us % 1_000_000)
        timeo = idle
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, idle)
        pending: list[_Pending] = []
        first = 0.0
        recvmsg = sock.recvmsg
        handle = self.handle
        out = self.outbox
        popleft = out.popleft
        send = self._send
        mono = time.monotonic
        nap = self.coalesce
        sleep = time.sleep
        wait = self.batch_wait
        most = self.batch_max
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        high = min(self.shed_above, rcvbuf * 3 // 4)
        low = high // 4
        n = 0
        flags = 0  # 0: blocking receive (quiet); MSG_DONTWAIT: draining (busy)
        got = 0  # packets taken since the last nap
        flush = self._submit if self.pipeline else self._flush
        committed = self._committed
        settle = self._settle
        while not self._stop.is_set():
            try:
                data, anc, _flags, peer = recvmsg(4096, _CMSG_SPACE, flags)
            except (BlockingIOError, TimeoutError):
                # the queue is empty (draining) or the receive timed out (quiet)
                if pending and (not flags or mono() - first >= wait):
                    flush(pending, True)
                    pending = []
                if committed:
                    settle()
                while out:
                    send(*popleft())
                if flags and got and nap:
                    got = 0
                    sleep(nap)
                    continue
                flags = 0
                # a commit in flight: look again within batch_wait for its replies
                want = short if pending or self._inflight else idle
                if want is not timeo:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, want)
                    timeo = want
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            flags = _MSG_DONTWAIT
            got += 1
            n += 1
            if n >= _BACKLOG_EVERY:
                n = 0
                queued = self.backlog()
                self.shedding = queued > (low if self.shedding else high)
            p = handle(data, anc, peer)
            if p is not None:
                if not pending:
                    first = mono()
                pending.append(p)
            # group commit: one transaction for the REQUESTs of up to ``batch_wait`` (a few ms of ACK
            # latency). Its ACKs leave paced, two after each packet taken, the rest once the queue is
            # empty: sent back to back, a commit's worth of ACKs on top of the OFFERs overflowed the
            # relay's socket (perfdhcp: 170 replies within 1 ms, thousands of receive-buffer drops)
            if committed:
                settle()
            if out:
                send(*popleft())
                if out:
                    send(*popleft())
            if pending and (len(pending) >= most or mono() - first >= wait):
                flush(pending, True)
                pending = []
        if pending:
            flush(pending, True)
        if self.pipeline:
            # the replies of the batches still in flight (bounded: a hung database is not waited for)
            end = mono() + 10.0
            while self._inflight and mono() < end:
                settle()
                sleep(0.005)
            settle()
        while out:
            send(*popleft())

    def backlog(self) -> int:
        """Bytes waiting in the receive queue (SO_MEMINFO rmem_alloc; 0 where unsupported)."""
        if self.sock is None:
            return 0
        try:
            return int.from_bytes(self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4), sys.byteorder)
        except OSError:
            return 0

    def handle(self, data: bytes, anc: Sequence[tuple[int, int, bytes]] = (),
               peer: Any = None) -> _Pending | None:
        """Process one datagram. Returns a pending durable write (ACK/RELEASE/DECLINE) or None."""
        c = self.counters_
        c["rx"] += 1
        if self.shedding and data[236:243] == _DISCOVER_HEAD:
            # overloaded, and a DISCOVER (option 53 first, as clients send it): shed it before
            # parsing so the queue drains and the REQUESTs in it are answered
            c["rx_discover"] = c.get("rx_discover", 0) + 1
            return self._drop("overload")
        try:
            pkt = parse(data)
            if not pkt.is_dhcp:
                return self._drop("not_dhcp")
            if pkt.op != BOOTREQUEST:
                return self._drop("not_request")
            if pkt.htype != 1 or pkt.hlen != 6:
                return self._drop("bad_htype")
            mt = pkt.msg_type
            if mt is None:
                return self._drop("no_msg_type")
            name = _MT_NAMES.get(mt)
            if name is None:
                return self._drop("bad_msg_type")
            k = _RX_KEYS[mt]
            c[k] = c.get(k, 0) + 1
            # another instance's client (DISCOVER, or a REQUEST without ciaddr: SELECTING/INIT-REBOOT,
            # which the instances cannot tell apart by option 54 when they share a boot_server)
            if self.lb is not None and (mt == 1 or (mt == 3 and pkt.ciaddr == ZERO_IP)) \
                    and pkt.secs < self.lb[2] and zlib.crc32(pkt.chaddr[:6]) % self.lb[1] != self.lb[0]:
                return self._drop("peer_share")
            now = self.clock()
            unicast = False
            for level, typ, cdata in anc:
                if level == _IPPROTO_IP and typ == IP_PKTINFO and len(cdata) >= 12:
                    unicast = cdata[8:12] != b"\xff\xff\xff\xff"
            if pkt.giaddr != ZERO_IP and not self.relay_limit.allow(pkt.giaddr, now):
                return self._drop("rate_relay")
            if not self.mac_limit.allow(pkt.chaddr, now):
                return self._drop("rate_mac")
            return self._decide(pkt, mt, now, unicast)
        except ParseError as e:
            return self._drop(e.reason)
        except Exception:  # a bug must not take the server down; count and log it
            log.exception("dhcp: unexpected error handling a packet")
            return self._drop("internal_error")

    def _drop(self, reason: str) -> _Pending | None:
        self._count("drop_" + reason)
        return None

    def _select(self, pkt: Packet) -> dec.Selection:
        gi = pkt.giaddr
        opts = pkt.options
        if gi == ZERO_IP or 82 in opts or 221 in opts:
            return dec.select(pkt, self.networks, self.local)
        cache = self._sel_cache
        if self._sel_nets is not self.networks:  # (re)configured: forget old selections
            cache.clear()
            self._sel_nets = self.networks
        sel = cache.get(gi)
        if sel is None:
            sel = dec.select(pkt, self.networks, self.local)
            if len(cache) < _SEL_CACHE_MAX:  # unknown relays flooding us must not grow it
                cache[gi] = sel
        return sel

    def _decide(self, pkt: Packet, mt: int, now: float, unicast: bool) -> _Pending | None:
        sel = self._select(pkt)
        net = sel.network
        if net is None:
            return self._drop(sel.reason)
        mac = pkt.mac
        node = self.inventory.by_mac.get(mac)
        vrf = sel.vrf
        store = self.store
        # RFC 2131 §2: the client identifier, when present, identifies the client (leases.client_key)
        cid = pkt.options.get(61)
        key = mac if cid is None else client_key(mac, cid, store.match_client_id)
        lease = store.lookup(vrf, key)
        reserved: bytes | None = None
        if node is not None:
            for nic in node.nics:
                if nic.mac == mac and nic.ipv4:
                    r = ipaddress.IPv4Address(nic.ipv4).packed
                    if net.contains(r):
                        reserved = r
        candidate = None
        taken = False
        if mt == 1:  # DISCOVER (ints, not enum members: this runs for every packet)
            if node is not None or self.policy.unknown_clients != "ignore":
                candidate = store.candidate(vrf, net.name, mac, now, reserved=reserved,
                                            requested=pkt.get_ip(50), key=key)
        elif mt == 3:  # REQUEST
            want = pkt.get_ip(50) or pkt.ciaddr
            if want != ZERO_IP:
                taken = store.held_by_other(vrf, want, mac, now, key)
        inp = dec.Inputs(pkt, sel, node, lease, candidate, reserved, taken, now, unicast)
        d = dec.decide(inp, self.policy)
        c = self.counters_
        c[d.outcome] = c.get(d.outcome, 0) + 1
        it = d.lease
        if it is not None:
            action = it.action
            if action == "offer":
                store.offer(it, now)
            elif action == "unoffer":
                store.unoffer(it)
            else:
                staged = store.stage(it, now)
                if d.discovered:
                    self.discovered.note(pkt, net, sel, it.address)
                return _Pending(pkt, d, staged, inp)
        if d.discovered:
            self.discovered.note(pkt, net, sel, it.address if it else None)
        if self._info:
            self._log(pkt, d, node, net)
        if d.reply is not None:
            self._send(d.reply, d.dest, pkt)
        return None

    def _submit(self, pending: list[_Pending], pace: bool = True) -> None:
        """Pipelined ``_flush``: hand the batch to the committer thread; its replies come back
        through ``_settle`` on the loop thread."""
        self._inflight += 1
        self._commit_q.put(pending)

    def _committer(self) -> None:
        """Commit the batches the loop submits, in order; batches that queued while a commit was
        waiting for the database go into the next transaction together (group commit)."""
        q = self._commit_q
        done = False
        while not done:
            batch = q.get()
            if batch is None:
                return
            n = 1
            while True:
                try:
                    more = q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                batch = batch + more
                n += 1
            now = self.clock()
            ok: list[bool] | None
            try:
                ok = self.store.commit([p.staged for p in batch], now)
            except Exception:
                log.exception("dhcp: lease commit failed; %d replies withheld", len(batch))
                ok = None
            self._committed.append((batch, ok, now, n))

    def _settle(self) -> None:
        """Loop thread: the replies of the batches the committer finished."""
        c = self._committed
        while c:
            batch, ok, now, n = c.popleft()
            self._inflight -= n
            self._after_commit(batch, ok, now, True)

    def _flush(self, pending: list[_Pending], pace: bool = False) -> None:
        """Commit every staged lease write in one transaction, then send the ACKs (RFC 2131 §3.1
        step 4: an ACK never leaves before its lease is durable). ``pace``: queue them on ``outbox`` instead, for
        the loop to send a few after each packet it takes (see ``_loop``)."""
        now = self.clock()
        ok: list[bool] | None
        try:
            ok = self.store.commit([p.staged for p in pending], now)
        except Exception:
            log.exception("dhcp: lease commit failed; %d replies withheld", len(pending))
            ok = None
        self._after_commit(pending, ok, now, pace)

    def _after_commit(self, pending: list[_Pending], ok: list[bool] | None, now: float, pace: bool) -> None:
        if ok is None:
            self._count("drop_db_error", len(pending))
            return
        self._count("commits")
        self._count("committed", len(pending))
        info = self._info
        send = self._send
        for p, good in zip(pending, ok, strict=True):
            d = p.decision
            if not good:
                self.store.conflict(p.staged[0], now)
                self._count("lease_conflict")
                net = p.inputs.selection.network
                assert net is not None
                d = dec.nak(p.inputs, net, d.state, "address taken")
            if info:
                self._log(p.pkt, d, p.inputs.node, p.inputs.selection.network)
            if d.reply is not None:
                if pace:
                    self.outbox.append((d.reply, d.dest, p.pkt))
                else:
                    send(d.reply, d.dest, p.pkt)

    # ---- output -------------------------------------------------------------------------------
    def _log(self, pkt: Packet, d: dec.Decision, node: NodeView | None, net: dec.NetworkView | None) -> None:
        """One structured line per decision (INFO, rate-limited: see ``log_rate``)."""
        if not self._info:
            return
        sec = int(time.monotonic())
        if sec != self._log_sec:
            over = self._log_n - self.log_rate
            if over > 0:
                log.info("dhcp: %d decision lines above %d/s logged at DEBUG only (see counters)",
                         over, self.log_rate)
            self._log_sec, self._log_n = sec, 0
        self._log_n += 1
        level = logging.INFO
        if self._log_n > self.log_rate:
            if not log.isEnabledFor(logging.DEBUG):
                return
            level = logging.DEBUG
        r = d.reply
        addr = ip_str(r.yiaddr) if r is not None and r.yiaddr != ZERO_IP else (
            ip_str(d.lease.address) if d.lease is not None else "-")
        extra = "".join(f" {k}={v}" for k, v in d.log.items() if v) if d.log else ""
        # formatted here, once, with an f-string: cheaper than %-args through LogRecord.getMessage
        log.log(level, f"dhcp mac={pkt.mac} xid={pkt.xid:08x} node={node.name if node else '-'} "
                f"state={d.state} outcome={d.outcome} addr={addr} net={net.name if net else '-'} "
                f"vrf={net.vrf if net else '-'} relay={ip_str(pkt.giaddr) if pkt.giaddr != ZERO_IP else '-'}"
                f"{extra}")

    def _send(self, reply: Packet, dest: dec.Destination | None, req: Packet) -> None:
        if dest is None or self.sock is None:
            return
        try:
            data = reply.encode(max_size=req.max_size)
        except ValueError:
            # too large even with option overload: drop the least wanted options instead of the reply
            try:
                data, dropped = reply.encode_fit(req.max_size, _MUST_KEEP, req.param_list)
            except ValueError:
                self._count("drop_encode")
                return
            self._count("options_dropped", len(dropped))
            if 82 in dropped:  # RFC 3046 §2.2: SHOULD increment an error counter
                self._count("relay_info_dropped")
            log.debug("dhcp: reply to %s over %d bytes: dropped options %s", req.mac, req.max_size,
                      ",".join(map(str, dropped)))
        try:
            if dest.mode == "relay":
                self.sock.sendto(data, (dest.ip, dest.port))
            elif dest.mode == "l2" and dest.mac is not None:
                if self.raw is not None and self.my_mac is not None and self.my_ip is not None:
                    self.raw.send(ether_frame(self.my_mac, dest.mac, self.my_ip, reply.yiaddr, data,
                                              self.listener.port, 68))
                    self._count("tx_l2")
                else:  # §4.1 allows broadcast when unicast to chaddr is impossible
                    self.sock.sendto(data, ("255.255.255.255", 68))
                    self._count("tx_l2_broadcast")
            else:
                self.sock.sendto(data, (dest.ip, dest.port))
            k = _TX_KEYS_B.get(reply.options.get(53, b""), "tx_unknown")
            c = self.counters_
            c[k] = c.get(k, 0) + 1
        except OSError as e:
            self._count("tx_error")
            log.warning("dhcp: send to %s:%d failed: %s", dest.ip, dest.port, e)


def publish_metrics(svc: DhcpService, registry: metrics.Registry | None = None) -> None:
    """Expose a listener's counters through the process's metrics registry: the flusher the
    supervisor starts for this process (``bootsvc.daemon.run_one``) writes them into the snapshot
    that ``GET /metrics`` renders as ``bootsvc_dhcp_messages_total{direction,type}``,
    ``bootsvc_dhcp_dropped_total{reason}`` and ``bootsvc_dhcp_events_total{event}``, each with
    ``interface``. The packet path keeps its plain dict (no lock, no label handling per packet); the
    source copies it once per flush (``dict(d)`` is one C call under the GIL, so the copy is
    consistent while the loop thread keeps counting)."""
    reg = registry if registry is not None else metrics.counters
    iface = svc.listener.interface
    reg.add_source(lambda: metrics.dhcp_counter_samples(svc.counters(), iface))


def run_dhcp(config: Config, session_factory: sessionmaker[Session] | None,
             stop: threading.Event | None = None) -> None:
    """Supervisor entry: serve every ``listeners.dhcp`` entry until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    services = [DhcpService(config, lst, session_factory) for lst in config.listeners.dhcp]
    if not services:
        log.warning("dhcp: no listeners configured")
    # one store per process, shared by the listeners: the lease index must be one truth
    if len(services) > 1:
        for s in services[1:]:
            s.store = services[0].store
            s.inventory = services[0].inventory
    for s in services:
        publish_metrics(s)
    try:
        for s in services:
            s.start()
            log.info("dhcp: listening on %s port %d", s.listener.interface, s.listener.port)
        stop.wait()
    finally:
        for s in services:
            s.stop()
            log.warning("dhcp: %s stopped; counters %s", s.listener.interface,
                        " ".join(f"{k}={v}" for k, v in sorted(s.counters().items())))


def run(config: Config, index: int, stop: threading.Event) -> None:
    """Supervisor runner (``bootsvc.daemon``): serve ``listeners.dhcp[index]`` until ``stop``."""
    from bootsvc import db

    engine = db.make_engine(config.database.url)
    svc = DhcpService(config, config.listeners.dhcp[index], db.session_factory(engine))
    publish_metrics(svc)
    svc.start()
    log.info("dhcp: listening on %s port %d", svc.listener.interface, svc.listener.port)
    try:
        stop.wait()
    finally:
        svc.stop()
        log.warning("dhcp: %s stopped; counters %s", svc.listener.interface,
                    " ".join(f"{k}={v}" for k, v in sorted(svc.counters().items())))
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bootsvc.dhcp.server CONFIG`` (tests and benches; production uses the supervisor)."""
    import argparse

    from bootsvc import config as cfgmod
    from bootsvc import db

    ap = argparse.ArgumentParser(prog="bootsvc-dhcp")
    ap.add_argument("config")
    ap.add_argument("--create-schema", action="store_true", help="create missing tables (tests only)")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(message)s")
    cfg = cfgmod.load(a.config)
    engine = db.make_engine(cfg.database.url)
    if a.create_schema:
        from bootsvc.models import Base

        Base.metadata.create_all(engine)
    run_dhcp(cfg, db.session_factory(engine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
