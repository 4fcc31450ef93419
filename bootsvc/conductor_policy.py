"""The policy bootsvc wants on a DPU, with the database reads it needs (``policy.build`` is pure).

Owns: which tenant a DPU serves (its own, else its host's), the peers its policy lists, and
`policy_for`, used by the conductor (every pass, for DPUs being set up and, every few seconds, for
resting ones) and by the agent API (every agent poll). Both run for every DPU of a site, so the reads
here are counted in queries per pass, not per DPU:

- with EVPN (``fabric.asn`` set, docs/fabric.md) the policy carries no per-fleet peer list, only the
  DPU's own host addresses (its Type-5 exports): one query for the DPU, or none when the caller
  prefetched the addresses of a whole pass (`host_addresses`);
- with static peer lists every DPU's policy lists every DPU of its tenant: `tenant_peers` reads them
  in two column queries (no ORM objects, no per-DPU lazy loads), once per tenant per conductor pass
  (`PeerCache`), and the document is O(tenant) by nature.

`PolicyMemo` keeps built documents keyed by everything ``policy.build`` reads besides the (fixed)
config, so a resting DPU's drift check rebuilds nothing when nothing changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from bootsvc.config import Config
from bootsvc.models import Nic, Node, Tenant
from bootsvc.policy import Peer, PolicyBuildError, TenantInfo, build, evpn_asn, vtep_for
from bootsvc.states import State

# A DPU gets its tenant's policy only while it is being or has been set up for the tenant; in every
# other state (installing, released, maintenance ...) the host port stays isolated (fail closed).
TENANT_POLICY_STATES = frozenset({State.DPU_READY, State.POLICY_PENDING, State.POLICY_APPLIED,
                                  State.POLICY_FAILED})
CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's bind-parameter limits

PeerCache = dict[str, list[Peer]]  # tenant name -> its DPUs' peers, for one conductor pass


def tenant_of(node: Node) -> TenantInfo | None:
    """A DPU serves its own tenant, else its host's."""
    t = node.tenant or (node.host.tenant if node.host is not None else None)
    return TenantInfo(t.name, t.vrf, t.l3vni, t.table) if t is not None else None


def host_addresses(session: Session, host_ids: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """host id -> the /32s reserved on its host-facing NIC (``host-pf``), sorted; one query per CHUNK."""
    ids = sorted(set(host_ids))
    acc: dict[int, list[str]] = {}
    for i in range(0, len(ids), CHUNK):
        for host_id, ip in session.execute(select(Nic.node_id, Nic.ipv4).where(
                Nic.node_id.in_(ids[i:i + CHUNK]), Nic.role == "host-pf", Nic.ipv4.is_not(None))):
            acc.setdefault(host_id, []).append(f"{ip}/32")
    return {k: tuple(sorted(v)) for k, v in acc.items()}


def tenant_peers(session: Session, tenant: TenantInfo, config: Config) -> list[Peer]:
    """Every DPU of the tenant (its own or its host's): VTEP and the reserved host addresses behind it.
    Two column queries whatever the fleet size; callers filter out the asking DPU's own VTEP."""
    host, own_t, host_t = aliased(Node), aliased(Tenant), aliased(Tenant)
    rows = session.execute(
        select(Node.id, Node.host_id)
        .outerjoin(own_t, Node.tenant_id == own_t.id)
        .outerjoin(host, Node.host_id == host.id)
        .outerjoin(host_t, host.tenant_id == host_t.id)
        .where(Node.kind == "dpu", Node.state != State.RETIRED,
               func.coalesce(own_t.name, host_t.name) == tenant.name)
        .order_by(Node.id)).all()
    addrs = host_addresses(session, (h for _, h in rows if h is not None))
    out: list[Peer] = []
    for dpu_id, host_id in rows:
        try:
            vtep = str(vtep_for(config, dpu_id))
        except PolicyBuildError:
            continue
        out.append(Peer(vtep, addrs.get(host_id or -1, ())))
    return out


class PolicyMemo:
    """Built EVPN policy documents by their inputs (node id, name, serial, tenant, own host prefixes);
    the config is fixed for the memo's life. Bounded: at ``limit`` documents the oldest goes.

    The agent API's memo answers every resting agent's poll, so it holds the fleet. The conductor's only
    bridges a DPU's few checks in a row (its policy built at dpu_ready, taken again at its first drift
    check; a resting DPU is checked again only when an input changed, and then it is built anew), so it
    is small: a memo of the whole fleet is ~10 tracked objects per DPU that every full garbage
    collection walks, for no hit."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._docs: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.hits = 0

    def get(self, key: tuple[Any, ...]) -> dict[str, Any] | None:
        doc = self._docs.get(key)
        if doc is not None:
            self.hits += 1
        return doc

    def put(self, key: tuple[Any, ...], doc: dict[str, Any]) -> None:
        while len(self._docs) >= self.limit:
            del self._docs[next(iter(self._docs))]  # the oldest (dicts keep insertion order)
        self._docs[key] = doc

    def __len__(self) -> int:
        return len(self._docs)


def policy_for(session: Session, node: Node, config: Config, cache: PeerCache | None = None, *,
               addresses: dict[int, tuple[str, ...]] | None = None,
               memo: PolicyMemo | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(policy document, None) or (None, why it cannot be built) for a DPU. ``cache``: peers per
    tenant, shared by the policies built in one conductor pass (static peer lists). ``addresses``:
    host id -> host prefixes prefetched for a pass (EVPN). ``memo``: documents already built (EVPN).
    The document is a fresh dict or a memoised one: callers must not change it."""
    tenant = tenant_of(node) if node.state in TENANT_POLICY_STATES else None
    try:
        if tenant is not None and evpn_asn(config, node.id) is not None:
            # EVPN: no peer list; only this DPU's own host addresses (policy.build "host_prefixes")
            if addresses is not None and node.host_id is not None:
                own = addresses.get(node.host_id, ())
            else:
                own = host_addresses(session, [node.host_id]).get(node.host_id, ()) \
                    if node.host_id is not None else ()
            key = (node.id, node.name, node.serial, tenant, own)
            doc = memo.get(key) if memo is not None else None
            if doc is None:
                doc = build(config, node_id=node.id, node_name=node.name, serial=node.serial, tenant=tenant,
                            peers=[Peer(str(vtep_for(config, node.id)), own)])
                if memo is not None:
                    memo.put(key, doc)
            return doc, None
        peers: list[Peer] = []
        if tenant is not None:
            if cache is None or tenant.name not in cache:
                found = tenant_peers(session, tenant, config)
                if cache is not None:
                    cache[tenant.name] = found
            else:
                found = cache[tenant.name]
            peers = list(found)
        return build(config, node_id=node.id, node_name=node.name, serial=node.serial, tenant=tenant,
                     peers=peers), None
    except PolicyBuildError as e:
        return None, str(e)
