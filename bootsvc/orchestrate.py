"""The conductor's step logic: what to do next for one node, decided from facts alone.

Owns: ``decide(facts) -> Decision`` (the next step of the DPU-first, host-second flow), what a BMC
error or a finished BMC task means for the node (``on_bmc_error``, ``after_task``), backoff delays and
the per-state-entry action key that makes every BMC action happen once per state entry (or per
deadline retry). Pure: no I/O, no database, no clock (``facts.now`` is given). ``bootsvc.conductor``
gathers the facts, executes the decision (power driver, ``lifecycle.apply``) and records the outcome.

The flow (see ``bootsvc.states`` for the table):

DPU   dpu_booting      verify BMC, one-time network boot + power on (pxe) or Redfish BFB push (redfish)
      dpu_installing   installer runs (from here on a one-time boot override we set is cleared). Redfish
                       push: the BMC task covers only the *transfer* into the DPU's rshim boot device
                       (bluefield-real.md §3.6); then ``bmc_task`` becomes ``os-wait:<epoch>`` and the
                       conductor reads ``BootProgress.OemLastState`` until "OsIsRunning" (INSTALL_DONE)
                       or the agent checks in, within ``power.install_timeout`` (NVIDIA: 40 min)
      dpu_rebooting    DPU reboots into DOCA; wait for the policy agent's check-in (Zone 0). A deadline
                       retry hard-resets the Arm (ForceRestart), never a PowerCycle: on a BF3 that waits
                       for the host's PERST while the host runs (bluefieldbmcv2401 reset control)
      dpu_ready        hand the agent the tenant policy (POLICY_SENT)
      policy_pending   wait for the agent's "applied" report
      policy_applied   resting; a changed policy (tenant reassigned, peers changed) is re-sent
Host  host_waiting_dpu provision its DPUs if they rest; DPU_READY once all applied the policy,
                       DPU_FAILED as soon as one failed (a failed DPU blocks its host's boot)
      host_booting     verify BMC, one-time network boot + power on (through the DPU relay)
      host_installing  clear the boot override; wait for the installer's "done"
Both  releasing        power off, then WIPE_STARTED
      wiping           revoke the node secret, forget agent state, one-time network boot + power on: the
                       erase image (``bootsvc.render``: lab initramfs ``bootsvc.mode=wipe``) erases the
                       disks and calls back done (WIPE_DONE -> available) or failed (WIPE_FAILED)
      available        right after a wipe (our boot override still set): power off, clear the override,
                       rotate the node secret again (the erase image's token dies with the wipe)

A deadline retry (TIMEOUT with attempts left) changes the action key, so the step is redone — after
a backoff — e.g. the DPU is network-booted again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum

from bootsvc.states import ACTIVE_STATES, FAILED_STATES, State, Trigger, allowed_triggers

S, T = State, Trigger

# States the conductor looks at (everything else waits for an API call or a callback).
WORK_STATES: frozenset[State] = ACTIVE_STATES | {S.BLOCKED_BY_DPU, S.POLICY_APPLIED}

# DPU states that must stop its host: failures, or taken out of service by a person.
DPU_BLOCKING: frozenset[State] = (FAILED_STATES - {S.BLOCKED_BY_DPU}) | {S.MAINTENANCE, S.RETIRED}

_RESTING = frozenset({S.REGISTERED, S.AVAILABLE})

# States in which the one-time network boot has been consumed (the installer or the OS runs): a
# boot override still set must go, or a BMC that keeps it (Continuous: sushy, BlueField) would
# network-boot the node again at its next reboot.
BOOT_CONSUMED: frozenset[State] = frozenset({
    S.DPU_INSTALLING, S.DPU_REBOOTING, S.DPU_READY, S.POLICY_PENDING, S.POLICY_APPLIED, S.HOST_INSTALLING,
    S.DEPLOYED})

# States in which a boot override we set means "a wipe just finished": the erase image has called back
# done, the node needs its after-wipe step (FINISH_WIPE). Only WIPE_DONE leads into available.
AFTER_WIPE: frozenset[State] = frozenset({S.AVAILABLE})


class Op(StrEnum):
    WAIT = "wait"  # nothing to do now
    APPLY = "apply"  # apply ``trigger`` to this node
    BOOT_NETWORK = "boot_network"  # verify BMC, one-time network boot, power on (or reset if on)
    PUSH_BFB = "push_bfb"  # verify BMC, Redfish BFB push through the DPU BMC; follow the task
    POLL_TASK = "poll_task"  # read the BMC task we follow
    CLEAR_BOOT = "clear_boot"  # the one-time boot was consumed: drop a sticky override
    REBOOT = "reboot"  # restart (deadline retry while waiting for the DPU to come up; Arm reset on a DPU)
    POLL_OS = "poll_os"  # BFB transferred: read the DPU's BootProgress.OemLastState
    POWER_OFF = "power_off"  # release: hard power off
    WIPE = "wipe"  # release: revoke the node secret, forget agent state, network-boot the erase image
    FINISH_WIPE = "finish_wipe"  # after the erase: power off, clear the boot override, rotate the secret
    PROVISION_DPU = "provision_dpu"  # a host's DPU rests: start it (DPU first)
    SEND_POLICY = "send_policy"  # record the policy version handed out, apply POLICY_SENT


@dataclass(frozen=True, slots=True)
class DpuFacts:
    id: int
    name: str
    state: str
    last_error: str | None = None
    fabric: str | None = None  # why its fabric is not ready for the host (bootsvc.fabric); None: ready/ungated


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything ``decide`` may look at. Built by the conductor from one database read."""

    node_id: int
    name: str
    kind: str
    state: str
    now: dt.datetime
    attempts: int = 0
    deadline: dt.datetime | None = None
    state_since: dt.datetime | None = None
    action_key: str | None = None
    action_failures: int = 0
    next_check_at: dt.datetime | None = None
    bmc_task: str | None = None
    boot_override_set: bool = False  # we set a one-time network boot that may still be pending/sticky
    provision_method: str = "pxe"  # effective: node's, else site default
    dpus: tuple[DpuFacts, ...] = ()  # hosts: their DPUs
    tenant: str | None = None  # the node's tenant (hosts boot into its VRF)
    policy_version: str | None = None  # DPUs: version of the policy bootsvc wants on it
    policy_error: str | None = None  # DPUs: why no policy can be built (missing VTEP, network...)
    applied_version: str | None = None  # DPUs: what the agent last reported applied
    fabric_failed: str | None = None  # DPUs: the fabric gate's deadline passed while the host waits
    max_attempts: int = 3
    backoff_seconds: float = 10.0
    install_timeout: float = 2400.0  # Redfish push: transfer done -> DPU OS running (power.install_timeout)


@dataclass(frozen=True, slots=True)
class Decision:
    op: Op
    reason: str = ""
    trigger: Trigger | None = None  # Op.APPLY: the trigger; actions: applied after success
    key: str | None = None  # actions: recorded as node.action_key after success
    target_id: int | None = None  # Op.PROVISION_DPU: which DPU
    detail: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        out = self.op.value
        if self.trigger is not None:
            out += f"({self.trigger.value})" if self.op is Op.APPLY else f"->{self.trigger.value}"
        return out


OS_WAIT = "os-wait:"  # bmc_task while waiting for the DPU OS after a BFB transfer: "os-wait:<unix time>"


def os_wait_since(bmc_task: str | None) -> float | None:
    """When the BFB transfer ended, if the node waits for its DPU OS; else None."""
    if not bmc_task or not bmc_task.startswith(OS_WAIT):
        return None
    try:
        return float(bmc_task[len(OS_WAIT):])
    except ValueError:
        return 0.0  # unreadable: treat as long ago, so the timeout decides


def step_key(f: Facts) -> str:
    """Identity of one state entry (plus its deadline retries): an action keyed by it runs once."""
    since = int(f.state_since.timestamp() * 1_000_000) if f.state_since else 0
    return f"{f.state}:{f.attempts}:{since}"


def retry_delay(backoff: float, failures: int, cap: float = 600.0) -> float:
    """Exponential backoff: backoff, 2*backoff, 4*backoff ... capped."""
    return float(min(cap, backoff * (2 ** max(0, failures))))


def _boot_op(f: Facts, key: str, why: str) -> Decision:
    if f.kind == "dpu" and f.provision_method == "redfish":
        return Decision(Op.PUSH_BFB, why + ": Redfish BFB push", key=key)
    return Decision(Op.BOOT_NETWORK, why + ": one-time network boot + power on", key=key)


def _host(f: Facts, st: State) -> Decision | None:
    """A host's dependency on its DPUs (DPU first, then host)."""
    if st in (S.HOST_WAITING_DPU, S.HOST_BOOTING, S.HOST_INSTALLING):
        bad = [d for d in f.dpus if d.state in DPU_BLOCKING]
        if bad:
            d = bad[0]
            why = f"DPU {d.name} is {d.state}" + (f": {d.last_error}" if d.last_error else "")
            return Decision(Op.APPLY, why, trigger=T.DPU_FAILED, detail={"dpu": d.name})
    if st is S.HOST_WAITING_DPU:
        if f.dpus and f.tenant is None:
            # its DPU would isolate the host port: a host without a tenant has no network to boot on
            return Decision(Op.WAIT, "host has no tenant: assign one (PUT .../tenant)")
        if not f.dpus:
            return Decision(Op.APPLY, "host has no DPU: nothing to wait for", trigger=T.DPU_READY)
        if all(d.state == S.POLICY_APPLIED for d in f.dpus):
            if any(d.fabric for d in f.dpus):  # docs/fabric.md: the network must be real first
                return Decision(Op.WAIT, "waiting for the fabric: " + "; ".join(
                    f"{d.name}: {d.fabric}" for d in f.dpus if d.fabric))
            return Decision(Op.APPLY, "all DPUs applied the tenant policy", trigger=T.DPU_READY)
        resting = [d for d in f.dpus if d.state in _RESTING]
        if resting:
            return Decision(Op.PROVISION_DPU, f"DPU {resting[0].name} rests: provision it first",
                            target_id=resting[0].id)
        return Decision(Op.WAIT, "waiting for DPUs: " + ", ".join(f"{d.name}={d.state}" for d in f.dpus))
    if st is S.BLOCKED_BY_DPU:
        if f.dpus and all(d.state == S.POLICY_APPLIED and not d.fabric for d in f.dpus):
            return Decision(Op.APPLY, "DPUs recovered and applied the tenant policy", trigger=T.DPU_READY)
        return Decision(Op.WAIT, "blocked until the DPU is fixed")
    return None


def decide(f: Facts) -> Decision:
    """The next step for one node. Never raises for a well-formed ``Facts``."""
    try:
        st = State(f.state)
    except ValueError:
        return Decision(Op.WAIT, f"unknown state {f.state!r}")
    if f.boot_override_set and st in BOOT_CONSUMED and f.attempts == 0 and (
            f.next_check_at is None or f.now >= f.next_check_at):
        return Decision(Op.CLEAR_BOOT, "the one-time network boot is consumed: clear the override")
    if f.boot_override_set and st in AFTER_WIPE and (f.next_check_at is None or f.now >= f.next_check_at):
        return Decision(Op.FINISH_WIPE, "disks erased: power off, clear the boot override, rotate the node "
                                        "secret")
    if st not in WORK_STATES:
        return Decision(Op.WAIT, "resting state")
    # 1. deadlines first: a stuck node must not wait on anything else
    if st in ACTIVE_STATES and f.deadline is not None and f.now >= f.deadline:
        left = f.max_attempts - f.attempts - 1
        return Decision(Op.APPLY, f"deadline of {st.value} passed (attempt {f.attempts + 1} of "
                                  f"{f.max_attempts}; {'retrying' if left > 0 else 'giving up'})",
                        trigger=T.TIMEOUT)
    # 2. hosts follow their DPUs
    if f.kind == "host":
        d = _host(f, st)
        if d is not None:
            return d
    # 3. backoff after a BMC failure or a deadline retry
    if f.next_check_at is not None and f.now < f.next_check_at:
        return Decision(Op.WAIT, f"backing off until {f.next_check_at.isoformat(timespec='seconds')}")
    key = step_key(f)
    done = f.action_key == key
    if st in (S.DPU_BOOTING, S.HOST_BOOTING):
        if not done:
            return _boot_op(f, key, "start" if f.attempts == 0 else f"deadline retry {f.attempts}")
        if f.bmc_task and os_wait_since(f.bmc_task) is None:
            return Decision(Op.POLL_TASK, "following the BMC task " + f.bmc_task)
        return Decision(Op.WAIT, "waiting for the installer to call back")
    if st in (S.DPU_INSTALLING, S.HOST_INSTALLING):
        since = os_wait_since(f.bmc_task)
        if since is not None:
            waited = f.now.timestamp() - since
            if waited >= f.install_timeout:
                return Decision(Op.APPLY, f"the DPU OS is not running {waited / 60:.0f} min after the BFB transfer "
                                          f"(BootProgress.OemLastState never reached OsIsRunning, no agent "
                                          f"check-in)", trigger=T.INSTALL_FAILED)
            return Decision(Op.POLL_OS, f"BFB transferred {waited:.0f}s ago: waiting for the DPU OS")
        if f.bmc_task:
            return Decision(Op.POLL_TASK, "following the BMC task " + f.bmc_task)
        if not done and f.attempts > 0:  # the installer went quiet: boot it again
            return _boot_op(f, key, f"install stalled, deadline retry {f.attempts}")
        return Decision(Op.WAIT, "waiting for the installer to finish")
    if st is S.DPU_REBOOTING:
        if not done and f.attempts > 0:
            how = "hard-reset the Arm" if f.kind == "dpu" else "power-cycle"
            return Decision(Op.REBOOT, f"no agent check-in, deadline retry {f.attempts}: {how}", key=key)
        return Decision(Op.WAIT, "waiting for the policy agent to check in")
    if st is S.DPU_READY:
        if f.policy_error:
            return Decision(Op.APPLY, f"cannot build the tenant policy: {f.policy_error}",
                            trigger=T.POLICY_FAILED)
        if f.policy_version is None:
            return Decision(Op.WAIT, "no policy version yet")
        return Decision(Op.SEND_POLICY, f"hand the agent policy version {f.policy_version}",
                        trigger=T.POLICY_SENT, detail={"policy_version": f.policy_version})
    if st is S.POLICY_PENDING:
        return Decision(Op.WAIT, "waiting for the agent to report the policy applied")
    if st is S.POLICY_APPLIED:
        if f.fabric_failed:
            return Decision(Op.APPLY, f.fabric_failed, trigger=T.POLICY_FAILED)
        if f.policy_error:
            return Decision(Op.APPLY, f"the wanted policy cannot be built: {f.policy_error}",
                            trigger=T.POLICY_FAILED)
        if (f.policy_version is not None and f.applied_version is not None
                and f.policy_version != f.applied_version):
            return Decision(Op.SEND_POLICY, f"policy changed: wanted {f.policy_version}, agent runs "
                                            f"{f.applied_version}", trigger=T.POLICY_SENT,
                            detail={"policy_version": f.policy_version})
        return Decision(Op.WAIT, "policy in place")
    if st is S.RELEASING:
        if not done:
            return Decision(Op.POWER_OFF, "release: power off", trigger=T.WIPE_STARTED, key=key)
        return Decision(Op.APPLY, "powered off", trigger=T.WIPE_STARTED)
    if st is S.WIPING:
        # The erase itself runs on the node (the erase image); only its callback ends this state
        # (WIPE_DONE / WIPE_FAILED), or the deadline: retry = boot the erase image again.
        if not done:
            why = "erase" if f.attempts == 0 else f"erase image went quiet, deadline retry {f.attempts}"
            return Decision(Op.WIPE, why + ": revoke node secret, forget agent state, one-time network boot "
                                          "into the erase image + power on", key=key)
        return Decision(Op.WAIT, "waiting for the erase image to report done")
    return Decision(Op.WAIT, "nothing to do")


@dataclass(frozen=True, slots=True)
class ErrorOutcome:
    """What a failed BMC action does: back off and try again, or fail the node (``trigger``)."""

    failures: int
    retry_in: float | None  # seconds; None = no retry
    trigger: Trigger | None  # BMC_ERROR when the state has it; None = give up on this action only
    reason: str


def on_bmc_error(f: Facts, op: Op, retryable: bool, message: str) -> ErrorOutcome:
    failures = f.action_failures + 1
    if retryable and failures < f.max_attempts:
        return ErrorOutcome(failures, retry_delay(f.backoff_seconds, failures - 1), None,
                            f"{op.value} failed ({failures}/{f.max_attempts}), will retry: {message}")
    why = f"{op.value} failed{' ' + str(failures) + ' times' if retryable else ''}: {message}"
    if Trigger.BMC_ERROR in allowed_triggers(f.kind, f.state):
        return ErrorOutcome(failures, None, T.BMC_ERROR, why)
    # e.g. clearing a boot override while the installer runs: not worth failing the node for; the
    # state's deadline still guards progress.
    return ErrorOutcome(failures, None, None, why + " (the state's deadline still applies)")


def after_task(state: str, done: bool, ok: bool, percent: int | None, messages: tuple[str, ...]) -> \
        tuple[Trigger | None, str]:
    """What a polled BMC task (Redfish BFB push) means for a DPU in ``state``. A completed task is the
    end of the *transfer*, not of the install (bluefield-real.md §3.6): the DPU then installs and
    boots on its own; the conductor waits for its OS (``OS_WAIT``), it does not move on here."""
    text = "; ".join(m for m in messages if m) or "no message"
    if done and ok:
        if state == S.DPU_BOOTING:
            return T.INSTALL_STARTED, f"BFB transferred, the DPU installs it: {text}"
        return None, f"BFB transferred, the DPU installs it: {text}"
    if done:
        return T.INSTALL_FAILED, f"BMC task failed: {text}"
    if state == S.DPU_BOOTING:
        return T.INSTALL_STARTED, f"BMC task running ({percent if percent is not None else '?'}%)"
    return None, f"BMC task running ({percent if percent is not None else '?'}%)"
