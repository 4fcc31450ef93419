"""Power/firmware driver interface and the pure decisions every driver shares (no I/O here).

Owns: the `PowerDriver` protocol (power state; on / off / graceful off / reset / power cycle; one-time
boot to network or disk; firmware install returning a pollable task; BlueField DPU extras), the error
classes (`BmcError` -> `RetryableBmcError` / `FatalBmcError`), the value types drivers return, and the
small decision functions (which ResetType to send, how an HTTP status is classed, whether a boot
override read back from the BMC is what we asked for, whether a task is finished). Drivers do the I/O;
everything that can be decided without a BMC is decided here so it can be unit-tested.

Schema references are DMTF Redfish (DSP0268 Resource and Schema Guide: ComputerSystem, Task; DSP8010 schemas).

Why one module of ~520 lines: it is the vocabulary every driver (Redfish, fake) and every caller (the
conductor, the CLI, operations) shares, with no I/O and nothing else imported; split into errors,
values and decisions, each driver would import all three and each decision would sit away from the
values it decides on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import urlsplit

# --------------------------------------------------------------------------------------------------
# Errors


class BmcError(Exception):
    """A BMC operation failed. ``str(e)`` is one line a technician can act on.

    ``maybe_applied`` is True when the request may have reached the BMC and been carried out even
    though we saw no answer (read timeout, connection dropped after sending). Callers must re-read
    state rather than re-send such an action.
    """

    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, bmc: str = "", hint: str = "", status: int | None = None,
                 maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.bmc = bmc
        self.hint = hint
        self.status = status
        self.maybe_applied = maybe_applied

    def __str__(self) -> str:
        where = f"BMC {self.bmc}: " if self.bmc else ""
        hint = f" -> {self.hint}" if self.hint else ""
        return f"{where}{self.message}{hint}"


class RetryableBmcError(BmcError):
    """Transient: unreachable, timeout, busy (409/503), internal error (5xx), ETag race. Try later."""

    retryable = True


class BmcNoAnswer(RetryableBmcError):
    """The request was sent (or may have been) but no HTTP answer came: read timeout or dropped
    connection. ``dropped`` tells which; ``maybe_applied`` is True for anything but GET."""

    def __init__(self, message: str, *, dropped: bool, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.dropped = dropped


class FatalBmcError(BmcError):
    """Will not get better by retrying: bad credentials, unsupported action, BMC ignored a write."""

    retryable = False


# --------------------------------------------------------------------------------------------------
# Values


class PowerState(enum.StrEnum):
    """ComputerSystem.PowerState (Redfish); UNKNOWN when the BMC reports something else or nothing."""

    ON = "On"
    OFF = "Off"
    POWERING_ON = "PoweringOn"
    POWERING_OFF = "PoweringOff"
    PAUSED = "Paused"
    UNKNOWN = "Unknown"

    @classmethod
    def parse(cls, value: object) -> PowerState:
        for s in cls:
            if s.value == value:
                return s
        return cls.UNKNOWN


class PowerAction(enum.StrEnum):
    ON = "on"
    OFF = "off"
    GRACEFUL_OFF = "graceful-off"
    RESET = "reset"
    CYCLE = "cycle"
    DPU_CYCLE = "dpu-cycle"  # power cycle asked of a BMC that may be a DPU's (resolved by the driver)


class BootTarget(enum.StrEnum):
    """One-time boot targets bootsvc uses (values are Redfish BootSourceOverrideTarget names)."""

    PXE = "Pxe"
    HTTP = "UefiHttp"  # UEFI HTTP boot; needs a URI (Boot.HttpBootUri)
    DISK = "Hdd"
    NONE = "None"


class DpuMode(enum.StrEnum):
    DPU = "DpuMode"
    NIC = "NicMode"
    UNKNOWN = "Unknown"


@dataclass(frozen=True, slots=True)
class BootOverride:
    """The Boot override fields of a ComputerSystem (live or pending Settings)."""

    target: str | None
    enabled: str | None  # Disabled | Once | Continuous
    mode: str | None = None  # UEFI | Legacy
    uri: str | None = None  # HttpBootUri
    sticky: bool = False  # set by drivers: BMC kept it (Continuous) -> caller must clear after use
    pending: bool = False  # read from / written to a Settings resource (applies on next boot)

    @property
    def active(self) -> bool:
        # "" is what older BlueField firmware reports for unset fields (NVIDIA/libredfish
        # src/model/testdata/system_bluefield_boot_bugs.json): not an active override.
        return self.enabled not in (None, "", "Disabled") and self.target not in (None, "", "None")


@dataclass(frozen=True, slots=True)
class TaskHandle:
    """Where to poll a long-running BMC operation (Redfish Task resource or task monitor)."""

    uri: str
    bmc: str = ""
    description: str = ""


class TaskState(enum.StrEnum):
    NEW = "New"
    STARTING = "Starting"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    INTERRUPTED = "Interrupted"
    PENDING = "Pending"
    STOPPING = "Stopping"
    COMPLETED = "Completed"
    KILLED = "Killed"
    EXCEPTION = "Exception"
    SERVICE = "Service"
    CANCELLING = "Cancelling"
    CANCELLED = "Cancelled"
    UNKNOWN = "Unknown"

    @classmethod
    def parse(cls, value: object) -> TaskState:
        for s in cls:
            if s.value == value:
                return s
        return cls.UNKNOWN


_TASK_FAILED = frozenset({TaskState.KILLED, TaskState.EXCEPTION, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class TaskStatus:
    uri: str
    state: TaskState
    percent: int | None = None
    messages: tuple[str, ...] = ()
    task_status: str | None = None  # TaskStatus health: OK | Warning | Critical

    @property
    def done(self) -> bool:
        return self.state is TaskState.COMPLETED or self.state in _TASK_FAILED

    @property
    def ok(self) -> bool:
        return self.state is TaskState.COMPLETED and self.task_status in (None, "OK", "Warning")


@dataclass(frozen=True, slots=True)
class BmcInfo:
    """What `bmc check` shows: who the BMC says it is and how we talk to it."""

    address: str
    redfish_version: str | None
    vendor: str | None
    model: str | None
    firmware: str | None
    system_path: str
    manager_path: str | None
    auth: str  # "session" | "basic" | "none"
    quirks: tuple[str, ...]  # names of matched quirk rules
    power_state: PowerState
    quirk_flags: tuple[tuple[str, Any], ...] = ()  # effective non-default quirk flags
    kind: str = ""  # what the matched rules say this BMC is
    evidence: tuple[str, ...] = ()  # per matching rule: which identity fields matched which pattern
    dpu: DpuFacts | None = None  # BlueField DPU BMCs only


@dataclass(frozen=True, slots=True)
class DpuFacts:
    """What a BlueField BMC says about its DPU (Systems/Bluefield, its Oem/Nvidia and SecureBoot,
    UpdateService): shown by ``bmc check`` and the UI, checked before provisioning."""

    mode: DpuMode
    secure_boot: bool | None  # SecureBootEnable; None = not readable
    secure_boot_current: str | None  # SecureBootCurrentBoot (Enabled/Disabled)
    os_state: str | None  # BootProgress.OemLastState (OsIsRunning when the DPU OS runs)
    host_rshim: str | None  # Oem/Nvidia HostRshim
    bmc_rshim: bool | None  # Managers/<bmc>/Oem/Nvidia BmcRShim.BmcRShimEnabled
    firmware: str | None  # BMC FirmwareVersion (e.g. BF-24.10-10)
    os_version: str | None  # FirmwareInventory/DPU_OS Version
    http_push: bool  # SimpleUpdate takes HTTP (False: SCP-only firmware such as BF-23.10)
    update_protocols: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PowerSettings:
    """Driver knobs (site config `power:` section maps onto this)."""

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    ca_file: str | None = None  # PEM bundle for BMC certificates; None = system bundle
    max_sessions_per_bmc: int = 2  # BMCs cap concurrent sessions (often 4-16, shared with humans)
    slot_wait: float = 60.0  # how long to queue for a free per-BMC slot before giving up
    poll_interval: float = 0.5
    power_timeout: float = 120.0  # default wait for a power transition
    graceful_timeout: float = 60.0  # GracefulShutdown grace before ForceOff
    drop_grace: float = 20.0  # after a connection drop on a reset: how long to look for its effect
    # BlueField BFB push (bluefield-real.md §3)
    bfb_uri_scheme_firmware: tuple[str, ...] = ()  # BMC firmware globs whose ImageURI keeps http://
    update_wait: float = 600.0  # wait for UpdateService Enabled / a running update to end
    rshim_wait: float = 30.0  # wait for BmcRShimEnabled after enabling it (then toggle once)
    install_timeout: float = 2400.0  # transfer done -> OemLastState OsIsRunning (NVIDIA tools: 40 min)
    credentials: dict[str, str] = field(default_factory=dict)  # ref name -> "env:.."/"file:.."
    proxy: str | None = None  # HTTP proxy URL for BMC traffic; the environment's proxies are ignored
    # a System (or Settings) document read in the same session this recently, with nothing sent to the
    # BMC since, serves the next read of a step (power state, boot plan, pre-reset check); 0 = never
    doc_reuse_seconds: float = 2.0


# --------------------------------------------------------------------------------------------------
# Pure decisions

# Preferred ResetType per action, best first (DMTF DSP0268 ComputerSystem.ResetType). A BMC advertises
# the subset it supports in ResetType@Redfish.AllowableValues or its ActionInfo.
RESET_PREFERENCES: dict[PowerAction, tuple[str, ...]] = {
    PowerAction.ON: ("On", "ForceOn", "PushPowerButton"),
    PowerAction.OFF: ("ForceOff",),
    PowerAction.GRACEFUL_OFF: ("GracefulShutdown",),
    PowerAction.RESET: ("ForceRestart", "GracefulRestart", "PowerCycle"),
    PowerAction.CYCLE: ("PowerCycle", "FullPowerCycle", "ForceRestart"),
    PowerAction.DPU_CYCLE: ("PowerCycle", "FullPowerCycle", "ForceRestart"),
}

EXPECTED_STATE: dict[PowerAction, PowerState] = {
    PowerAction.ON: PowerState.ON,
    PowerAction.OFF: PowerState.OFF,
    PowerAction.GRACEFUL_OFF: PowerState.OFF,
    PowerAction.RESET: PowerState.ON,
    PowerAction.CYCLE: PowerState.ON,
    PowerAction.DPU_CYCLE: PowerState.ON,
}


def choose_reset_type(action: PowerAction, allowed: Sequence[str] | None, *, bmc: str = "") -> str:
    """The ResetType to POST for ``action`` given what the BMC advertises (None = not advertised)."""
    prefs = RESET_PREFERENCES[action]
    if not allowed:
        return prefs[0]
    for p in prefs:
        if p in allowed:
            return p
    raise FatalBmcError(
        f"BMC supports none of {list(prefs)} for '{action}' (it allows {list(allowed)})",
        bmc=bmc, hint="check the BMC firmware's ResetActionInfo; a quirk entry may be needed")


def error_for_status(status: int, *, bmc: str, what: str, detail: str = "",
                     retry_after: int | None = None, credential_ref: str = "") -> BmcError:
    """Class an HTTP error status of a Redfish call into a retryable or fatal BmcError."""
    msg = f"{what} failed: HTTP {status}" + (f" ({detail})" if detail else "")
    if status == 401:
        return FatalBmcError(msg, bmc=bmc, status=status,
                             hint=f"credentials rejected; check the BMC account and the secret behind "
                                  f"credential ref {credential_ref or '<unset>'} (account locked?)")
    if status == 403:
        return FatalBmcError(msg, bmc=bmc, status=status,
                             hint="the BMC account lacks the privilege for this (needs ConfigureComponents)")
    if status == 404:
        return FatalBmcError(msg, bmc=bmc, status=status,
                             hint="resource not on this BMC; wrong system id in bmc_address or missing quirk")
    if status in (405, 501):
        return FatalBmcError(msg, bmc=bmc, status=status, hint="this BMC firmware does not support it")
    if status == 409:
        return RetryableBmcError(msg, bmc=bmc, status=status,
                                 hint="another operation (e.g. a firmware update) is running; retry later")
    if status == 412:
        return RetryableBmcError(msg, bmc=bmc, status=status,
                                 hint="resource changed under us (ETag); retry the whole operation")
    if status == 428:
        return FatalBmcError(msg, bmc=bmc, status=status,
                             hint="BMC requires If-Match but gave no ETag; add a needs_if_match quirk")
    if status in (429, 503):
        after = f" after {retry_after}s" if retry_after else ""
        return RetryableBmcError(msg, bmc=bmc, status=status, hint=f"BMC busy; retry{after}")
    if status >= 500:
        return RetryableBmcError(msg, bmc=bmc, status=status,
                                 hint="BMC internal error; retry, and reset the BMC if it persists")
    return FatalBmcError(msg, bmc=bmc, status=status, hint="request rejected by the BMC; see detail")


ONCE_EQUIVALENT = frozenset({"Once", "Continuous"})


def check_boot_readback(asked: BootOverride, seen: BootOverride, *,
                        target_equivalents: frozenset[str] = frozenset()) -> str | None:
    """Compare a boot override we wrote with what the BMC reads back.

    Returns None if the write took effect, else a description of what the BMC ignored. A BMC that
    reports Continuous when Once was asked (sushy, BlueField) took the write; the driver marks the
    result ``sticky`` so the caller clears it after use (see `RedfishDriver.clear_boot_override`).
    ``target_equivalents``: targets the BMC documents as the same override (Supermicro reads a UEFI
    PXE override back as ``UefiBootNext``, NVIDIA/libredfish ``src/supermicro.rs``).
    """
    problems = []
    if asked.target is not None and seen.target != asked.target and seen.target not in target_equivalents:
        problems.append(f"BootSourceOverrideTarget reads {seen.target!r}, asked {asked.target!r}")
    if asked.enabled is not None and seen.enabled != asked.enabled and not (
            asked.enabled == "Once" and seen.enabled in ONCE_EQUIVALENT):
        problems.append(f"BootSourceOverrideEnabled reads {seen.enabled!r}, asked {asked.enabled!r}")
    if asked.mode is not None and seen.mode is not None and seen.mode != asked.mode:
        problems.append(f"BootSourceOverrideMode reads {seen.mode!r}, asked {asked.mode!r}")
    if asked.uri is not None and seen.uri != asked.uri:
        problems.append(f"HttpBootUri reads {seen.uri!r}, asked {asked.uri!r}")
    return "; ".join(problems) or None


def dpu_advice(f: DpuFacts, *, network_install: bool = False) -> tuple[str, ...]:
    """What stands between this DPU and a bootsvc install, one line each with the way out."""
    out: list[str] = []
    if f.mode is DpuMode.NIC:
        out.append("the DPU is in NIC mode: no agent can run on its Arm cores; switch it to DPU mode "
                   "(Mode.Set DpuMode, then two Arm reboots and a power cycle; bluefieldbmcv2510ltsu1) or "
                   "allow bootsvc to do it with power.dpu_mode_switch: true")
    elif f.mode is DpuMode.UNKNOWN:
        out.append("the BMC reports no DPU/NIC mode (BF-23.10 reports \"\"); bootsvc assumes DPU mode")
    if not f.http_push:
        out.append(f"BMC firmware {f.firmware or '?'} takes BFB pushes only by "
                   f"{'/'.join(f.update_protocols) or 'nothing'}: update the BMC firmware or use provision_method pxe")
    if network_install and f.secure_boot:
        out.append("UEFI Secure Boot is on: an unsigned network boot loader will not run (bluefieldbsp491); "
                   "allow bootsvc to turn it off with power.secure_boot_disable: true, or push the BFB "
                   "through the BMC (provision_method redfish)")
    return tuple(out)


BOOT_FIELDS = ("BootSourceOverrideTarget", "BootSourceOverrideEnabled", "BootSourceOverrideMode", "HttpBootUri")


def route_boot_fields(boot: dict[str, Any], settings_boot: dict[str, Any] | None) -> tuple[dict[str, Any],
                                                                                              dict[str, Any]]:
    """Split a Boot PATCH between the System (first) and its ``@Redfish.Settings`` object (second).

    A field goes to the Settings object when that object's ``Boot`` carries it, else to the System:
    the per-field rule of sushy (``sushy/resources/system/system.py`` ``set_system_boot_options``).
    The BlueField's Settings carries the override fields; Lenovo's ``Pending`` only ``BootOrder``.
    """
    if not settings_boot:
        return dict(boot), {}
    live = {k: v for k, v in boot.items() if k not in settings_boot}
    pending = {k: v for k, v in boot.items() if k in settings_boot}
    return live, pending


def check_allowed(field_name: str, value: str, doc_boot: dict[str, Any], where: str, *, bmc: str = "") -> None:
    """Refuse before the PATCH when ``value`` is not in the ``<field>@Redfish.AllowableValues`` of the
    object we are about to PATCH (DSP0266 §9.2.2 "allowable values"); no list = no check."""
    allowed = doc_boot.get(f"{field_name}@Redfish.AllowableValues")
    if isinstance(allowed, list) and allowed and value not in allowed:
        raise FatalBmcError(f"{where} does not allow {field_name} {value!r} (it allows {allowed})", bmc=bmc,
                            hint="pick one of the allowed values; nothing was sent")


def strong_etag(etag: str) -> str:
    """``W/"abc"`` -> ``"abc"``: If-Match uses the strong comparison (RFC 9110 §13.1.1), which a weak
    tag never passes; HPE iLO hands out weak tags (capture hpe-ilo5-dl385) and takes the strong form."""
    return etag[2:] if etag.startswith("W/") else etag


_IN_PROGRESS = ("update is in progress", "update in progress", "another update")


def update_in_progress(status: int, message: str) -> bool:
    """A SimpleUpdate refused because another update runs: wait and retry (dpu-update
    ``_update_in_progress_err_handler``; DPF ``submitAndMonitorBfbInstallTask``). Real BF3 firmware
    answers 400 with this message; 409/503 are the generic forms."""
    text = message.lower()
    return status in (400, 409, 503) and any(p in text for p in _IN_PROGRESS)


def transfer_protocols(allowable: Any) -> tuple[str, ...]:
    """``TransferProtocol@Redfish.AllowableValues`` flattened: BF-23.10 answers a nested list
    ``[["SCP"]]`` (bluefield-real.md §3.3), 24.10 a flat one."""
    out: list[str] = []
    todo = [allowable]
    while todo:
        v = todo.pop(0)
        if isinstance(v, list):
            todo[:0] = v
        elif isinstance(v, str):
            out.append(v.upper())
    return tuple(out)


def image_uri_for(url: str, *, with_scheme: bool) -> str:
    """The SimpleUpdate ImageURI: NVIDIA's BMC docs and tools send ``<host:port>/<path>`` with the
    protocol in TransferProtocol (nvbmc-docs BFB-fw-update-via-redfish-using-http-https.md; DPF strips
    ``http://``); standard Redfish (DSP0268 UpdateService) takes a full URI."""
    if with_scheme:
        return url
    u = urlsplit(url)
    return u.netloc + (u.path or "/") + (f"?{u.query}" if u.query else "")


@dataclass(frozen=True, slots=True)
class BmcAddress:
    """A parsed ``bmc_address``: ``host[:port]``, ``https://host[:port]`` or a full System URL.

    ``https://10.0.0.5/redfish/v1/Systems/Bluefield`` pins the System; without a path the driver uses
    the quirk's system id or the only member of /redfish/v1/Systems.
    """

    base_url: str
    system_path: str | None

    @property
    def key(self) -> str:
        """Identity for per-BMC limits: scheme://host:port."""
        return self.base_url

    @classmethod
    def parse(cls, text: str) -> BmcAddress:
        t = text.strip()
        if not t:
            raise FatalBmcError("empty bmc_address", hint="set the node's bmc_address")
        if "://" not in t:
            t = "https://" + t  # Redfish is HTTPS (DSP0266 §8.1); plain http only when spelled out
        u = urlsplit(t)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise FatalBmcError(f"bad bmc_address {text!r}", hint="use host, host:port or https://host/...")
        path = u.path.rstrip("/")
        system = path if path.startswith("/redfish/v1/Systems/") else None
        if path and system is None:
            raise FatalBmcError(f"bad bmc_address {text!r}: path must be /redfish/v1/Systems/<id>",
                                hint="drop the path or point it at a System")
        return cls(f"{u.scheme}://{u.netloc}", system)


# --------------------------------------------------------------------------------------------------
# Driver interface


@runtime_checkable
class PowerDriver(Protocol):
    """What bootsvc needs from a BMC. All waits are bounded: ``wait=0`` returns once the BMC accepted
    the request; ``wait>0`` polls until the expected state or raises RetryableBmcError at the deadline.
    """

    name: str
    address: str

    def info(self) -> BmcInfo: ...

    def power_state(self) -> PowerState: ...

    def power_on(self, *, wait: float = 0) -> None: ...

    def power_off(self, *, graceful: bool = False, wait: float = 0) -> None: ...

    def reset(self, *, wait: float = 0) -> None: ...

    def power_cycle(self, *, wait: float = 0, host_off: bool = False) -> None: ...

    def wait_power(self, state: PowerState, timeout: float) -> None: ...

    def boot_once(self, target: BootTarget, *, uri: str | None = None,
                  mode: str | None = None) -> BootOverride: ...

    def boot_override(self) -> BootOverride: ...

    def clear_boot_override(self) -> BootOverride: ...

    def firmware_install(self, image_uri: str, *, target: str = "DPU_OS") -> TaskHandle: ...

    def task_status(self, handle: TaskHandle) -> TaskStatus: ...

    def wait_task(self, handle: TaskHandle, timeout: float, *,
                  on_progress: Callable[[TaskStatus], None] | None = None) -> TaskStatus: ...

    def firmware_version(self, target: str = "DPU_OS") -> str | None: ...

    # BlueField-3 DPU BMC extras (other drivers raise FatalBmcError)
    def dpu_mode(self) -> DpuMode: ...

    def bmc_rshim(self) -> bool: ...

    def set_bmc_rshim(self, enabled: bool) -> None: ...

    def install_bfb(self, image_uri: str) -> TaskHandle: ...

    def dpu_facts(self) -> DpuFacts: ...

    def dpu_os_state(self) -> str | None: ...

    def set_dpu_mode(self, mode: DpuMode) -> None: ...

    def set_secure_boot(self, enabled: bool) -> None: ...
