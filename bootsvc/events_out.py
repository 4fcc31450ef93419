"""Outgoing state-change events: a transactional outbox and its delivery worker.

Owns: ``enqueue`` (called by ``lifecycle.apply`` inside the transition's transaction, so an event is
queued exactly when the state change commits — the transactional outbox pattern), the signature
scheme shared with inbound webhooks (``sign``/``verify``: HMAC-SHA256 over ``"<timestamp>.<body>"``,
hex, header ``X-Bootsvc-Signature: sha256=<hex>``), and ``Deliverer``: POSTs each outbox row to its
subscriber, at least once, in ``seq`` order per (subscriber, node), retrying with exponential
backoff. Runs as a thread inside the conductor service.

Ordering: a row is eligible only when no earlier row of the same (subscriber, node) is undelivered,
so a failing subscriber holds back that node's later events (head-of-line per node, not globally).
Several deliverers (several conductor services) share the table through a short claim
(``claimed_until``) taken with a conditional UPDATE; a crash after a successful POST but before the
``delivered_at`` commit causes one redelivery: receivers dedupe by ``X-Bootsvc-Event``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
from sqlalchemy import and_, bindparam, exists, func, insert, select, true, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from bootsvc import auth_secrets
from bootsvc.models import Event, Node, Outbox, Subscriber, utcnow

log = logging.getLogger("bootsvc.events_out")

SIGNATURE_HEADER = "X-Bootsvc-Signature"
TIMESTAMP_HEADER = "X-Bootsvc-Timestamp"
EVENT_HEADER = "X-Bootsvc-Event"
DELIVERY_HEADER = "X-Bootsvc-Delivery"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` (timestamp binds against replay)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return "sha256=" + mac


def verify(secret: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature.strip())


def _payload(node: Node, ev: Event, seq: int) -> dict[str, Any]:
    return {
        "event_id": ev.id, "seq": seq,
        "node": {"id": node.id, "name": node.name, "kind": node.kind, "host_id": node.host_id},
        "from_state": ev.from_state, "to_state": ev.to_state, "trigger": ev.trigger, "actor": ev.actor,
        "at": ev.at.isoformat(), "detail": ev.detail or {},
        "last_error": node.last_error, "hint": node.hint,
    }


_OUTBOX = Outbox.metadata.tables["outbox"]
_SUBSCRIBERS = Outbox.metadata.tables["subscribers"]
# The node's highest queued seq, searched through the (subscriber_id, node_id, seq) unique index once per
# subscriber: every outbox row's subscriber exists (foreign key, ON DELETE CASCADE), so this is the max
# over all the node's rows. Plain ``WHERE node_id = :n`` has no index to use (node_id is not its leading
# column): measured on SQLite with 206,000 outbox rows, 23.6 ms a transition against 0.05 ms this way.
_LAST_SEQ = (select(func.max(_OUTBOX.c.seq))
             .where(_OUTBOX.c.node_id == bindparam("node"),
                    _OUTBOX.c.subscriber_id.in_(select(_SUBSCRIBERS.c.id)))
             .scalar_subquery())
# One round trip: the active subscribers and, on each row, the node's last seq.
_TARGETS = select(_SUBSCRIBERS.c.id, _LAST_SEQ).where(_SUBSCRIBERS.c.active == true())
_INSERT_OUTBOX = insert(_OUTBOX)


def enqueue(session: Session, node: Node, ev: Event) -> int:
    """Queue ``ev`` (already written, so it has an id) for every active subscriber; same transaction.

    The per-node sequence is the node's highest queued seq + 1: safe because transitions of one node
    are serialised by the node's version check (a losing transaction rolls back its rows too).
    Two statements when anybody subscribes (the targets with the last seq; the rows, one INSERT),
    one when nobody does. Returns the number of rows queued.
    """
    conn = session.connection()  # the transition's transaction
    targets = conn.execute(_TARGETS, {"node": node.id}).all()
    if not targets:
        return 0
    seq = int(targets[0][1] or 0) + 1
    payload = _payload(node, ev, seq)
    conn.execute(_INSERT_OUTBOX, [
        {"subscriber_id": sid, "node_id": node.id, "seq": seq, "event_id": ev.id, "payload": payload,
         "created_at": utcnow(), "attempts": 0, "next_attempt_at": ev.at} for sid, _ in targets])
    return len(targets)


def backoff(base: float, attempts: int, cap: float) -> float:
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


Poster = Callable[[str, bytes, dict[str, str], float], int]


def _http_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    return requests.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False).status_code


class Deliverer:
    """Delivers outbox rows. ``run_once`` is one pass (tests call it); ``run`` loops until ``stop``."""

    def __init__(self, sessions: sessionmaker[Session], *, owner: str, timeout: float = 5.0,
                 backoff_base: float = 2.0, backoff_max: float = 300.0, batch: int = 50,
                 post: Poster = _http_post, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.sessions, self.owner, self.timeout = sessions, owner, timeout
        self.backoff_base, self.backoff_max, self.batch = backoff_base, backoff_max, batch
        self.post = post
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._secrets: dict[str, tuple[float, bytes]] = {}

    def _secret(self, ref: str) -> bytes:
        hit = self._secrets.get(ref)
        if hit and time.monotonic() - hit[0] < 60:
            return hit[1]
        val = auth_secrets.read_ref(ref)
        self._secrets[ref] = (time.monotonic(), val)
        return val

    def _eligible(self, s: Session, now: dt.datetime) -> list[int]:
        earlier = aliased(Outbox)
        head = ~exists().where(and_(earlier.subscriber_id == Outbox.subscriber_id,
                                    earlier.node_id == Outbox.node_id,
                                    earlier.delivered_at.is_(None), earlier.seq < Outbox.seq))
        q = (select(Outbox.id).join(Subscriber, Subscriber.id == Outbox.subscriber_id)
             .where(Outbox.delivered_at.is_(None), Outbox.next_attempt_at <= now, Subscriber.active.is_(True),
                    (Outbox.claimed_until.is_(None)) | (Outbox.claimed_until < now), head)
             .order_by(Outbox.id).limit(self.batch))
        return list(s.scalars(q))

    def run_once(self, rounds: int = 20) -> int:
        """Deliver what is due, following each node's chain (the next event of a node becomes eligible
        once the previous one is delivered) for up to ``rounds`` rounds. Returns rows delivered."""
        total = 0
        for _ in range(rounds):
            n = self._round()
            total += n
            if n == 0:
                break
        return total

    def _round(self) -> int:
        now = self.clock()
        delivered = 0
        with self.sessions() as s:
            ids = self._eligible(s, now)
        for oid in ids:
            with self.sessions() as s:
                claim = s.execute(update(Outbox).where(
                    Outbox.id == oid, Outbox.delivered_at.is_(None),
                    (Outbox.claimed_until.is_(None)) | (Outbox.claimed_until < now))
                    .values(claimed_until=now + dt.timedelta(seconds=self.timeout * 3 + 5)))
                s.commit()
                if claim.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                row = s.get(Outbox, oid)
                sub = s.get(Subscriber, row.subscriber_id) if row else None
                if row is None or sub is None:
                    continue
                body = json.dumps(row.payload, sort_keys=True, separators=(",", ":")).encode()
                ts = str(int(time.time()))
                err: str | None = None
                try:
                    sig = sign(self._secret(sub.secret_ref), ts, body)
                    status = self.post(sub.url, body, {
                        "Content-Type": "application/json", TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sig,
                        EVENT_HEADER: str(row.event_id), DELIVERY_HEADER: str(row.id)}, self.timeout)
                    if not 200 <= status < 300:
                        err = f"subscriber answered HTTP {status}"
                except auth_secrets.SecretError as e:
                    err = f"subscriber secret: {e}"
                except requests.RequestException as e:
                    err = f"POST failed: {type(e).__name__}: {e}"
                row.attempts += 1
                row.claimed_until = None
                if err is None:
                    row.delivered_at = self.clock()
                    row.last_error = None
                    delivered += 1
                else:
                    row.last_error = err[:1000]
                    row.next_attempt_at = self.clock() + dt.timedelta(
                        seconds=backoff(self.backoff_base, row.attempts, self.backoff_max))
                s.commit()
                log.info("event_delivery subscriber=%s node=%s seq=%s event=%s outcome=%s attempts=%d",
                         sub.name, row.node_id, row.seq, row.event_id, "delivered" if err is None else err,
                         row.attempts)
        return delivered

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.is_set():
            try:
                n = self.run_once()
            except Exception:  # keep the worker alive; the next pass retries
                log.exception("event delivery pass failed")
                n = 0
            if n == 0:
                stop.wait(interval)
