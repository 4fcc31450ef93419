"""The conductor's pure step logic (bootsvc.orchestrate): facts in, decision out, no I/O."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from bootsvc import orchestrate
from bootsvc.orchestrate import DpuFacts, Facts, Op, decide, on_bmc_error, step_key
from bootsvc.states import ACTIVE_STATES, IllegalTransition, State, Trigger, next_state, states_for

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
SINCE = NOW - dt.timedelta(seconds=5)


def facts(state: State, kind: str = "dpu", **kw: object) -> Facts:
    base = Facts(node_id=7, name="n7", kind=kind, state=state.value, now=NOW, state_since=SINCE,
                 deadline=NOW + dt.timedelta(seconds=600), tenant="acme")
    return replace(base, **kw)  # type: ignore[arg-type]


def test_dpu_booting_pxe_boots_once_per_state_entry() -> None:
    f = facts(State.DPU_BOOTING)
    d = decide(f)
    assert d.op is Op.BOOT_NETWORK and d.key == step_key(f)
    # once the action key is recorded, the same state entry waits for the installer
    assert decide(replace(f, action_key=d.key)).op is Op.WAIT
    # a deadline retry (attempts+1) is a new key: boot again
    assert decide(replace(f, action_key=d.key, attempts=1)).op is Op.BOOT_NETWORK


def test_dpu_booting_redfish_pushes_bfb_and_follows_task() -> None:
    f = facts(State.DPU_BOOTING, provision_method="redfish")
    d = decide(f)
    assert d.op is Op.PUSH_BFB
    assert decide(replace(f, action_key=d.key, bmc_task="/redfish/v1/TaskService/Tasks/1")).op is Op.POLL_TASK


def test_host_never_boots_before_its_dpu_applied_the_policy() -> None:
    for st in (State.DPU_BOOTING, State.DPU_INSTALLING, State.DPU_REBOOTING, State.DPU_READY,
               State.POLICY_PENDING):
        d = decide(facts(State.HOST_WAITING_DPU, "host", dpus=(DpuFacts(1, "d", st.value),)))
        assert d.op is Op.WAIT, st
    d = decide(facts(State.HOST_WAITING_DPU, "host", dpus=(DpuFacts(1, "d", "policy_applied"),)))
    assert (d.op, d.trigger) == (Op.APPLY, Trigger.DPU_READY)
    # two DPUs: both must be applied
    two = (DpuFacts(1, "a", "policy_applied"), DpuFacts(2, "b", "policy_pending"))
    assert decide(facts(State.HOST_WAITING_DPU, "host", dpus=two)).op is Op.WAIT


def test_host_provisions_resting_dpu_first() -> None:
    d = decide(facts(State.HOST_WAITING_DPU, "host", tenant="acme", dpus=(DpuFacts(3, "d", "available"),)))
    assert d.op is Op.PROVISION_DPU and d.target_id == 3


def test_host_without_tenant_waits() -> None:
    d = decide(facts(State.HOST_WAITING_DPU, "host", tenant=None, dpus=(DpuFacts(3, "d", "policy_applied"),)))
    assert d.op is Op.WAIT and "tenant" in d.reason


@pytest.mark.parametrize("dpu_state", ["dpu_install_failed", "policy_failed", "bmc_failed", "maintenance"])
@pytest.mark.parametrize("host_state", [State.HOST_WAITING_DPU, State.HOST_BOOTING, State.HOST_INSTALLING])
def test_failed_dpu_blocks_host(dpu_state: str, host_state: State) -> None:
    d = decide(facts(host_state, "host", dpus=(DpuFacts(1, "d1", dpu_state, "disk error"),)))
    assert (d.op, d.trigger) == (Op.APPLY, Trigger.DPU_FAILED)
    assert "d1" in d.reason and dpu_state in d.reason and "disk error" in d.reason
    assert next_state("host", host_state, Trigger.DPU_FAILED) is State.BLOCKED_BY_DPU


def test_blocked_host_continues_when_dpu_recovers() -> None:
    f = facts(State.BLOCKED_BY_DPU, "host", deadline=None, dpus=(DpuFacts(1, "d", "policy_pending"),))
    assert decide(f).op is Op.WAIT
    d = decide(replace(f, dpus=(DpuFacts(1, "d", "policy_applied"),)))
    assert d.trigger is Trigger.DPU_READY


def test_deadline_first_even_with_work_pending() -> None:
    f = facts(State.DPU_BOOTING, deadline=NOW - dt.timedelta(seconds=1))
    d = decide(f)
    assert (d.op, d.trigger) == (Op.APPLY, Trigger.TIMEOUT)
    assert "retrying" in d.reason
    assert "giving up" in decide(replace(f, attempts=2)).reason


@pytest.mark.parametrize("st", sorted(ACTIVE_STATES))
def test_every_active_state_times_out(st: State) -> None:
    kind = "host" if st.value.startswith("host_") else "dpu"
    d = decide(facts(st, kind, deadline=NOW))
    assert d.trigger is Trigger.TIMEOUT
    assert next_state(kind, st, Trigger.TIMEOUT, attempts=0, max_attempts=3) == st  # retried in place
    assert next_state(kind, st, Trigger.TIMEOUT, attempts=2, max_attempts=3) != st  # then failure state


def test_backoff_holds_actions_but_not_deadlines() -> None:
    f = facts(State.DPU_BOOTING, next_check_at=NOW + dt.timedelta(seconds=30))
    assert decide(f).op is Op.WAIT
    assert decide(replace(f, deadline=NOW)).trigger is Trigger.TIMEOUT


def test_consumed_boot_override_is_cleared_in_any_later_state() -> None:
    for st, kind in ((State.DPU_INSTALLING, "dpu"), (State.DPU_REBOOTING, "dpu"), (State.POLICY_PENDING, "dpu"),
                     (State.HOST_INSTALLING, "host"), (State.DEPLOYED, "host")):
        assert decide(facts(st, kind, boot_override_set=True)).op is Op.CLEAR_BOOT, st
        assert decide(facts(st, kind, boot_override_set=False)).op is not Op.CLEAR_BOOT, st
    # still booting: the override is what we want
    assert decide(facts(State.DPU_BOOTING, boot_override_set=True)).op is Op.BOOT_NETWORK


def test_stalled_install_reboots_on_deadline_retry() -> None:
    assert decide(facts(State.DPU_INSTALLING)).op is Op.WAIT
    assert decide(facts(State.DPU_INSTALLING, attempts=1)).op is Op.BOOT_NETWORK
    assert decide(facts(State.DPU_REBOOTING)).op is Op.WAIT
    assert decide(facts(State.DPU_REBOOTING, attempts=1)).op is Op.REBOOT


def test_policy_sent_with_version_and_failed_without_site_settings() -> None:
    d = decide(facts(State.DPU_READY, policy_version="abc"))
    assert (d.op, d.trigger, d.detail["policy_version"]) == (Op.SEND_POLICY, Trigger.POLICY_SENT, "abc")
    d = decide(facts(State.DPU_READY, policy_error="no VTEP"))
    assert (d.trigger, "no VTEP" in d.reason) == (Trigger.POLICY_FAILED, True)


def test_policy_drift_is_resent_only_when_agent_runs_another_version() -> None:
    f = facts(State.POLICY_APPLIED, deadline=None, policy_version="v2", applied_version="v2")
    assert decide(f).op is Op.WAIT
    assert decide(replace(f, applied_version="v1")).op is Op.SEND_POLICY
    assert decide(replace(f, applied_version=None)).op is Op.WAIT  # never reported: nothing to compare


def test_release_then_wipe() -> None:
    f = facts(State.RELEASING, "host")
    d = decide(f)
    assert (d.op, d.trigger) == (Op.POWER_OFF, Trigger.WIPE_STARTED)
    assert decide(replace(f, action_key=d.key)).trigger is Trigger.WIPE_STARTED  # power-off done, apply lost
    assert decide(facts(State.WIPING, "host")).op is Op.WIPE


def test_wiping_boots_the_erase_image_once_then_waits_for_its_callback() -> None:
    f = facts(State.WIPING, "host")
    d = decide(f)
    # no trigger: only the erase image's "done"/"failed" callback (or the deadline) ends wiping
    assert (d.op, d.trigger, d.key) == (Op.WIPE, None, step_key(f))
    assert "erase image" in d.reason and "network boot" in d.reason
    waiting = decide(replace(f, action_key=d.key))
    assert waiting.op is Op.WAIT and "erase image" in waiting.reason
    # a progress callback is a self-transition: same state entry, same key, nothing redone
    assert decide(replace(f, action_key=d.key, now=NOW + dt.timedelta(seconds=30))).op is Op.WAIT


def test_wiping_deadline_retries_the_erase_boot_then_fails() -> None:
    f = facts(State.WIPING, "host", deadline=NOW - dt.timedelta(seconds=1))
    k = step_key(f)
    d = decide(replace(f, action_key=k))
    assert (d.op, d.trigger) == (Op.APPLY, Trigger.TIMEOUT) and "retrying" in d.reason
    assert next_state("host", "wiping", "timeout", attempts=0, max_attempts=3) is State.WIPING
    # retried in place (attempts=1, fresh deadline): a new key, so the erase image is booted again
    retry = replace(f, attempts=1, deadline=NOW + dt.timedelta(seconds=600), action_key=k)
    d = decide(retry)
    assert d.op is Op.WIPE and d.key != k and "deadline retry 1" in d.reason
    # ... after a backoff
    assert decide(replace(retry, next_check_at=NOW + dt.timedelta(seconds=5))).op is Op.WAIT
    last = replace(f, attempts=2, action_key="x")
    assert "giving up" in decide(last).reason
    assert next_state("host", "wiping", "timeout", attempts=2, max_attempts=3) is State.RELEASE_FAILED


def test_wipe_callbacks_in_the_transition_table() -> None:
    for kind in ("dpu", "host"):
        assert next_state(kind, "wiping", "wipe_progress") is State.WIPING
        assert next_state(kind, "wiping", "wipe_done") is State.AVAILABLE
        assert next_state(kind, "wiping", "wipe_failed") is State.RELEASE_FAILED
        assert next_state(kind, "release_failed", "retry") is State.RELEASING
        for st in ("releasing", "available", "deployed", "policy_applied", "host_installing"):
            for trig in ("wipe_done", "wipe_failed", "wipe_progress"):
                with pytest.raises(IllegalTransition):
                    next_state(kind, st, trig)


def test_after_the_wipe_the_conductor_powers_off_clears_and_rotates_once() -> None:
    f = facts(State.AVAILABLE, "host", deadline=None, boot_override_set=True)
    d = decide(f)
    assert d.op is Op.FINISH_WIPE and d.trigger is None
    assert decide(replace(f, boot_override_set=False)).op is Op.WAIT  # done (or never wiped): rests
    assert decide(replace(f, next_check_at=NOW + dt.timedelta(seconds=5))).op is Op.WAIT  # BMC backoff
    assert decide(replace(f, next_check_at=NOW - dt.timedelta(seconds=1))).op is Op.FINISH_WIPE
    # a BMC failure there cannot fail the node (available has no BMC_ERROR): retry, then give up only
    eo = on_bmc_error(f, Op.FINISH_WIPE, True, "timeout")
    assert eo.trigger is None and eo.retry_in is not None
    eo = on_bmc_error(replace(f, action_failures=2), Op.FINISH_WIPE, True, "timeout")
    assert (eo.trigger, eo.retry_in) == (None, None)
    # a BMC failure while booting the erase image fails the release
    assert on_bmc_error(facts(State.WIPING, "host"), Op.WIPE, False, "401").trigger is Trigger.BMC_ERROR
    # only the after-wipe state: a registered node with a leftover flag is not "finished"
    assert decide(facts(State.REGISTERED, "host", deadline=None, boot_override_set=True)).op is Op.WAIT
    assert {State.AVAILABLE} == orchestrate.AFTER_WIPE


def test_resting_states_do_nothing() -> None:
    for st in (State.REGISTERED, State.AVAILABLE, State.DEPLOYED, State.MAINTENANCE, State.RETIRED,
               State.DPU_INSTALL_FAILED):
        assert decide(facts(st, deadline=None)).op is Op.WAIT


def test_bmc_error_retries_with_backoff_then_fails_the_node() -> None:
    f = facts(State.DPU_BOOTING, backoff_seconds=10)
    out = on_bmc_error(f, Op.BOOT_NETWORK, True, "connection refused")
    assert (out.failures, out.retry_in, out.trigger) == (1, 10.0, None)
    out = on_bmc_error(replace(f, action_failures=1), Op.BOOT_NETWORK, True, "connection refused")
    assert out.retry_in == 20.0
    out = on_bmc_error(replace(f, action_failures=2), Op.BOOT_NETWORK, True, "connection refused")
    assert out.trigger is Trigger.BMC_ERROR and "3 times" in out.reason
    fatal = on_bmc_error(f, Op.BOOT_NETWORK, False, "401 bad credentials")
    assert fatal.trigger is Trigger.BMC_ERROR and "bad credentials" in fatal.reason
    # in a state without a BMC_ERROR transition the action is given up; the deadline still guards
    gone = on_bmc_error(facts(State.DPU_INSTALLING), Op.CLEAR_BOOT, False, "boom")
    assert gone.trigger is None and gone.retry_in is None


def test_after_task() -> None:
    assert orchestrate.after_task("dpu_booting", False, False, 10, ())[0] is Trigger.INSTALL_STARTED
    assert orchestrate.after_task("dpu_installing", False, False, 50, ())[0] is None
    # a completed task is the end of the transfer, not of the install (bluefield-real.md §3.6)
    assert orchestrate.after_task("dpu_installing", True, True, 100, ("ok",))[0] is None
    assert orchestrate.after_task("dpu_booting", True, True, 100, ("ok",))[0] is Trigger.INSTALL_STARTED
    trig, why = orchestrate.after_task("dpu_installing", True, False, 100, ("bad BFB",))
    assert trig is Trigger.INSTALL_FAILED and "bad BFB" in why


def test_every_decided_trigger_is_legal() -> None:
    """Whatever decide() applies must be in the transition table for that state."""
    dpus_sets = [(), (DpuFacts(1, "d", "policy_applied"),), (DpuFacts(1, "d", "bmc_failed"),),
                 (DpuFacts(1, "d", "registered"),)]
    for kind in ("dpu", "host"):
        for st in states_for(kind):  # type: ignore[arg-type]
            for dl in (None, NOW, NOW + dt.timedelta(seconds=5)):
                for dpus in dpus_sets if kind == "host" else [()]:
                    for key_done in (False, True):
                        f = facts(st, kind, deadline=dl, dpus=dpus, policy_version="v", applied_version="w")
                        if key_done:
                            f = replace(f, action_key=step_key(f))
                        d = decide(f)
                        if d.op is Op.APPLY or (d.trigger is not None and d.op is not Op.PROVISION_DPU):
                            assert d.trigger is not None
                            if d.op is Op.APPLY or d.op is Op.SEND_POLICY:
                                next_state(kind, st, d.trigger, attempts=0)  # raises if illegal


def test_os_wait_after_the_transfer_has_its_own_deadline() -> None:
    now = facts(State.DPU_INSTALLING).now
    f = replace(facts(State.DPU_INSTALLING), bmc_task=f"os-wait:{now.timestamp() - 60:.0f}", install_timeout=2400)
    d = decide(f)
    assert d.op is Op.POLL_OS and "60s ago" in d.reason
    late = replace(f, bmc_task=f"os-wait:{now.timestamp() - 2401:.0f}")
    d = decide(late)
    assert d.op is Op.APPLY and d.trigger is Trigger.INSTALL_FAILED and "OsIsRunning" in d.reason


def test_dpu_deadline_retry_resets_the_arm_not_a_power_cycle() -> None:
    d = decide(facts(State.DPU_REBOOTING, attempts=1))
    assert d.op is Op.REBOOT and "hard-reset the Arm" in d.reason
