"""Site configuration: one YAML file validated into typed, frozen objects.

Owns: the schema of ``config/*.yaml``, ``BOOTSVC_*`` environment overrides, and turning a bad file
into one clear error naming the file, the field and the reason. Load once at start-up and pass the
``Config`` object down; nothing else reads the file or the environment for settings.

Environment overrides: ``BOOTSVC_<SECTION>__<FIELD>`` (double underscore between levels), e.g.
``BOOTSVC_DATABASE__URL=postgresql+psycopg://...``; plus the short ``BOOTSVC_DB_URL``.

One module of about 500 lines, on purpose: the whole schema in one file, section by section in the
order of ``config/site-example.yaml``, is what a reader checking a key against the code wants open.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A config file that cannot be used; the message names file, field and reason."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AddressRange(_Frozen):
    start: IPv4Address
    end: IPv4Address

    @model_validator(mode="after")
    def _ordered(self) -> AddressRange:
        if int(self.end) < int(self.start):
            raise ValueError(f"range end {self.end} is before start {self.start}")
        return self

    def __contains__(self, addr: object) -> bool:
        if not isinstance(addr, IPv4Address):
            return False
        return int(self.start) <= int(addr) <= int(self.end)

    def size(self) -> int:
        return int(self.end) - int(self.start) + 1


class ZoneConfig(_Frozen):
    id: Literal[0, 1, 2]
    name: str
    description: str = ""


class NetworkConfig(_Frozen):
    """An L3 segment bootsvc hands out addresses on (directly or through relays)."""

    name: str
    zone: Literal[0, 1, 2]
    vrf: str = ""  # "" = the default VRF (Zone 0 management); otherwise a tenant VRF name
    cidr: IPv4Network
    gateway: IPv4Address | None = None
    pools: tuple[AddressRange, ...] = ()
    reserved: tuple[AddressRange, ...] = ()
    relays: tuple[IPv4Address, ...] = ()  # giaddrs whose requests land on this network
    dns_servers: tuple[IPv4Address, ...] = ()
    domain: str | None = None
    lease_seconds: int = Field(default=3600, ge=60, le=7 * 86400)
    boot_server: IPv4Address | None = None  # address clients of this network reach bootsvc at
    # Several instances: every instance's boot_server on this network, the same list in every
    # instance's config (a DPU's policy relays to all of them and opens its flows to all, so every
    # instance builds the same document: bootsvc.policy). Empty: just boot_server (one instance).
    # at most 16: the agent relays each host request to each (bootsvc.agent.policy.MAX_RELAY_SERVERS)
    boot_servers: tuple[IPv4Address, ...] = Field(default=(), max_length=16)

    @model_validator(mode="after")
    def _inside(self) -> NetworkConfig:
        if self.boot_servers and self.boot_server is not None and self.boot_server not in self.boot_servers:
            raise ValueError(f"boot_server {self.boot_server} is not in boot_servers "
                             f"{[str(a) for a in self.boot_servers]} (list every instance's address, this one too)")
        if len(set(self.boot_servers)) != len(self.boot_servers):
            raise ValueError("boot_servers lists an address twice")
        if self.gateway is not None and self.gateway not in self.cidr:
            raise ValueError(f"gateway {self.gateway} is outside {self.cidr}")
        for r in (*self.pools, *self.reserved):
            if r.start not in self.cidr or r.end not in self.cidr:
                raise ValueError(f"range {r.start}-{r.end} is outside {self.cidr}")
        return self


def _egress_items(v: tuple[str, ...]) -> tuple[str, ...]:
    """Zone 2 flows as ``proto:cidr[:port]`` (orchestration.egress, tenants[].egress)."""
    for item in v:
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("tcp", "udp", "icmp"):
            raise ValueError(f"egress {item!r}: want proto:cidr[:port] with proto tcp|udp|icmp")
        ipaddress.IPv4Network(parts[1], strict=True)
        if len(parts) == 3 and not (parts[2].isdigit() and 1 <= int(parts[2]) <= 65535):
            raise ValueError(f"egress {item!r}: port must be 1..65535")
    return v


class TenantConfig(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    vrf: str = Field(pattern=r"^[A-Za-z0-9_-]{1,15}$")  # Linux device-name limit on the DPU
    l3vni: int = Field(ge=1, le=16_777_215)
    prefixes: tuple[IPv4Network, ...] = ()
    table: int | None = Field(default=None, ge=1, le=2**31 - 1)
    # Zone 2 flows for this tenant's hosts only, added to orchestration.egress (which every tenant gets)
    egress: tuple[str, ...] = ()

    @field_validator("egress")
    @classmethod
    def _egress(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _egress_items(v)


class Listener(_Frozen):
    address: IPv4Address = IPv4Address("127.0.0.1")
    port: int = Field(ge=1, le=65535)
    netns: str | None = None


HttpRole = Literal["boot", "api", "ui", "webhook", "metrics"]
HTTP_ROLES: tuple[HttpRole, ...] = ("boot", "api", "ui", "webhook", "metrics")


class TlsConfig(_Frozen):
    """A PEM certificate (chain) and its key for an HTTPS listener (docs/operations-listeners.md)."""

    cert: Path
    key: Path


class HttpListener(Listener):
    """An HTTP listener and the roles it serves (docs/operations-listeners.md). ``roles`` unset: every
    role on a loopback address; only ``boot`` on an address that Zone 0 clients reach (the wildcard, a
    network's ``boot_server``, or an address inside a Zone 0 network); otherwise api, ui, webhook and
    metrics (a management address). ``tls``: serve HTTPS with this certificate."""

    roles: tuple[HttpRole, ...] | None = None
    tls: TlsConfig | None = None


class DhcpListener(_Frozen):
    interface: str
    address: IPv4Address | None = None  # server identifier on this interface; default: its address
    netns: str | None = None
    port: int = Field(default=67, ge=1, le=65535)


class ListenersConfig(_Frozen):
    """Where each protocol server listens. Empty = not started. DHCP/TFTP/DNS default to nothing."""

    http: tuple[HttpListener, ...] = (HttpListener(port=8080),)
    dhcp: tuple[DhcpListener, ...] = ()
    tftp: tuple[Listener, ...] = ()
    dns: tuple[Listener, ...] = ()


class DatabaseConfig(_Frozen):
    url: str = "sqlite:///var/bootsvc.db"


class SiteConfig(_Frozen):
    name: str = "bootsvc"
    domain: str = "prov.internal"


class ImagesConfig(_Frozen):
    catalog: Path = Path("images/catalog.yaml")
    root: Path = Path("images")


class BmcNetworkConfig(_Frozen):
    """A network whose BMCs may be sent a credential; ``lab``: plain http allowed (a lab or emulator)."""

    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    lab: bool = False

    @model_validator(mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return {"cidr": v} if isinstance(v, str) else v  # "10.1.0.0/16" is short for {cidr: 10.1.0.0/16}


class CredentialConfig(_Frozen):
    """Where a BMC credential lives and which BMC networks it may be sent to.

    The database stores only the reference name. A credential is sent only to a BMC whose address is
    an IP inside ``networks``, over HTTPS unless that network is marked ``lab`` (bootsvc.power.credentials).
    """

    ref: str  # "env:USER_VAR:PASS_VAR" or "file:/path"
    networks: tuple[BmcNetworkConfig, ...] = ()  # empty: sent nowhere (power actions are refused)

    @field_validator("ref")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("env:") or v.startswith("file:")):
            raise ValueError("credential ref must start with 'env:' or 'file:'")
        return v


class SecurityConfig(_Frozen):
    node_key_ref: str = "file:var/node.key"  # HMAC key for per-node secrets; created if missing
    webhook_secret_ref: str | None = None
    dpu_password_hash: str = "!"  # locked unless the site sets a crypt(3) hash
    token_ttl_days: int = Field(default=90, ge=0, le=3650)  # new API tokens expire; 0 = never (say so)
    ui_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)  # one shift; then log in again
    # Boot-plane identity (docs/security.md): boot tokens, bf.cfg, callbacks and the agent API only
    # from an address DHCP leased (or reserved) for the node's MACs. Off only behind a NAT on Zone 0.
    boot_bind_address: bool = True
    # Requests naming a MAC or node that the source address does not hold (a MAC sweep), per source
    # address: a token bucket (per second, burst); over it -> 429.
    boot_sweep_rate: float = Field(default=1.0, gt=0)
    boot_sweep_burst: int = Field(default=20, ge=1)
    # PermitRootLogin on installed DPUs (bf.cfg); root's password always stays locked.
    dpu_ssh_root_login: Literal["no", "prohibit-password", "yes"] = "no"


class DhcpConfig(_Frozen):
    unknown_clients: Literal["ignore", "discover", "serve"] = "ignore"  # serve: plain DHCP, no boot
    discovery_lease_seconds: int = Field(default=300, ge=30)
    offer_ttl_seconds: int = Field(default=30, ge=1)
    per_mac_rate: float = Field(default=10.0, gt=0)  # packets/s sustained per client MAC
    per_relay_rate: float = Field(default=2000.0, gt=0)
    # RFC 2131 §2/§4.2: the client identifier (option 61), when present, identifies the client.
    # false = Kea's match-client-id: false (one lease per chaddr, e.g. PXE ROM and OS sharing it).
    match_client_id: bool = True
    # Several instances on one PostgreSQL behind relays that forward to all of them (RFC 2131 §4.2:
    # servers sharing an address space must not offer the same address): instance i of n offers new
    # addresses from its own stripe of each pool first (offset mod n == i), so two offers never collide;
    # any free address once its stripe is full. bootsvc/dhcp/leases.py; docs/operations.md.
    instance_index: int = Field(default=0, ge=0, le=63)
    instance_count: int = Field(default=1, ge=1, le=64)
    # ...and each instance answers the DISCOVERs (and REQUESTs without ciaddr) of its share of the clients
    # (a hash of chaddr, as RFC 3074 load balancing does), another instance's share only once the client has
    # been trying for lb_max_seconds (its secs field, RFC 2131 §2): ISC dhcpd's "load balance max
    # seconds" - a dead instance's clients are answered by the others after a few retransmissions.
    lb_max_seconds: int = Field(default=3, ge=0, le=60)

    @model_validator(mode="after")
    def _instance_in_range(self) -> DhcpConfig:
        if self.instance_index >= self.instance_count:
            raise ValueError(f"dhcp.instance_index {self.instance_index} must be below dhcp.instance_count "
                             f"{self.instance_count} (instances are numbered from 0)")
        return self


class BootConfig(_Frozen):
    http_port: int = Field(default=8080, ge=1, le=65535)
    provision_method: Literal["pxe", "redfish"] = "pxe"
    tftp_root: Path = Path("var/tftp")
    arm64_nbp: str = "arm64/grubnetaa64.efi"
    # The port GRUB's (http,host) device reaches bootsvc on: 80 works with every GRUB (2.06's net code
    # reads no port from the device name); another port only with a GRUB that parses host:port.
    grub_http_port: int = Field(default=80, ge=1, le=65535)
    # bf.cfg's bfb_pre_install/bfb_modify_os/bfb_post_install report progress to the node's callback URL.
    # Off: the installer (like NVIDIA's own) tells bootsvc nothing; the agent's first check-in ends the
    # install (bootsvc/states.py), the BMC path also follows the BMC's task and OemLastState.
    bfcfg_callbacks: bool = True


class TftpConfig(_Frozen):
    """TFTP flood limits and option bounds (bootsvc/tftp/service.py; docs/conformance.md (TFTP))."""

    max_transfers: int = Field(default=1000, ge=1, le=100_000)  # concurrent, per listener (all workers)
    max_per_client: int = Field(default=8, ge=1, le=10_000)  # concurrent, per source address and worker
    max_windowsize: int = Field(default=64, ge=1, le=65535)  # RFC 7440: the server may answer less
    timeout_seconds: float = Field(default=2.0, gt=0, le=255)  # unless the client's RFC 2349 timeout
    retries: int = Field(default=5, ge=1, le=50)


class RetentionConfig(_Frozen):
    """How long the database keeps history (``bootsvc.retention``; 0 = keep forever). The conductor
    prunes every ``interval_seconds``; ``bootsvc db prune`` does it on demand."""

    interval_seconds: float = Field(default=3600.0, gt=0)
    event_days: int = Field(default=365, ge=0)  # node event log (audit trail: keep it long)
    outbox_days: int = Field(default=7, ge=0)  # delivered outgoing events
    lease_days: int = Field(default=30, ge=0)  # released/expired/declined lease rows
    lease_grace_seconds: int = Field(default=300, ge=0)  # bound/offered past expiry -> marked expired
    webhook_days: int = Field(default=30, ge=0)  # inbound delivery ids kept for de-duplication
    session_days: int = Field(default=7, ge=0)  # ended/expired UI sessions
    batch: int = Field(default=5000, ge=100, le=100000)  # rows per delete statement (short transactions)


class ConductorConfig(_Frozen):
    interval_seconds: float = Field(default=2.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    backoff_seconds: float = Field(default=10.0, ge=0)
    deadlines: Mapping[str, int] = Field(default_factory=dict)  # state -> seconds, overrides defaults


class OrchestrationConfig(_Frozen):
    """Settings of the orchestration area (conductor claims, agent policy, webhooks, outgoing events)."""

    vtep_network: IPv4Network | None = None  # DPU VTEP /32s: network address + node id
    vxlan_port: int = Field(default=4789, ge=1, le=65535)  # IANA VXLAN port (RFC 7348 §5)
    host_port: str = Field(default="pf0hpf", pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    router_advertisements: bool = True
    egress: tuple[str, ...] = ()  # Zone 2 flows for tenant hosts: "proto:cidr[:port]", e.g. "tcp:0.0.0.0/1:443"
    evpn_asn: int | None = Field(default=None, ge=1, le=2**32 - 1)
    evpn_uplinks: tuple[str, ...] = ("p0", "p1")
    claim_seconds: float = Field(default=300.0, ge=1)  # conductor lease on a node while it acts
    workers: int = Field(default=8, ge=1, le=256)  # conductor steps run in parallel (BMC calls are slow)
    power_timeout_seconds: float = Field(default=60.0, gt=0)  # synchronous API power actions
    webhook_window_seconds: int = Field(default=300, ge=1)  # accepted clock skew / replay window
    delivery_timeout_seconds: float = Field(default=5.0, gt=0)
    delivery_backoff_seconds: float = Field(default=2.0, gt=0)
    delivery_backoff_max_seconds: float = Field(default=300.0, gt=0)
    # The check-in interval the server advises resting agents (docs/agent-api.md "Poll interval"):
    # resting DPUs / agent_checkin_rate, at most agent_poll_max_seconds, once that is longer than the
    # agents' own interval (agent_poll_seconds: bootsvc/agent poll_interval). The default changes
    # nothing below 750 resting DPUs; at 3,000 they come back every 120 s, from 7,500 every 300 s.
    # 25/s is Consul's pace: its anti-entropy syncs every agent once a minute up to 128 nodes and
    # doubles the interval at each doubling past that (agent/ae/ae.go scaleFactor: 8 at 8,192 nodes),
    # ~17-21 syncs/s at 8-10k nodes. 100/s (the earlier default) spent ~8 check-ins per pair in a
    # 10k-pair storm, a growing share of the server (bench/storm/README.md). Trade-off: a policy
    # change reaches a resting agent within one advised interval. agent_checkin_rate 0 = never advise.
    agent_poll_seconds: float = Field(default=30.0, ge=1, le=3600)
    agent_checkin_rate: float = Field(default=25.0, ge=0)  # check-ins/s the site accepts from resting agents
    agent_poll_max_seconds: float = Field(default=300.0, ge=1, le=3600)
    # While the site boots (more than agent_booting_nodes nodes in working states: states.ACTIVE_STATES)
    # resting agents are the lowest-priority traffic and are shed: advised at agent_booting_rate a second,
    # at most agent_booting_poll_max_seconds (never faster nor shorter than the rule above). Kubernetes
    # sheds low-priority API traffic under load the same way (API Priority and Fairness,
    # https://kubernetes.io/docs/concepts/cluster-administration/flow-control). The agent's own poll_max
    # (bootsvc/agent/main.py, 900 s) bounds it. agent_booting_nodes 0 = never.
    agent_booting_nodes: int = Field(default=100, ge=0)
    agent_booting_rate: float = Field(default=5.0, gt=0)
    agent_booting_poll_max_seconds: float = Field(default=900.0, ge=1, le=3600)

    @field_validator("egress")
    @classmethod
    def _flows(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _egress_items(v)


class FabricConfig(_Frozen):
    """The tenant fabric the DPUs join (docs/fabric.md): FRR on every DPU, BGP unnumbered to the leaves
    (RFC 8950), EVPN Type-5 per tenant VRF (RFC 9136), and the boot gate on the DPU's fabric report."""

    # EVPN: tenant reachability from BGP routes only; the policy carries no per-fleet peer list. Takes
    # effect once ``asn`` is set (or the older orchestration.evpn_asn); ``false`` = static peer VTEP
    # lists pushed by bootsvc (fabrics without EVPN), and no FRR on the DPUs.
    evpn: bool = True
    asn: int | None = Field(default=None, ge=1, le=2**32 - 1)  # DPU ASN (or the base, see asn_per_dpu)
    # RFC 7938 §5.2.1: one private ASN per DPU (asn + node id) keeps eBGP loop detection meaningful
    asn_per_dpu: bool = True
    uplinks: tuple[str, ...] = ("p0", "p1")  # BGP unnumbered ports to the leaves
    # route targets of each tenant VRF: None = FRR's auto-derived ASN:VNI (matched on the VNI alone for
    # eBGP fabrics); a number = explicit import/export "<number>:<L3VNI>" on every DPU
    route_target_asn: int | None = Field(default=None, ge=1, le=65535)
    gate_boot: bool = True  # host boots only once its DPUs report sessions up, L3VNI up, prefix advertised
    gate_deadline_seconds: float = Field(default=300.0, gt=0)  # then the DPU goes to policy_failed
    min_uplinks_established: int | None = Field(default=None, ge=1)  # None = every uplink


class PowerConfig(_Frozen):
    """BMC driver settings (bootsvc.power; maps onto power.base.PowerSettings)."""

    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    ca_file: Path | None = None  # PEM bundle that signs BMC certificates; None = system bundle
    max_sessions_per_bmc: int = Field(default=2, ge=1, le=32)
    slot_wait: float = Field(default=60.0, ge=0)
    poll_interval: float = Field(default=0.5, gt=0)
    power_timeout: float = Field(default=120.0, gt=0)
    graceful_timeout: float = Field(default=60.0, ge=0)
    drop_grace: float = Field(default=20.0, ge=0)
    # BlueField BFB push through the DPU BMC (docs: bluefield-real.md §3, §5)
    bfb_uri_scheme_firmware: tuple[str, ...] = ()  # BMC firmware globs whose SimpleUpdate ImageURI keeps http://
    update_wait: float = Field(default=600.0, ge=0)  # wait for the BMC's UpdateService / a running update
    rshim_wait: float = Field(default=30.0, ge=0)  # wait for BMC RShim to come up (then toggle once)
    install_timeout: float = Field(default=2400.0, gt=0)  # transfer done -> DPU OS running (NVIDIA: 40 min)
    bfb_url_ttl: float = Field(default=3600.0, gt=0)  # one-time BFB+bf.cfg URL lifetime
    dpu_mode_switch: bool = False  # a DPU in NIC mode may be switched (Mode.Set, 2 Arm reboots, power cycle)
    secure_boot_disable: bool = False  # Secure Boot may be turned off for a network (PXE) install
    # Site power-on budget, shared by every conductor through the database (bootsvc.conductor.PowerBudget):
    # at most rack_power_ons power-ons per rack in any rack_window_seconds (0 = no limit), and at most
    # max_concurrent_bmc BMC actions in flight site-wide, on top of max_sessions_per_bmc (0 = no limit).
    rack_power_ons: int = Field(default=0, ge=0, le=10_000)
    rack_window_seconds: float = Field(default=60.0, gt=0)
    max_concurrent_bmc: int = Field(default=0, ge=0, le=10_000)
    # The conductor keeps a BMC's Redfish session between the calls of a step and across steps for this
    # long (bootsvc.power.redfish_session.SessionPool; 0 = log in and out for every call, as the CLI does).
    session_idle_seconds: float = Field(default=20.0, ge=0, le=600)
    # ... and what a BMC said of itself (the service root's links, its System and Manager, identity and
    # quirks) for this long across its sessions, so a step on a new session does not read them again;
    # learnt again sooner after a transport error, a 401, a 404/405/410 or a firmware update bootsvc
    # sent (bootsvc.power.redfish_session.Known). 0 = with every new session.
    discovery_seconds: float = Field(default=600.0, ge=0, le=3600)
    # HTTP proxy for BMC traffic (http://host:port), for sites that reach BMCs only through one. The
    # process environment (HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc) never applies to BMCs.
    proxy: str | None = Field(default=None, pattern=r"^https?://[^\s/]+/?$")


class LabMachineConfig(_Frozen):
    """One machine of the QEMU rack: a DPU VM and, optionally, the host VM behind it."""

    dpu: Literal["bios", "uefi", "uefi-native", "arm64"] = "uefi-native"
    host: Literal["bios", "uefi", "uefi-native"] | None = "bios"
    tenant: str | None = None  # the host's tenant (default: the first tenant in the config)


class LabConfig(_Frozen):
    """The QEMU rack of ``bootsvc lab`` (owned by bootsvc.lab.rack): names, machines, BMC ports."""

    prefix: str = Field(default="bx", pattern=r"^b[a-z][a-z0-9]{0,2}$")  # netns/device name prefix
    machines: tuple[LabMachineConfig, ...] = (LabMachineConfig(),)
    bmc_port_base: int = Field(default=18400, ge=1024, le=65000)  # loopback; 2 ports per machine
    workdir: Path = Path("var/lab/rack")  # VM disks, NVRAM, serial logs, BMC state


class Config(_Frozen):
    site: SiteConfig = SiteConfig()
    database: DatabaseConfig = DatabaseConfig()
    state_dir: Path = Path("var")
    zones: tuple[ZoneConfig, ...] = (
        ZoneConfig(id=0, name="management", description="DPU management and control plane"),
        ZoneConfig(id=1, name="tenant", description="host traffic inside its tenant VRF"),
        ZoneConfig(id=2, name="external", description="ingress/egress"),
    )
    networks: tuple[NetworkConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    images: ImagesConfig = ImagesConfig()
    bmc_credentials: Mapping[str, CredentialConfig] = Field(default_factory=dict)
    listeners: ListenersConfig = ListenersConfig()
    security: SecurityConfig = SecurityConfig()
    dhcp: DhcpConfig = DhcpConfig()
    boot: BootConfig = BootConfig()
    tftp: TftpConfig = TftpConfig()
    conductor: ConductorConfig = ConductorConfig()
    retention: RetentionConfig = RetentionConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    fabric: FabricConfig = FabricConfig()
    power: PowerConfig = PowerConfig()
    lab: LabConfig = LabConfig()
    source: str = "<defaults>"  # the file this came from, for messages

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [n.name for n in self.networks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"networks: duplicate names {sorted(dup)}")
        vrfs = {t.vrf for t in self.tenants}
        tnames = [t.name for t in self.tenants]
        if len(set(tnames)) != len(tnames):
            raise ValueError("tenants: duplicate tenant names")
        for i, n in enumerate(self.networks):
            if n.vrf and n.vrf not in vrfs:
                raise ValueError(f"networks.{i}.vrf: unknown tenant VRF {n.vrf!r}")
        # Overlap is legal across VRFs (RFC 6607) but not inside one VRF.
        for i, a in enumerate(self.networks):
            for b in self.networks[i + 1 :]:
                if a.vrf == b.vrf and a.cidr.overlaps(b.cidr):
                    raise ValueError(f"networks {a.name} and {b.name} overlap in VRF {a.vrf or 'default'!r}")
        return self

    def http_roles(self, listener: HttpListener) -> frozenset[str]:
        """The roles an HTTP listener serves: its own list, or the safe default for its address."""
        if listener.roles is not None:
            return frozenset(listener.roles)
        addr = listener.address
        if addr.is_loopback:
            return frozenset(HTTP_ROLES)
        zone0 = [n for n in self.networks if n.zone == 0]
        if addr.is_unspecified or any(addr == n.boot_server or addr in n.cidr for n in zone0) or any(
                addr == n.boot_server for n in self.networks):
            return frozenset({"boot"})
        return frozenset(HTTP_ROLES) - {"boot"}

    def network(self, name: str) -> NetworkConfig:
        for n in self.networks:
            if n.name == name:
                return n
        raise KeyError(name)

    def tenant_by_vrf(self, vrf: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.vrf == vrf), None)

    def resolve(self, p: Path) -> Path:
        """Relative paths in the config are relative to the working directory of the service."""
        return p if p.is_absolute() else Path.cwd() / p


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value


def _env_overrides(tree: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    out = dict(tree)
    if "BOOTSVC_DB_URL" in env:
        _set_path(out, ["database", "url"], env["BOOTSVC_DB_URL"])
    for key, raw in env.items():
        if not key.startswith("BOOTSVC_") or "__" not in key:
            continue
        path = [p.lower() for p in key[len("BOOTSVC_") :].split("__")]
        try:
            value: Any = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(out, path, value)
    return out


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{source}: {loc}: {e['msg']}")
    return "\n".join(lines)


def from_mapping(
    tree: Mapping[str, Any], source: str = "<mapping>", env: Mapping[str, str] | None = None
) -> Config:
    data = _env_overrides(dict(tree), os.environ if env is None else env)
    data["source"] = source
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file (``None``: ``$BOOTSVC_CONFIG`` or the built-in defaults)."""
    environ = os.environ if env is None else env
    if path is None:
        path = environ.get("BOOTSVC_CONFIG")
    if path is None:
        return from_mapping({}, "<defaults>", environ)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: (top level): expected a mapping, got {type(tree).__name__}")
    return from_mapping(tree, str(p), environ)


def is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
