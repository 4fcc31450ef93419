"""Node lifecycle: the states, the triggers and the ONE transition table for DPUs and hosts.

Owns: which (kind, state, trigger) moves a node where, which states are terminal, failed or
"active" (have a deadline), and the Mermaid drawing of the table. Pure: no I/O, no database.
``bootsvc.lifecycle.apply`` is the only code that acts on this table.

The mission's flow (a host and the BlueField DPU that fronts it):

DPU:  registered -> dpu_booting (one-time network boot + power on, or Redfish BFB push)
      -> dpu_installing (installer callbacks) -> dpu_rebooting (into DOCA, waiting for the agent)
      -> dpu_ready (agent checked in over Zone 0) -> policy_pending -> policy_applied
Host: registered -> host_waiting_dpu (until its DPU has applied the tenant policy)
      -> host_booting (one-time network boot + power on, through the DPU) -> host_installing
      -> deployed (in its tenant VRF)
Both: -> releasing (power off) -> wiping (the erase image PXE-boots, erases the disks and calls back
      ``done`` = WIPE_DONE or ``failed`` = WIPE_FAILED) -> available -> (provision again) ;
      failure states, maintenance, retired.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Kind = Literal["dpu", "host"]
KINDS: tuple[Kind, ...] = ("dpu", "host")


class State(StrEnum):
    REGISTERED = "registered"
    AVAILABLE = "available"
    # DPU flow
    DPU_BOOTING = "dpu_booting"
    DPU_INSTALLING = "dpu_installing"
    DPU_REBOOTING = "dpu_rebooting"
    DPU_READY = "dpu_ready"
    POLICY_PENDING = "policy_pending"
    POLICY_APPLIED = "policy_applied"
    # host flow
    HOST_WAITING_DPU = "host_waiting_dpu"
    HOST_BOOTING = "host_booting"
    HOST_INSTALLING = "host_installing"
    DEPLOYED = "deployed"
    # release
    RELEASING = "releasing"
    WIPING = "wiping"
    # failures (each carries last_error + hint on the node)
    BMC_FAILED = "bmc_failed"
    DPU_INSTALL_FAILED = "dpu_install_failed"
    POLICY_FAILED = "policy_failed"
    BLOCKED_BY_DPU = "blocked_by_dpu"
    HOST_INSTALL_FAILED = "host_install_failed"
    RELEASE_FAILED = "release_failed"
    # administrative
    MAINTENANCE = "maintenance"
    RETIRED = "retired"


class Trigger(StrEnum):
    PROVISION = "provision"
    INSTALL_STARTED = "install_started"
    INSTALL_PROGRESS = "install_progress"
    INSTALL_DONE = "install_done"
    INSTALL_FAILED = "install_failed"
    AGENT_CHECKIN = "agent_checkin"
    POLICY_SENT = "policy_sent"
    POLICY_APPLIED = "policy_applied"
    POLICY_FAILED = "policy_failed"
    DPU_READY = "dpu_ready"  # host: its DPU(s) applied the tenant policy
    DPU_FAILED = "dpu_failed"  # host: its DPU failed; the host must not boot
    BMC_ERROR = "bmc_error"
    TIMEOUT = "timeout"  # the state's deadline passed
    RETRY = "retry"  # a tech (or automation) retries from a failure state
    REPROVISION = "reprovision"
    RELEASE = "release"
    WIPE_STARTED = "wipe_started"
    WIPE_PROGRESS = "wipe_progress"  # the erase image reports (started, progress)
    WIPE_DONE = "wipe_done"
    WIPE_FAILED = "wipe_failed"  # the erase image could not erase a disk
    MAINTENANCE = "maintenance"
    MAINTENANCE_DONE = "maintenance_done"
    ABORT = "abort"
    RETIRE = "retire"


S, T = State, Trigger

# What people (CLI, UI, API, automation) may ask for; every other trigger comes from the service itself.
OPERATOR_TRIGGERS: frozenset[Trigger] = frozenset(
    {T.PROVISION, T.RELEASE, T.RETRY, T.REPROVISION, T.MAINTENANCE, T.MAINTENANCE_DONE, T.ABORT, T.RETIRE}
)

Guard = Literal["retries_left", "retries_exhausted"]


@dataclass(frozen=True, slots=True)
class Transition:
    kinds: tuple[Kind, ...]
    src: State
    trigger: Trigger
    dst: State
    guard: Guard | None = None


class IllegalTransition(Exception):
    """The trigger is not allowed from the node's current state."""

    def __init__(self, kind: str, state: str, trigger: str) -> None:
        kind, state, trigger = str(kind), str(state), str(trigger)
        # Name only what a tech can type (`bootsvc node <command>`, the UI buttons); the internal
        # triggers (timeout, dpu_ready, ...) are the service's business, not a suggestion.
        allowed = ", ".join(sorted({t.trigger.value.replace("_", "-") for t in TABLE
                                    if t.src == state and kind in t.kinds and t.trigger in OPERATOR_TRIGGERS}))
        super().__init__(
            f"{kind} in state {state!r} cannot take {trigger!r}"
            + (f" (commands allowed now: {allowed})" if allowed
               else " (no command applies now: the service is working on it or the node is retired)")
        )
        self.kind, self.state, self.trigger = kind, state, trigger


DPU: tuple[Kind, ...] = ("dpu",)
HOST: tuple[Kind, ...] = ("host",)
BOTH: tuple[Kind, ...] = ("dpu", "host")

# Where a failure from each active state lands when retries are exhausted.
_TIMEOUT_FAILURE: dict[State, State] = {
    S.DPU_BOOTING: S.DPU_INSTALL_FAILED,
    S.DPU_INSTALLING: S.DPU_INSTALL_FAILED,
    S.DPU_REBOOTING: S.DPU_INSTALL_FAILED,
    S.DPU_READY: S.POLICY_FAILED,
    S.POLICY_PENDING: S.POLICY_FAILED,
    S.HOST_WAITING_DPU: S.BLOCKED_BY_DPU,
    S.HOST_BOOTING: S.HOST_INSTALL_FAILED,
    S.HOST_INSTALLING: S.HOST_INSTALL_FAILED,
    S.RELEASING: S.RELEASE_FAILED,
    S.WIPING: S.RELEASE_FAILED,
}

ACTIVE_STATES: frozenset[State] = frozenset(_TIMEOUT_FAILURE)
FAILED_STATES: frozenset[State] = frozenset(
    {S.BMC_FAILED, S.DPU_INSTALL_FAILED, S.POLICY_FAILED, S.BLOCKED_BY_DPU, S.HOST_INSTALL_FAILED,
     S.RELEASE_FAILED}
)
TERMINAL_STATES: frozenset[State] = frozenset({S.RETIRED})
START_STATE: dict[Kind, State] = {"dpu": S.DPU_BOOTING, "host": S.HOST_WAITING_DPU}
# Resting states: nothing to do until someone asks.
STABLE_STATES: frozenset[State] = frozenset(
    {S.REGISTERED, S.AVAILABLE, S.POLICY_APPLIED, S.DEPLOYED, S.MAINTENANCE, S.RETIRED}
)


def _build() -> tuple[Transition, ...]:
    t: list[Transition] = []

    def add(kinds: tuple[Kind, ...], src: Iterable[State] | State, trig: Trigger, dst: State,
            guard: Guard | None = None) -> None:
        for s in [src] if isinstance(src, State) else src:
            for k in kinds:
                if _state_for(k, s) and _state_for(k, dst):
                    t.append(Transition((k,), s, trig, dst, guard))

    # -- DPU provisioning
    add(DPU, (S.REGISTERED, S.AVAILABLE), T.PROVISION, S.DPU_BOOTING)
    add(DPU, S.DPU_BOOTING, T.INSTALL_STARTED, S.DPU_INSTALLING)
    add(DPU, S.DPU_INSTALLING, T.INSTALL_PROGRESS, S.DPU_INSTALLING)
    add(DPU, (S.DPU_BOOTING, S.DPU_INSTALLING), T.INSTALL_DONE, S.DPU_REBOOTING)
    add(DPU, (S.DPU_BOOTING, S.DPU_INSTALLING, S.DPU_REBOOTING), T.INSTALL_FAILED, S.DPU_INSTALL_FAILED)
    # NVIDIA's BFB installer calls nobody back (bf.cfg hooks may, fail-soft): the agent's first check-in
    # from the OS it installed is also how a DPU leaves booting/installing. The agent API accepts it
    # there only with the install secret bf.cfg carried (bootsvc/web/agent_api.py), so an agent of the
    # OS being replaced cannot end an install it is not part of.
    add(DPU, (S.DPU_BOOTING, S.DPU_INSTALLING, S.DPU_REBOOTING), T.AGENT_CHECKIN, S.DPU_READY)
    add(DPU, S.DPU_READY, T.POLICY_SENT, S.POLICY_PENDING)
    add(DPU, S.POLICY_PENDING, T.POLICY_APPLIED, S.POLICY_APPLIED)
    add(DPU, (S.POLICY_PENDING, S.DPU_READY), T.POLICY_FAILED, S.POLICY_FAILED)
    add(DPU, S.POLICY_APPLIED, T.POLICY_SENT, S.POLICY_PENDING)  # tenant reassignment / new version
    add(DPU, S.POLICY_APPLIED, T.POLICY_FAILED, S.POLICY_FAILED)  # agent reports it lost the policy
    # -- host provisioning (a failed DPU blocks its host)
    add(HOST, (S.REGISTERED, S.AVAILABLE), T.PROVISION, S.HOST_WAITING_DPU)
    add(HOST, (S.HOST_WAITING_DPU, S.BLOCKED_BY_DPU), T.DPU_READY, S.HOST_BOOTING)
    add(HOST, (S.HOST_WAITING_DPU, S.HOST_BOOTING, S.HOST_INSTALLING), T.DPU_FAILED, S.BLOCKED_BY_DPU)
    add(HOST, S.HOST_BOOTING, T.INSTALL_STARTED, S.HOST_INSTALLING)
    add(HOST, S.HOST_INSTALLING, T.INSTALL_PROGRESS, S.HOST_INSTALLING)
    add(HOST, (S.HOST_BOOTING, S.HOST_INSTALLING), T.INSTALL_DONE, S.DEPLOYED)
    add(HOST, (S.HOST_BOOTING, S.HOST_INSTALLING), T.INSTALL_FAILED, S.HOST_INSTALL_FAILED)
    # -- BMC failures while the conductor drives power
    add(BOTH, (S.DPU_BOOTING, S.HOST_BOOTING), T.BMC_ERROR, S.BMC_FAILED)
    add(BOTH, (S.RELEASING, S.WIPING), T.BMC_ERROR, S.RELEASE_FAILED)
    # -- deadlines: retry in place while attempts remain, then the phase's failure state
    for src, failed in _TIMEOUT_FAILURE.items():
        kinds = DPU if src.value.startswith(("dpu_", "policy_")) else HOST if src.value.startswith(
            "host_") else BOTH
        add(kinds, src, T.TIMEOUT, src, "retries_left")
        add(kinds, src, T.TIMEOUT, failed, "retries_exhausted")
    # -- retry from failure: back to the start of the failed phase
    add(DPU, (S.DPU_INSTALL_FAILED, S.BMC_FAILED), T.RETRY, S.DPU_BOOTING)
    add(DPU, S.POLICY_FAILED, T.RETRY, S.DPU_READY)
    add(HOST, (S.HOST_INSTALL_FAILED, S.BMC_FAILED, S.BLOCKED_BY_DPU), T.RETRY, S.HOST_WAITING_DPU)
    add(BOTH, S.RELEASE_FAILED, T.RETRY, S.RELEASING)
    # -- re-provision: start over from a resting or failed state
    add(DPU, (S.POLICY_APPLIED, S.DPU_READY, *sorted(FAILED_STATES - {S.BLOCKED_BY_DPU})),
        T.REPROVISION, S.DPU_BOOTING)
    add(HOST, (S.DEPLOYED, *sorted(FAILED_STATES - {S.POLICY_FAILED, S.DPU_INSTALL_FAILED})),
        T.REPROVISION, S.HOST_WAITING_DPU)
    # -- release
    add(DPU, (S.POLICY_APPLIED, S.DPU_READY, S.POLICY_FAILED), T.RELEASE, S.RELEASING)
    add(HOST, (S.DEPLOYED, S.HOST_INSTALL_FAILED, S.BLOCKED_BY_DPU, S.HOST_WAITING_DPU), T.RELEASE,
        S.RELEASING)
    add(BOTH, S.RELEASING, T.WIPE_STARTED, S.WIPING)
    add(BOTH, S.WIPING, T.WIPE_PROGRESS, S.WIPING)
    add(BOTH, S.WIPING, T.WIPE_DONE, S.AVAILABLE)
    add(BOTH, S.WIPING, T.WIPE_FAILED, S.RELEASE_FAILED)
    # -- administrative: every non-terminal state can be aborted into maintenance
    add(BOTH, sorted(ACTIVE_STATES), T.ABORT, S.MAINTENANCE)
    add(BOTH, (S.REGISTERED, S.AVAILABLE, S.POLICY_APPLIED, S.DEPLOYED, *sorted(FAILED_STATES)),
        T.MAINTENANCE, S.MAINTENANCE)
    add(BOTH, S.MAINTENANCE, T.MAINTENANCE_DONE, S.REGISTERED)
    add(BOTH, (S.REGISTERED, S.AVAILABLE, S.MAINTENANCE, *sorted(FAILED_STATES)), T.RETIRE, S.RETIRED)
    return tuple(t)


_DPU_ONLY = {S.DPU_BOOTING, S.DPU_INSTALLING, S.DPU_REBOOTING, S.DPU_READY, S.POLICY_PENDING,
             S.POLICY_APPLIED, S.DPU_INSTALL_FAILED, S.POLICY_FAILED}
_HOST_ONLY = {S.HOST_WAITING_DPU, S.HOST_BOOTING, S.HOST_INSTALLING, S.DEPLOYED, S.BLOCKED_BY_DPU,
              S.HOST_INSTALL_FAILED}


def _state_for(kind: Kind, state: State) -> bool:
    return not ((kind == "dpu" and state in _HOST_ONLY) or (kind == "host" and state in _DPU_ONLY))


def states_for(kind: Kind) -> list[State]:
    return [s for s in State if _state_for(kind, s)]


TABLE: tuple[Transition, ...] = _build()

_INDEX: dict[tuple[str, State, Trigger], list[Transition]] = {}
for _t in TABLE:
    for _k in _t.kinds:
        _INDEX.setdefault((_k, _t.src, _t.trigger), []).append(_t)


def next_state(kind: str, state: str, trigger: str, *, attempts: int = 0, max_attempts: int = 3) -> State:
    """Where ``trigger`` takes a node of ``kind`` in ``state``; raises IllegalTransition.

    ``attempts`` counts retries already made in the current state (for the TIMEOUT guard).
    """
    try:
        st, tr = State(state), Trigger(trigger)
    except ValueError:
        raise IllegalTransition(kind, state, trigger) from None
    options = _INDEX.get((kind, st, tr))
    if not options:
        raise IllegalTransition(kind, state, trigger)
    for opt in options:
        if opt.guard is None:
            return opt.dst
        left = attempts + 1 < max_attempts
        if (opt.guard == "retries_left") == left:
            return opt.dst
    raise IllegalTransition(kind, state, trigger)  # pragma: no cover - guards are exhaustive


def allowed_triggers(kind: str, state: str) -> list[Trigger]:
    return sorted({t.trigger for t in TABLE if t.src == state and kind in t.kinds})


HINTS: dict[State, str] = {
    S.BMC_FAILED: "Check the BMC: is it reachable from bootsvc, are the credentials right "
                  "(`bootsvc bmc check NODE`)? Then retry.",
    S.DPU_INSTALL_FAILED: "Look at the DPU console (BMC SOL or rshim) and the installer events; check the "
                          "DOCA image exists and verifies. Then retry, or reprovision.",
    S.POLICY_FAILED: "The DPU agent could not apply the tenant policy: read its report in the events, "
                     "check the tenant's VRF/VNI settings. Then retry.",
    S.BLOCKED_BY_DPU: "This host waits for its DPU. Fix the DPU first (see its page); the host continues "
                      "by itself once the DPU has applied the tenant policy, or retry.",
    S.HOST_INSTALL_FAILED: "Look at the host console and installer events; check the tenant OS image and "
                           "that the DPU relays DHCP on the host port. Then retry.",
    S.RELEASE_FAILED: "Power-off or wipe did not finish: check the BMC, and for a wipe failure the erase "
                      "image's reason in the events (a disk that refuses writes may need replacing). "
                      "Then retry the release.",
}


HAPPY_PATH: frozenset[Trigger] = frozenset({
    T.PROVISION, T.INSTALL_STARTED, T.INSTALL_DONE, T.AGENT_CHECKIN, T.POLICY_SENT, T.POLICY_APPLIED, T.DPU_READY})


def mermaid(kind: Kind | None = None, *, happy_path: bool = False) -> str:
    """The transition table as a Mermaid state diagram (generated, never typed by hand).

    ``happy_path`` keeps only the mission's forward flow from ``registered`` (for the README).
    """
    lines = ["stateDiagram-v2"]
    seen: set[tuple[str, str, str]] = set()
    for t in TABLE:
        if kind is not None and kind not in t.kinds:
            continue
        if happy_path and (t.trigger not in HAPPY_PATH or t.src in (S.AVAILABLE, S.POLICY_APPLIED)
                           or t.src in FAILED_STATES or t.src == S.BLOCKED_BY_DPU):
            continue
        label = t.trigger.value + (f" [{t.guard}]" if t.guard else "")
        key = (t.src.value, t.dst.value, label)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"    {t.src.value} --> {t.dst.value}: {label}")
    lines.append(f"    [*] --> {S.REGISTERED.value}")
    if not happy_path:
        lines.append(f"    {S.RETIRED.value} --> [*]")
    return "\n".join(lines) + "\n"
