"""``bootsvc-agent`` entry point: config file, the check-in/pull/apply/report loop, rollback.

Owns: the agent's lifecycle on the DPU. One process, one loop thread, plus the relay and RA threads.
* start: load the last applied policy from the state dir (none yet: the isolated policy, fail closed)
  and converge the kernel to it before talking to anyone, so a DPU reboot with bootsvc down keeps
  its tenant working;
* every poll: repair drift against the applied policy, check in (health), pull the policy
  when bootsvc's version differs from the applied one (and every ``repull_every`` polls anyway, with
  ``If-None-Match``), apply it, report; the next poll comes after the interval the check-in answer
  advised (``poll_seconds``, docs/agent-api.md "Poll interval"), kept within ``poll_min``..``poll_max``,
  or ``poll_interval`` when the answer advised nothing (an older server) or the applied policy is
  not yet the wanted one; drift is repaired every ``poll_interval`` while it waits;
* a failed apply is rolled back (the previous policy re-converged) and reported with the reason; the
  same version is retried after ``retry_failed`` seconds;
* bootsvc unreachable: exponential backoff up to ``backoff_max``; reports that could not be sent are
  kept and sent on the next successful contact.

Config (INI, written by bf.cfg at install), section ``[agent]``: ``url`` (bootsvc in Zone 0),
``node``, ``node_id`` (informational), ``secret`` or ``secret_file``, ``host_port``, ``uplink``,
``serial`` (option 82 remote-id), ``state_dir`` (also holds ``secret``: the secret bootsvc handed over
at the first check-in, which replaces the config's from then on); optional ``mode`` (auto|vrf|table),
``poll_interval``, ``poll_min``, ``poll_max``, ``retry_failed``, ``backoff_max``, ``repull_every``,
``ra_interval``, and the tool paths ``ip``, ``bridge``, ``nft``; for FRR (policies with an ``evpn``
block, docs/fabric.md) ``vtysh``,
``frr_reload`` (frr-reload.py; empty = vtysh -f), ``frr_vty_socket``, ``frr_conf_dir`` (FRR's
integrated config directory, /etc/frr) and ``frr_timeout`` (seconds one FRR command may take, 240).

FRR is part of converging: the kernel first (VRF, L3VNI bridge and VXLAN device must exist before
zebra can bring the L3VNI up), then FRR's config; a refused FRR config fails the apply like a failed
``ip`` command (rollback to the previous policy, FRR's config included). Health carries the fabric
report (``fabric``: BGP per uplink, L3VNI, host prefixes as Type-5) that bootsvc gates the boot on.
"""

from __future__ import annotations

import argparse
import configparser
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootsvc.agent import AGENT_VERSION
from bootsvc.agent.client import AgentApi, ApiError, Unreachable
from bootsvc.agent.dataplane import ApplyError, Dataplane, Tools
from bootsvc.agent.fabric_health import report as fabric_report
from bootsvc.agent.frr import diff as diff_frr
from bootsvc.agent.frr import render as render_frr
from bootsvc.agent.frrd import Frr, FrrError, FrrTools
from bootsvc.agent.plan import Cmd, Env, PlanError, plan
from bootsvc.agent.policy import Policy, PolicyError, isolated, parse
from bootsvc.agent.ra import RaSender, parse_mac
from bootsvc.agent.relay import RelayParams, RelayServer

log = logging.getLogger("bootsvc.agent")
SECRET_FILE = "secret"  # in state_dir, mode 0600


@dataclass(frozen=True)
class AgentConfig:
    url: str
    node: str
    secret: str
    host_port: str
    uplink: str
    state_dir: Path
    serial: str = ""
    node_id: int | None = None
    mode: str = "auto"
    poll_interval: float = 30.0
    # bounds on the server-advised interval: a server (or anyone posing as one on Zone 0) can neither
    # make the agent hammer it nor silence it for longer than poll_max. 900 s: a server sheds resting
    # agents while the site boots (docs/agent-api.md "Poll interval", up to 900 s by default); drift
    # repair keeps its poll_interval pace meanwhile (`Agent.rest`), so a long advice only spaces the
    # check-ins: a policy change waits at most poll_max, the data plane never does.
    poll_min: float = 5.0
    poll_max: float = 900.0
    retry_failed: float = 60.0
    backoff_max: float = 60.0
    repull_every: int = 10
    ra_interval: float = 10.0
    tools: Tools = field(default_factory=Tools)
    frr: FrrTools = field(default_factory=FrrTools)


def load_config(path: str | Path) -> AgentConfig:
    cp = configparser.ConfigParser(interpolation=None)
    if not cp.read(path):
        raise SystemExit(f"bootsvc-agent: cannot read config {path}")
    if "agent" not in cp:
        raise SystemExit(f"bootsvc-agent: {path}: no [agent] section")
    s = cp["agent"]
    secret = s.get("secret", "").strip()
    if not secret and s.get("secret_file"):
        secret = Path(s["secret_file"]).read_text().strip()
    if s.get("state_dir"):
        rotated = Path(s["state_dir"]) / SECRET_FILE
        try:
            secret = rotated.read_text().strip() or secret  # the one bootsvc handed over at check-in
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SystemExit(f"bootsvc-agent: cannot read {rotated}: {e.strerror}") from None
    missing = [k for k in ("url", "node", "host_port", "uplink", "state_dir") if not s.get(k)]
    if not secret:
        missing.append("secret|secret_file")
    if missing:
        raise SystemExit(f"bootsvc-agent: {path}: missing {', '.join(missing)}")
    mode = s.get("mode", "auto")
    if mode not in ("auto", "vrf", "table"):
        raise SystemExit(f"bootsvc-agent: {path}: mode must be auto|vrf|table")
    return AgentConfig(
        url=s["url"], node=s["node"], secret=secret, host_port=s["host_port"], uplink=s["uplink"],
        state_dir=Path(s["state_dir"]), serial=s.get("serial", ""),
        node_id=s.getint("node_id") if s.get("node_id") else None, mode=mode,
        poll_interval=s.getfloat("poll_interval", 30.0), poll_min=s.getfloat("poll_min", 5.0),
        poll_max=s.getfloat("poll_max", 900.0), retry_failed=s.getfloat("retry_failed", 60.0),
        backoff_max=s.getfloat("backoff_max", 60.0), repull_every=s.getint("repull_every", 10),
        ra_interval=s.getfloat("ra_interval", 10.0),
        tools=Tools(ip=s.get("ip", "ip"), bridge=s.get("bridge", "bridge"), nft=s.get("nft", "nft")),
        frr=FrrTools(vtysh=s.get("vtysh", "vtysh"), frr_reload=s.get("frr_reload", FrrTools.frr_reload),
                     vty_socket=s.get("frr_vty_socket", ""), conf_dir=s.get("frr_conf_dir", "/etc/frr"),
                     timeout=s.getfloat("frr_timeout", FrrTools.timeout)),
    )


class Agent:
    def __init__(self, cfg: AgentConfig, dp: Dataplane | None = None, api: AgentApi | None = None,
                 frr: Frr | None = None) -> None:
        self.cfg = cfg
        self.dp = dp or Dataplane(cfg.tools)
        self.frr = frr or Frr(cfg.frr, cfg.state_dir)
        # FRR's running config is unknown at start and after a refused load: load it on the next converge
        self.frr_dirty = True
        self.frr_error: str | None = None
        self.api = api or AgentApi(cfg.url, cfg.node, cfg.secret, on_new_secret=self._store_secret)
        mode = cfg.mode
        if mode == "auto":
            mode = "vrf" if self.dp.vrf_supported() else "table"
        self.env = Env(cfg.host_port, cfg.uplink, mode)
        self.started = time.monotonic()
        self.applied: Policy = self._load_applied()
        self.last_error: str | None = None
        self.failed_at: dict[str, float] = {}
        self.pending_report: dict[str, Any] | None = None
        self.backoff = 0.0
        self.polls = 0
        self.relay: RelayServer | None = None
        self.ra: RaSender | None = None
        self._services_key: object = None
        self.stop_event = threading.Event()

    # ---- persistence -----------------------------------------------------------------------
    def _store_secret(self, secret: str) -> bool:
        """Keep the secret bootsvc handed over at check-in (atomic, 0600) before it is used; False =
        not stored, keep using the old one (bootsvc re-sends the new one until it has been used)."""
        path = self.cfg.state_dir / SECRET_FILE
        tmp = path.with_suffix(".tmp")
        try:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot store the new node secret in %s (%s); keeping the current one", path, e.strerror)
            return False
        return True

    @property
    def _state_file(self) -> Path:
        return self.cfg.state_dir / "applied.json"

    def _load_applied(self) -> Policy:
        try:
            return parse(json.loads(self._state_file.read_text()))
        except FileNotFoundError:
            return isolated(self.cfg.node)
        except (ValueError, PolicyError, OSError) as e:
            log.error("state: cannot use %s (%s); starting isolated", self._state_file, e)
            return isolated(self.cfg.node)

    def _save_applied(self, p: Policy) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(p.raw, sort_keys=True))
        os.replace(tmp, self._state_file)  # atomic: a crash leaves the old or the new file

    # ---- health ----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        t = self.applied.tenant
        return {
            "applied_version": self.applied.version,
            "mode": self.env.mode,
            "tenant": t.name if t else None,
            "last_error": self.last_error,
            "relay": self.relay.stats.as_dict() if self.relay else None,
            "ra_sent": self.ra.sent if self.ra else 0,
            "uptime_s": int(time.monotonic() - self.started),
            "fabric": self.fabric(),
        }

    def fabric(self) -> dict[str, Any] | None:
        """The fabric report (bootsvc.agent.fabric_health) for the applied policy; None without EVPN."""
        p = self.applied
        if p.evpn is None:
            return None
        t = p.tenant
        try:
            outputs, errors = self.frr.state(t.vrf_name if t else None)
        except FrrError as e:
            outputs, errors = {}, [str(e)]
        rep = fabric_report(outputs, uplink_names=p.evpn.uplinks, vrf=t.vrf_name if t else None,
                            vni=t.l3vni if t else None,
                            host_prefixes=tuple(str(x) for x in t.host_prefixes) if t else (),
                            errors=errors)
        rep["policy_version"] = p.version
        rep["frr_error"] = self.frr_error
        return rep

    # ---- applying --------------------------------------------------------------------------
    def converge(self, policy: Policy) -> int:
        """Bring the kernel to ``policy``; returns the number of commands run."""
        if policy.host_port is not None and policy.host_port != self.cfg.host_port:
            raise PolicyError(f"policy host_port {policy.host_port} is not this DPU's port {self.cfg.host_port}")
        cmds = plan(policy, self.env, self.dp.observe(self.env))
        self.dp.execute(cmds)
        n = len(cmds) + self._converge_frr(policy)
        self._services(policy)
        return n

    def _converge_frr(self, policy: Policy) -> int:
        """Load the policy's FRR config when it differs from what FRR last accepted (or FRR's state
        is unknown). Returns 1 when a load ran."""
        text = render_frr(policy)
        if text is None or (not self.frr_dirty and text == self.frr.applied()):
            return 0
        try:
            self.frr.load(text)
        except FrrError as e:
            self.frr_dirty = True  # a refused load may have applied part of the delta
            self.frr_error = f"FRR refused policy {policy.version}: {e}"
            raise FrrError(self.frr_error) from None
        self.frr_dirty = False
        self.frr_error = None
        log.info("frr: loaded the config of policy %s", policy.version)
        return 1

    def _relay_params(self, policy: Policy) -> RelayParams | None:
        t = policy.tenant
        if t is None or t.relay is None:
            return None
        r = t.relay
        # one giaddr for all servers (replies must come back to one address we bind): the source
        # towards the first; the servers of one site sit on one Zone 0 network
        giaddr = r.giaddr or self.dp.route_src(r.server)
        if giaddr is None:
            raise ApplyError(Cmd(("relay",)), f"no route from Zone 0 to the DHCP server {r.server}")
        return RelayParams(
            host_port=self.cfg.host_port, giaddr=giaddr, servers=r.targets,
            circuit_id=(r.circuit_id or self.cfg.host_port).encode(),
            remote_id=(r.remote_id or self.cfg.serial or self.cfg.node).encode(),
            vss_vrf=r.vss_vrf, link_selection=r.link_selection, server_id_override=r.server_id_override)

    def _services(self, policy: Policy) -> None:
        params = self._relay_params(policy)
        ra = bool(policy.tenant and policy.tenant.ra)
        key = (params, ra)
        if key == self._services_key:
            return
        self.stop_services()
        if params is not None:
            relay = RelayServer(params)
            relay.start()
            self.relay = relay
        if ra:
            mac = self.dp.link_mac(self.cfg.host_port)
            if mac:
                sender = RaSender(self.cfg.host_port, parse_mac(mac), interval=self.cfg.ra_interval)
                sender.start()
                self.ra = sender
        self._services_key = key

    def stop_services(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        if self.ra is not None:
            self.ra.stop()
            self.ra = None
        self._services_key = None

    def apply(self, new: Policy) -> str | None:
        """Apply ``new``; on failure roll back to the applied policy. Returns the error or None."""
        prev = self.applied
        try:
            self.converge(new)
        except (ApplyError, FrrError, PlanError, PolicyError, OSError) as e:
            err = str(e)
            log.error("apply %s failed: %s; rolling back to %s", new.version, err, prev.version)
            try:
                self.converge(prev)
            except (ApplyError, FrrError, PlanError, PolicyError, OSError) as e2:
                err += f"; rollback to {prev.version} failed: {e2}"
                log.error("rollback failed: %s", e2)
            self.last_error = err
            return err
        self.applied = new
        self._save_applied(new)
        self.last_error = None
        log.info("applied policy %s (tenant %s)", new.version, new.tenant.name if new.tenant else None)
        return None

    # ---- the loop --------------------------------------------------------------------------
    def _repair(self) -> None:
        try:
            n = self.converge(self.applied)
            if n:
                log.warning("repaired drift: %d commands against policy %s", n, self.applied.version)
        except (ApplyError, FrrError, PlanError, PolicyError, OSError) as e:
            self.last_error = f"converge {self.applied.version}: {e}"
            log.error("%s", self.last_error)

    def _report(self, version: str, status: str, error: str | None) -> None:
        self.pending_report = {"version": version, "status": status, "error": error}
        self._flush_report()

    def _flush_report(self) -> None:
        if self.pending_report is None:
            return
        r = self.pending_report
        self.api.report(r["version"], r["status"], r["error"], self.health())
        self.pending_report = None

    def step(self) -> float:
        """One iteration; returns how long to wait before the next one."""
        self.polls += 1
        self._repair()
        try:
            want = self.api.checkin(self.health())
            self._flush_report()
            due = self.polls % max(1, self.cfg.repull_every) == 0
            if want is not None and (want != self.applied.version or due):
                failed = self.failed_at.get(want)
                if failed is None or time.monotonic() - failed >= self.cfg.retry_failed:
                    self._pull_and_apply()
        except Unreachable as e:
            self.backoff = min(self.cfg.backoff_max, max(1.0, self.backoff * 2 or 1.0))
            log.warning("bootsvc unreachable (%s); keeping policy %s, retry in %.0fs",
                        e, self.applied.version, self.backoff)
            return self.backoff
        except ApiError as e:
            self.backoff = min(self.cfg.backoff_max, max(1.0, self.backoff * 2 or 1.0))
            log.error("bootsvc refused: %s; retry in %.0fs", e, self.backoff)
            return self.backoff
        self.backoff = 0.0
        return self.next_poll(want)

    def next_poll(self, want: str | None) -> float:
        """The wait before the next check-in: what the server advised, within [poll_min, poll_max]; the
        agent's own poll_interval without advice or while the wanted policy is not the applied one (a
        failed apply is retried at its own pace, retry_failed)."""
        advised = getattr(self.api, "advised_poll", None)
        if not isinstance(advised, float) or (want is not None and want != self.applied.version):
            return self.cfg.poll_interval
        lo, hi = self.cfg.poll_min, max(self.cfg.poll_min, self.cfg.poll_max)
        return min(hi, max(lo, advised))

    def _pull_and_apply(self) -> None:
        f = self.api.policy(etag=self.applied.version)
        if f.doc is None:
            return
        try:
            new = parse(f.doc)
        except PolicyError as e:
            version = str(f.doc.get("version", f.etag or "?"))
            self.failed_at[version] = time.monotonic()
            self.last_error = f"invalid policy {version}: {e}"
            self._report(version, "failed", self.last_error)
            return
        if new.version == self.applied.version and new.raw == self.applied.raw:
            return
        err = self.apply(new)
        if err is None:
            self.failed_at.pop(new.version, None)
            self._report(new.version, "applied", None)
        else:
            self.failed_at[new.version] = time.monotonic()
            self._report(new.version, "failed", err)

    def rest(self, delay: float) -> None:
        """Wait ``delay`` seconds (or until stopped), repairing drift every ``poll_interval`` meanwhile:
        an advised interval longer than the agent's own spaces the check-ins, not the repair."""
        end = time.monotonic() + delay
        while True:
            left = end - time.monotonic()
            if left <= 0 or self.stop_event.wait(min(left, self.cfg.poll_interval)):
                return
            if end - time.monotonic() > 0:
                self._repair()

    def run(self) -> None:
        log.info("bootsvc-agent %s: node %s, mode %s, host port %s, applied %s", AGENT_VERSION,
                 self.cfg.node, self.env.mode, self.cfg.host_port, self.applied.version)
        try:
            while not self.stop_event.is_set():
                self.rest(self.step())
        finally:
            self.stop_services()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bootsvc-agent", description="bootsvc DPU policy agent")
    ap.add_argument("-c", "--config", default="/etc/bootsvc-agent/agent.conf")
    ap.add_argument("--once", action="store_true", help="one check-in/apply cycle, then exit")
    ap.add_argument("--plan", action="store_true",
                    help="print the plan (kernel commands, FRR config changes) for the applied policy and exit")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(load_config(args.config))
    if args.plan:
        for c in plan(agent.applied, agent.env, agent.dp.observe(agent.env)):
            print(c)
        text = render_frr(agent.applied)
        for change in diff_frr(agent.frr.applied(), text) if text is not None else []:
            print(f"frr: {change}")  # against the config FRR last accepted from this agent
        return 0
    if args.once:
        agent.step()
        agent.stop_services()
        return 0 if agent.last_error is None else 1

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping (data plane left as applied)", signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
