"""What the UI shows, decided without a request or a database: a state's health colour and words, the
progress steps of a node's flow, the actions a node offers (enabled, or disabled with the reason), and
how nodes sit in racks and slots. Pure: the routes in ``bootsvc.web.ui`` feed it nodes and render it."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bootsvc import operations
from bootsvc.models import Node
from bootsvc.states import ACTIVE_STATES, FAILED_STATES, State, Trigger, allowed_triggers

# ---------------------------------------------------------------------------- health (pure)

HEALTH_OK, HEALTH_BUSY, HEALTH_WAIT, HEALTH_FAIL, HEALTH_IDLE = "ok", "busy", "wait", "fail", "idle"
# Worst first, for a machine or a slot: a host waiting for its installing DPU is "in progress".
HEALTH_ORDER = (HEALTH_FAIL, HEALTH_BUSY, HEALTH_WAIT, HEALTH_IDLE, HEALTH_OK)
HEALTH_LABEL = {HEALTH_OK: "OK", HEALTH_BUSY: "IN PROGRESS", HEALTH_WAIT: "WAITING", HEALTH_FAIL: "FAILED",
                HEALTH_IDLE: "IDLE"}
HEALTH_ICON = {HEALTH_OK: "\u2714", HEALTH_BUSY: "\u21bb", HEALTH_WAIT: "\u25f7", HEALTH_FAIL: "\u2716",
               HEALTH_IDLE: "\u25cb"}
_GREEN = {State.DEPLOYED, State.POLICY_APPLIED, State.AVAILABLE}
_AMBER = {State.HOST_WAITING_DPU, State.MAINTENANCE}
_GREY = {State.REGISTERED, State.RETIRED}


def health(state: str) -> str:
    """Colour class of a state: green ok, blue busy, amber wait, red fail, grey idle."""
    try:
        st = State(state)
    except ValueError:
        return HEALTH_FAIL  # an unknown state is something a person must look at
    if st in FAILED_STATES:
        return HEALTH_FAIL
    if st in _GREEN:
        return HEALTH_OK
    if st in _AMBER:
        return HEALTH_WAIT
    if st in _GREY:
        return HEALTH_IDLE
    return HEALTH_BUSY if st in ACTIVE_STATES else HEALTH_IDLE


def worst(healths: Iterable[str]) -> str:
    hs = set(healths)
    return next((h for h in HEALTH_ORDER if h in hs), HEALTH_IDLE)


def state_text(state: str) -> str:
    return state.replace("_", " ").upper()


# The happy path of each kind, for the progress stepper on the machine page.
STEPS: dict[str, tuple[State, ...]] = {
    "dpu": (State.DPU_BOOTING, State.DPU_INSTALLING, State.DPU_REBOOTING, State.DPU_READY,
            State.POLICY_PENDING, State.POLICY_APPLIED),
    "host": (State.HOST_WAITING_DPU, State.HOST_BOOTING, State.HOST_INSTALLING, State.DEPLOYED),
}
STEP_LABEL = {State.DPU_BOOTING: "Boot", State.DPU_INSTALLING: "Install", State.DPU_REBOOTING: "Reboot",
              State.DPU_READY: "Agent up", State.POLICY_PENDING: "Policy sent",
              State.POLICY_APPLIED: "Policy applied", State.HOST_WAITING_DPU: "Wait for DPU",
              State.HOST_BOOTING: "Boot", State.HOST_INSTALLING: "Install", State.DEPLOYED: "Deployed"}


@dataclass(frozen=True)
class Step:
    label: str
    status: str  # done | current | todo | failed
    percent: int | None = None


# Which step of the happy path a failure state stopped at (shown red in the stepper).
FAILED_AT: dict[tuple[str, State], State] = {
    ("dpu", State.BMC_FAILED): State.DPU_BOOTING,
    ("dpu", State.DPU_INSTALL_FAILED): State.DPU_INSTALLING,
    ("dpu", State.POLICY_FAILED): State.POLICY_PENDING,
    ("host", State.BMC_FAILED): State.HOST_BOOTING,
    ("host", State.BLOCKED_BY_DPU): State.HOST_WAITING_DPU,
    ("host", State.HOST_INSTALL_FAILED): State.HOST_INSTALLING,
}


def progress_steps(kind: str, state: str, percent: int | None = None) -> list[Step]:
    """The happy path with done/current/failed marks; ``percent`` decorates the current step."""
    steps = STEPS.get(kind, ())
    try:
        failed_at = FAILED_AT.get((kind, State(state)))
    except ValueError:
        failed_at = None
    if failed_at is not None:
        i = steps.index(failed_at)
        return [Step(STEP_LABEL[s], "done" if j < i else "failed" if j == i else "todo")
                for j, s in enumerate(steps)]
    if state in steps:
        i = steps.index(State(state))
        cur = "done" if i == len(steps) - 1 else "current"
        return [Step(STEP_LABEL[s], "done" if j < i else cur if j == i else "todo",
                     percent if j == i and cur == "current" else None) for j, s in enumerate(steps)]
    return [Step(STEP_LABEL[s], "todo") for s in steps]


# ---------------------------------------------------------------------------- actions (pure)


@dataclass(frozen=True)
class ActionDef:
    key: str
    label: str
    warning: str  # what will happen, shown on the confirmation page
    trigger: Trigger | None = None
    power: operations.PowerAction | None = None
    primary: bool = True
    danger: bool = False


ACTIONS: dict[str, ActionDef] = {a.key: a for a in (
    ActionDef("provision", "Provision", "Starts provisioning: the conductor network-boots and installs it "
              "(for a host: its DPU first).", trigger=Trigger.PROVISION),
    ActionDef("retry", "Retry", "Retries the failed phase from its start.", trigger=Trigger.RETRY),
    ActionDef("reprovision", "Re-provision", "Starts over: the node is network-booted and installed again; "
              "what is on its disk will be overwritten.", trigger=Trigger.REPROVISION, danger=True),
    ActionDef("release", "Release", "Powers it off and wipes it; it goes back to available.",
              trigger=Trigger.RELEASE, danger=True),
    ActionDef("power_on", "Power on", "Powers the node on through its BMC.", power="on"),
    ActionDef("power_off", "Power off", "Cuts power at once through its BMC (no clean shutdown).",
              power="off", danger=True),
    ActionDef("power_cycle", "Power cycle", "Cuts power and turns it back on through its BMC.",
              power="cycle", danger=True),
    ActionDef("abort", "Abort", "Stops the flow in progress and puts the node in maintenance.",
              trigger=Trigger.ABORT, primary=False, danger=True),
    ActionDef("maintenance", "Maintenance", "Takes the node out of service: nothing acts on it until "
              "maintenance is done.", trigger=Trigger.MAINTENANCE, primary=False),
    ActionDef("maintenance_done", "End maintenance", "Returns the node to registered.",
              trigger=Trigger.MAINTENANCE_DONE, primary=False),
)}


@dataclass(frozen=True)
class ActionView:
    key: str
    label: str
    enabled: bool
    why: str  # why it is disabled (empty when enabled)
    danger: bool
    primary: bool


def actions_for(kind: str, state: str, *, has_bmc: bool, can_act: bool, role: str) -> list[ActionView]:
    """Every action the machine page shows for one node, enabled or disabled with the reason."""
    allowed = set(allowed_triggers(kind, state))
    out = []
    for a in ACTIONS.values():
        why = ""
        if a.trigger is not None and a.trigger not in allowed:
            continue  # state actions appear only where they apply: less to read under pressure
        if a.power is not None and not has_bmc:
            why = "no BMC address enrolled for this node"
        elif a.power is not None and state in ACTIVE_STATES:
            why = f"bootsvc drives its power while {state_text(state)}: abort first"
        if not why and not can_act:
            why = f"your token's role '{role}' is read-only in the UI"
        # On a machine that is up and serving (or being driven by bootsvc), "Power on" is not the main
        # thing a tech should reach for: it moves to the secondary row.
        primary = a.primary and not (a.key == "power_on" and state in RUNNING_STATES)
        out.append(ActionView(a.key, a.label, not why, why, a.danger, primary))
    return out


RUNNING_STATES: frozenset[str] = frozenset(
    {State.DPU_READY, State.POLICY_PENDING, State.POLICY_APPLIED, State.DEPLOYED}) | ACTIVE_STATES



@dataclass
class SlotView:
    rack: str
    slot: int | None
    host: Node | None
    dpus: list[Node] = field(default_factory=list)

    @property
    def nodes(self) -> list[Node]:
        return ([self.host] if self.host else []) + self.dpus

    @property
    def health(self) -> str:
        return worst(health(n.state) for n in self.nodes)

    @property
    def machine_id(self) -> int:
        return (self.host or self.dpus[0]).id


NO_RACK = "(no rack)"


def natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", text)]


def group_slots(nodes: Sequence[Node]) -> dict[str, list[SlotView]]:
    """Racks -> slots (top slot first, as the rack is seen from the front); a DPU sits with its host."""
    by_host: dict[int, SlotView] = {}
    slots: list[SlotView] = []
    for n in nodes:
        if n.kind == "host":
            sv = SlotView(n.rack or NO_RACK, n.slot, n)
            by_host[n.id] = sv
            slots.append(sv)
    for n in nodes:
        if n.kind == "dpu":
            if n.host_id is not None and n.host_id in by_host:
                by_host[n.host_id].dpus.append(n)
            else:
                slots.append(SlotView(n.rack or NO_RACK, n.slot, None, [n]))
    racks: dict[str, list[SlotView]] = defaultdict(list)
    for sv in slots:
        racks[sv.rack].append(sv)
    out: dict[str, list[SlotView]] = {}
    for rack in sorted(racks, key=lambda r: (r == NO_RACK, natural(r))):
        out[rack] = sorted(racks[rack], key=lambda s: (-(s.slot if s.slot is not None else -1),
                                                      s.nodes[0].name))
    return out
