"""Is the tenant network real? The boot gate on a DPU's fabric report (docs/fabric.md). Pure: no I/O.

Owns: deciding from what the DPU agent reports (``health.fabric``, built by
``bootsvc.agent.fabric_health``) and what bootsvc asked for (the DPU's policy document) whether the
host behind the DPU may boot, and if not, which check fails and what to do about it; when a DPU that
was ready loses a BGP session (an event and a metric, not a state change).

The three checks, in order (a host boots only when all hold; NVIDIA's NICo likewise reports a DPU
healthy only with BGP Established on its uplinks, bluefield-real.md §7):

1. ``bgp_sessions``: BGP Established on every uplink (or ``fabric.min_uplinks_established``), each
   carrying the ``l2vpn evpn`` family (no EVPN routes over a plain IPv4 session);
2. ``l3vni``: zebra reports the tenant VRF's L3VNI ``Up`` (VXLAN device and SVI bridge present and in
   the VRF); without it Type-5 routes cannot be installed or originated;
3. ``host_prefix``: each of the host's addresses is originated as an EVPN Type-5 route (RFC 9136) -
   the other DPUs of the tenant can reach the host.

A gate that has not passed ``fabric.gate_deadline_seconds`` after the policy was applied has
``expired``: the conductor then fails the DPU (``policy_failed``) with the failing check named.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ESTABLISHED = "Established"
CHECKS = ("fabric_report", "bgp_sessions", "l3vni", "host_prefix")


@dataclass(frozen=True, slots=True)
class Expect:
    """What the DPU's policy asked for (from the policy document bootsvc built)."""

    version: str
    uplinks: tuple[str, ...]
    vrf: str | None
    l3vni: int | None
    host_prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    ready: bool
    checks: tuple[Check, ...]
    expired: bool = False

    @property
    def failed(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    def reason(self) -> str:
        """One line for events, the UI and ``last_error``: the first failing check and its hint."""
        c = self.failed
        if c is None:
            return "fabric ready: " + "; ".join(x.detail for x in self.checks)
        return f"fabric check {c.name} failed: {c.detail}" + (f" - {c.hint}" if c.hint else "")


def expect_from_policy(doc: Mapping[str, Any] | None) -> Expect | None:
    """None when the policy runs no EVPN (static peers): nothing to gate on."""
    if not doc or not isinstance(doc.get("evpn"), Mapping):
        return None
    ev = doc["evpn"]
    tenant = doc.get("tenant") is not None
    return Expect(
        version=str(doc.get("version", "")),
        uplinks=tuple(str(u) for u in ev.get("uplinks") or ()),
        vrf=str(doc["vrf_name"]) if tenant else None,
        l3vni=int(doc["l3vni"]) if tenant else None,
        host_prefixes=tuple(str(p) for p in doc.get("host_prefixes") or ()) if tenant else (),
    )


def _map(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _sessions(rep: Mapping[str, Any], want: Expect, min_up: int | None) -> Check:
    ups = _map(rep.get("uplinks"))
    states = {u: _map(ups.get(u)) for u in want.uplinks}
    good = [u for u, s in states.items() if s.get("state") == ESTABLISHED and s.get("evpn", True) is not False]
    need = len(want.uplinks) if min_up is None else min(min_up, len(want.uplinks))
    detail = ", ".join(f"{u} {s.get('state', 'unreported')}" + ("" if s.get("evpn", True) is not False
                                                                 else " (no l2vpn evpn)")
                       for u, s in states.items()) or "no uplinks configured"
    if len(good) >= need and need > 0:
        return Check("bgp_sessions", True, f"BGP {detail}")
    bad = [u for u in want.uplinks if u not in good]
    first = states.get(bad[0], {}) if bad else {}
    st = first.get("state")
    if not want.uplinks:
        hint = "set fabric.uplinks to the DPU ports facing the leaves"
    elif st in ("missing", None):  # FRR has no such neighbor, or the report does not list it
        hint = (f"FRR has no session on {bad[0]}: fabric.uplinks must name the DPU's ports facing the "
                "leaves (HBN: p0_if/p1_if)")
    elif st == ESTABLISHED:
        hint = f"activate the l2vpn evpn address family for the DPU's session on the leaf facing {bad[0]}"
    else:
        hint = (f"no BGP session on {bad[0]}: check the leaf port's BGP unnumbered config (neighbor <port> "
                "interface, RFC 8950), IPv6 on both ends and the cable; on the DPU: vtysh -c 'show bgp summary'")
    return Check("bgp_sessions", False, f"{len(good)}/{len(want.uplinks)} uplinks up (need {need}): {detail}",
                 hint)


def _l3vni(rep: Mapping[str, Any], want: Expect) -> Check:
    v = _map(rep.get("l3vni"))
    state = v.get("state", "unreported")
    detail = f"L3VNI {want.l3vni} of VRF {want.vrf} {state}"
    if state == "Up" and v.get("vni") in (want.l3vni, None):
        return Check("l3vni", True, detail)
    return Check("l3vni", False, detail + (f" (svi {v.get('svi')}, vxlan {v.get('vxlan')})" if v else ""),
                 f"zebra needs VRF {want.vrf} with its L3VNI bridge babr{want.l3vni} and VXLAN device "
                 f"bavx{want.l3vni} up (the agent creates them; a kernel without CONFIG_NET_VRF cannot run "
                 "EVPN VRFs); on the DPU: vtysh -c 'show vrf vni'")


def _prefixes(rep: Mapping[str, Any], want: Expect) -> Check:
    if not want.host_prefixes:
        return Check("host_prefix", False, "no host address to announce",
                     "reserve an address for the host's PF in the inventory: the DPU announces the host's "
                     "/32 as an EVPN Type-5 route")
    got = _map(rep.get("host_prefixes"))
    missing = [p for p in want.host_prefixes if got.get(p) is not True]
    if not missing:
        return Check("host_prefix", True, "Type-5 " + ", ".join(want.host_prefixes) + " advertised")
    return Check("host_prefix", False, "not advertised as Type-5: " + ", ".join(missing),
                 f"BGP instance of VRF {want.vrf} must carry the prefix and 'advertise ipv4 unicast'; on the "
                 "DPU: vtysh -c 'show bgp l2vpn evpn route type prefix'")


def gate(report: Any, want: Expect, *, min_uplinks: int | None = None,
         since: dt.datetime | None = None, now: dt.datetime | None = None,
         deadline_seconds: float | None = None) -> Verdict:
    """May the host behind this DPU boot? ``since``: when the policy was applied (start of the
    deadline); ``now`` given by the caller (no clock here)."""
    rep = _map(report)
    checks: list[Check] = []
    if not rep:
        checks.append(Check("fabric_report", False, "the agent has sent no fabric report",
                            "the DPU agent must run FRR (package frr, vtysh reachable) and be new enough "
                            "to report health.fabric"))
    elif str(rep.get("policy_version", "")) != want.version:
        checks.append(Check("fabric_report", False,
                            f"report is about policy {rep.get('policy_version')}, waiting for {want.version}",
                            "the agent reports at its next check-in (orchestration poll interval)"))
    elif rep.get("frr_error"):
        checks.append(Check("fabric_report", False, str(rep["frr_error"])[:300],
                            "FRR refused the rendered config; see the agent log"))
    else:
        checks.append(Check("fabric_report", True, f"report of policy {want.version}"))
        checks.append(_sessions(rep, want, min_uplinks))
        if want.vrf is not None:
            checks.append(_l3vni(rep, want))
            checks.append(_prefixes(rep, want))
        errs = [str(e) for e in rep.get("errors") or []]
        if errs and not all(c.ok for c in checks):
            c = next(c for c in checks if not c.ok)
            checks[checks.index(c)] = Check(c.name, c.ok, c.detail + " (vtysh: " + "; ".join(errs)[:200] + ")",
                                            c.hint)
    ready = all(c.ok for c in checks)
    expired = bool(not ready and since is not None and now is not None and deadline_seconds is not None
                   and (now - since).total_seconds() > deadline_seconds)
    return Verdict(ready, tuple(checks), expired)


def dpu_gate(config: Any, policy_doc: Mapping[str, Any] | None, health: Any, *,
             applied_since: dt.datetime | None, now: dt.datetime) -> Verdict | None:
    """The gate for one DPU as the conductor needs it: the site's ``fabric`` settings, the policy
    bootsvc wants on the DPU, the agent's last health. None = not gated (``fabric.gate_boot`` off,
    or a policy without EVPN: static peers, nothing to ask FRR)."""
    f = config.fabric
    want = expect_from_policy(policy_doc) if f.gate_boot else None
    if want is None:
        return None
    rep = health.get("fabric") if isinstance(health, Mapping) else None
    return gate(rep, want, min_uplinks=f.min_uplinks_established, since=applied_since, now=now,
                deadline_seconds=f.gate_deadline_seconds)


def session_drops(old: Any, new: Any) -> list[tuple[str, str, str]]:
    """Uplinks that were Established in ``old`` and are not in ``new``: (uplink, old, new) - for an
    event and a metric when a ready DPU loses the fabric."""
    a, b = _map(_map(old).get("uplinks")), _map(_map(new).get("uplinks"))
    out: list[tuple[str, str, str]] = []
    if not b:
        return out  # no session information at all (no EVPN any more, or an unreadable report)
    for name in sorted(a):
        was = _map(a.get(name)).get("state")
        now = _map(b.get(name)).get("state", "unreported")
        if was == ESTABLISHED and now != ESTABLISHED:
            out.append((name, str(was), str(now)))
    return out


def expect_from_report(report: Any) -> Expect | None:
    """What a report claims to be about (its own uplinks, VRF, L3VNI and host prefixes): lets a
    page judge a report without rebuilding the policy. None for no report."""
    rep = _map(report)
    if not rep:
        return None
    v = _map(rep.get("l3vni"))
    vni = v.get("vni")
    return Expect(str(rep.get("policy_version", "")), tuple(str(u) for u in _map(rep.get("uplinks"))),
                  str(v["vrf"]) if v.get("vrf") else None,
                  vni if isinstance(vni, int) and not isinstance(vni, bool) else None,
                  tuple(str(p) for p in _map(rep.get("host_prefixes"))))


def summary(report: Any) -> dict[str, Any]:
    """What the UI shows per DPU: sessions, L3VNI, own and learned Type-5 prefixes."""
    rep = _map(report)
    ups = _map(rep.get("uplinks"))
    t5 = _map(rep.get("type5"))
    return {
        "sessions": [(str(u), str(_map(s).get("state", "?")), _map(s).get("up_ms"),
                      _map(s).get("evpn_pfx_rcvd")) for u, s in sorted(ups.items())],
        "l3vni": dict(_map(rep.get("l3vni"))) or None,
        "local": [str(p) for p in t5.get("local") or []],
        "remote": [(str(r[0]), str(r[1])) for r in t5.get("remote") or [] if isinstance(r, list | tuple)
                   and len(r) == 2],
        # the tenant VRF's table: what it imported from the Type-5 routes above (route targets matched)
        "vrf_routes": [(str(vrf), str(r[0]), str(r[1]), str(r[2])) for vrf, rows in _map(rep.get("vrf_routes")).items()
                       if isinstance(rows, list) for r in rows if isinstance(r, list | tuple) and len(r) == 3],
        "errors": [str(e) for e in rep.get("errors") or []],
    }
