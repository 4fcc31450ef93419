"""The only code that changes a node's state.

Owns: applying a trigger to a node — checking it against ``bootsvc.states``, writing the event,
setting the new state's deadline and attempt count, the failure reason and the tech's hint — and
detecting a concurrent change by another process through the node's version column (optimistic
locking: ``UPDATE ... WHERE version = :seen``), which surfaces as ``TransitionConflict``.

Cost (every state change of every node goes through here, ~8 per DPU + host pair): a transition is two
statements when nobody subscribes to events — the node's versioned UPDATE (a Core statement doing what
the ORM's flush did, without its unit of work: ``_update_node``) and the event's
INSERT, which also returns how many subscribers are active (a subquery in its RETURNING: no extra round
trip, no cache that could miss a subscriber added a moment ago) — and one more, the outbox rows, when
somebody does. The event row is a core INSERT, not an ORM object: the unit of work around that one row
cost more CPU than its statement. A note (``record``) is two statements, the row lock and the INSERT; the
conductor's bookkeeping of a BMC step rides in that lock's UPDATE (``values``) instead of one of its own.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, case, func, insert, select, true, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from bootsvc import events_out, states
from bootsvc.models import Event, Node
from bootsvc.states import HINTS, IllegalTransition, State, Trigger

log = logging.getLogger("bootsvc.lifecycle")

# Seconds a node may stay in an active state before the conductor acts (config can override).
DEFAULT_DEADLINES: dict[State, int] = {
    State.DPU_BOOTING: 900,
    State.DPU_INSTALLING: 2700,
    State.DPU_REBOOTING: 900,
    State.DPU_READY: 300,
    State.POLICY_PENDING: 300,
    State.HOST_WAITING_DPU: 7200,
    State.HOST_BOOTING: 900,
    State.HOST_INSTALLING: 3600,
    State.RELEASING: 600,
    State.WIPING: 1800,
}

_DEADLINES = {k.value: v for k, v in DEFAULT_DEADLINES.items()}
_EVENTS = Node.metadata.tables["events"]
_SUBSCRIBERS = Node.metadata.tables["subscribers"]
# Returned by the event's INSERT: the active subscribers at that instant, read in the same transaction
# (SQLite >= 3.35 and PostgreSQL accept a scalar subquery in RETURNING).
_ACTIVE_SUBSCRIBERS = (select(func.count()).select_from(_SUBSCRIBERS)
                       .where(_SUBSCRIBERS.c.active == true()).scalar_subquery())
# Built once: SQLAlchemy memoises a statement object's cache key, so executing these with parameters
# skips building, keying and compiling a statement per transition.
_INSERT_EVENT = insert(_EVENTS).returning(_EVENTS.c.id)
_INSERT_EVENT_SUBS = insert(_EVENTS).returning(_EVENTS.c.id, _ACTIVE_SUBSCRIBERS)
_NODES = Node.metadata.tables["nodes"]
# apply's versioned UPDATE by changed column set (a handful of sets: the transitions' shapes)
_TRANSITION: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
_TRANSITION_COLUMNS = frozenset({"state_since", "attempts", "deadline", "last_error", "hint"})  # apply's own
# the no-op UPDATE takes the lock and RETURNING reads under it (SQLite >= 3.35, PostgreSQL)
_LOCK_NODE = (update(_NODES).where(_NODES.c.id == bindparam("node_id")).values(version=_NODES.c.version)
              .returning(_NODES.c.state, _NODES.c.version))
# ``record``'s ``values`` are bookkeeping, never the state machine's or the optimistic lock's columns
_NOT_BOOKKEEPING = frozenset({"id", "state", "version", "change_seq", "claimed_by", "claim_expires"})
# record(values=..., release_claim=...) statements by column set, built once each (a handful: the
# conductor's bookkeeping sets)
_LOCK_AND_BOOK: dict[tuple[tuple[str, ...], bool], Any] = {}
# A claim given back only by its holder (a claim that expired and was taken by another conductor stays
# theirs); SET expressions see the row as it was before the UPDATE (SQL standard; SQLite, PostgreSQL).
_HOLDER = _NODES.c.claimed_by == bindparam("claimant")
_RELEASE = {"claimed_by": case((_HOLDER, None), else_=_NODES.c.claimed_by),
            "claim_expires": case((_HOLDER, None), else_=_NODES.c.claim_expires)}

__all__ = ["IllegalTransition", "TransitionConflict", "apply", "record"]


class TransitionConflict(Exception):
    """Another process changed the node first; re-read it and decide again."""


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def apply(
    session: Session,
    node: Node,
    trigger: Trigger | str,
    *,
    actor: str,
    detail: Mapping[str, Any] | None = None,
    now: dt.datetime | None = None,
    max_attempts: int = 3,
    deadlines: Mapping[str, int] | None = None,
    error: str | None = None,
    commit: bool = True,
    values: Mapping[str, Any] | None = None,
) -> Event:
    """Move ``node`` by ``trigger``; write the event; commit (unless ``commit=False``).

    ``values``: bookkeeping columns of the node (as ``record``'s: e.g. the conductor's
    ``action_failures``) written by the transition's own UPDATE (by an UPDATE without a version bump
    when the transition changes no column), instead of an UPDATE of their own.

    Raises IllegalTransition (nothing written) or TransitionConflict (nothing written; the session is
    rolled back and the caller should re-read the node).
    """
    t = Trigger(trigger)
    old = State(node.state)
    new = states.next_state(node.kind, old, t, attempts=node.attempts, max_attempts=max_attempts)
    at = _now(now)
    info = dict(detail or {})
    if error:
        info["error"] = error

    change: dict[str, Any] = {}
    if new == old:
        if t == Trigger.TIMEOUT:
            change["attempts"] = node.attempts + 1  # retry in place: a fresh deadline, one attempt used
    else:
        change.update(state=new.value, state_since=at, attempts=0)
    limit = deadlines.get(new.value, _DEADLINES.get(new.value)) if deadlines else _DEADLINES.get(new.value)
    if new in states.ACTIVE_STATES and limit is not None and (new != old or t == Trigger.TIMEOUT):
        change["deadline"] = at + dt.timedelta(seconds=limit)
    elif new not in states.ACTIVE_STATES:
        change["deadline"] = None
    if new in states.FAILED_STATES:
        change.update(last_error=error or info.get("reason") or f"{t.value} in {old.value}", hint=HINTS.get(new))
    elif new != old and t in (Trigger.RETRY, Trigger.REPROVISION, Trigger.PROVISION):
        change.update(last_error=None, hint=None)
    try:
        session.flush()  # the caller's own pending changes first, under their own version check
    except StaleDataError:
        session.rollback()
        raise TransitionConflict(
            f"node {node.name} changed while applying {t.value}; re-read and try again") from None
    _update_node(session, node, {k: v for k, v in change.items() if getattr(node, k) != v}, dict(values or {}), t)
    ev, subscribers = _insert_event(session, node.id, at, old.value, new.value, t.value, actor, info,
                                    subscribers=True)
    if subscribers:
        events_out.enqueue(session, node, ev)  # outbox row(s) in this same transaction
    if commit:
        session.commit()
    log.info("transition node=%s kind=%s from=%s to=%s trigger=%s actor=%s attempts=%d",
             node.name, node.kind, old.value, new.value, t.value, actor, node.attempts)
    return ev


def _refuse_non_bookkeeping(caller: str, keys: tuple[str, ...], also: frozenset[str] = frozenset()) -> None:
    """``values=`` may name only bookkeeping columns of nodes: not the state machine's, the optimistic
    lock's or the claim's (``_NOT_BOOKKEEPING``), nor ``also`` (apply's own transition columns)."""
    bad = [k for k in keys if k in _NOT_BOOKKEEPING or k in also or k not in _NODES.c]
    if bad:
        raise ValueError(f"{caller}(values=...): {', '.join(bad)} not a bookkeeping column of nodes")


def _binds(keys: tuple[str, ...]) -> dict[str, Any]:
    """SET targets for these node columns, bound as ``v_<column>`` with the column's type."""
    return {k: bindparam(f"v_{k}", type_=_NODES.c[k].type) for k in keys}


def _update_node(session: Session, node: Node, change: dict[str, Any], book: dict[str, Any], t: Trigger) -> None:
    """The transition's ``UPDATE nodes ... version = :seen + 1 WHERE id = :id AND version = :seen`` -
    what the ORM's flush of the changed attributes sent (``version_id_col``; nothing when nothing
    changed, as the ORM sends nothing), as one Core statement built once per column set; the loaded
    node then holds the written values as committed ones. The ORM's unit of work around that one row
    cost about as much CPU as the rest of a transition (measured on SQLite: ~0.5 of ~0.9 ms). ``book``:
    bookkeeping columns in the same statement (``apply(values=...)``), not version-checked on their own."""
    if not change and not book:
        return
    keys, bkeys = tuple(sorted(change)), tuple(sorted(book))
    stmt = _TRANSITION.get((keys, bkeys))
    if stmt is None:
        _refuse_non_bookkeeping("apply", bkeys, _TRANSITION_COLUMNS)
        cols = _binds(keys + bkeys)
        stmt = update(_NODES).where(_NODES.c.id == bindparam("node_id"))
        if change:  # a state change: under the optimistic lock, as the ORM's versioned flush
            stmt = stmt.where(_NODES.c.version == bindparam("seen")).values(version=bindparam("next"), **cols)
        else:
            stmt = stmt.values(**cols)
        _TRANSITION[(keys, bkeys)] = stmt
    seen = node.version
    params = {f"v_{k}": v for k, v in (change | book).items()}
    params["node_id"] = node.id
    if change:
        params.update(seen=seen, next=seen + 1)
    if session.connection().execute(stmt, params).rowcount != 1 and change:
        session.rollback()
        raise TransitionConflict(f"node {node.name} changed while applying {t.value}; re-read and try again")
    for k, v in (change | book).items():
        set_committed_value(node, k, v)
    if change:
        set_committed_value(node, "version", seen + 1)
    if "change_seq" in node.__dict__:  # computed by the UPDATE (models.NEXT_CHANGE_SEQ): read again if asked
        session.expire(node, ["change_seq"])


def record(session: Session, node: Node, note: str, *, actor: str, detail: Mapping[str, Any] | None = None,
           now: dt.datetime | None = None, commit: bool = True, values: Mapping[str, Any] | None = None,
           release_claim: str | None = None) -> Event:
    """Append a non-transition event (e.g. a BMC call, an agent health report) to the node's log.

    The event carries the state the node is in when it is written, not the state this session read
    earlier: the node's row is locked first (a no-op UPDATE: PostgreSQL's row lock, SQLite's write
    lock, held to commit, the lock ``apply``'s versioned UPDATE takes too), and its state and version
    are read back by that same statement (RETURNING). A transition committed by another process in
    between is thus seen, never recorded as a stale state, and none can slip in before this event commits.

    ``values``: bookkeeping columns of the node (column names: e.g. the conductor's ``action_key``,
    ``next_check_at``) written by that same UPDATE, without a version bump (not a state change): the
    event and what it books are one statement less than an UPDATE of their own. The loaded ``node``
    is not refreshed with them (as with any Core UPDATE: the caller re-reads if it needs them).
    ``release_claim``: the conductor's claim of that name on the node is given back by that same UPDATE,
    if it still holds it (the claim's own UPDATE, ``... WHERE claimed_by = :name``, folded in).
    """
    session.flush()  # the caller's own pending changes first, under their own version check
    if values or release_claim is not None:
        keys = tuple(sorted(values or ()))
        stmt = _LOCK_AND_BOOK.get((keys, release_claim is not None))
        if stmt is None:
            _refuse_non_bookkeeping("record", keys)
            cols = _binds(keys)
            if release_claim is not None:
                cols.update(_RELEASE)
            stmt = _LOCK_AND_BOOK[(keys, release_claim is not None)] = (
                update(_NODES).where(_NODES.c.id == bindparam("node_id"))
                .values(version=_NODES.c.version, **cols).returning(_NODES.c.state, _NODES.c.version))
        params = {f"v_{k}": v for k, v in (values or {}).items()}
        params["node_id"] = node.id
        if release_claim is not None:
            params["claimant"] = release_claim
        row = session.connection().execute(stmt, params).one()  # one statement: lock + book + read
    else:
        row = session.connection().execute(_LOCK_NODE, {"node_id": node.id}).one()  # one statement: lock + read
    state = str(row.state)
    if row.version != node.version:
        log.info("note node=%s trigger=%s written against state=%s (this process had read %s, version %s->%s)",
                 node.name, note, state, node.state, node.version, row.version)
    ev, _ = _insert_event(session, node.id, _now(now), state, state, note, actor, dict(detail or {}),
                          subscribers=False)
    if commit:
        session.commit()
    return ev


def _insert_event(session: Session, node_id: int, at: dt.datetime, from_state: str, to_state: str, trigger: str,
                  actor: str, detail: dict[str, Any], *, subscribers: bool) -> tuple[Event, int]:
    """One INSERT of the event row (in the session's transaction); returns the event, as a transient
    ``Event`` carrying its id (never added to the session: nothing else to flush), and, if asked, the
    number of active subscribers read by the same statement."""
    values = {"node_id": node_id, "at": at, "from_state": from_state, "to_state": to_state, "trigger": trigger,
              "actor": actor, "detail": detail}
    # on the session's connection (same transaction) without the ORM's execute layers: a core statement
    row = session.connection().execute(_INSERT_EVENT_SUBS if subscribers else _INSERT_EVENT, values).one()
    return Event(id=row[0], **values), int(row[1]) if subscribers else 0
