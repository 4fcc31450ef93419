"""The transition table: reachability, escape paths, guards, illegal transitions, the diagram."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from bootsvc import states
from bootsvc.states import FAILED_STATES, KINDS, TABLE, IllegalTransition, State, Trigger, next_state


def reachable(kind: str) -> set[State]:
    seen = {State.REGISTERED}
    todo = deque([State.REGISTERED])
    while todo:
        s = todo.popleft()
        for t in TABLE:
            if kind in t.kinds and t.src == s and t.dst not in seen:
                seen.add(t.dst)
                todo.append(t.dst)
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_every_state_of_the_kind_is_reachable_from_registered(kind: str) -> None:
    assert reachable(kind) == set(states.states_for(kind))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_every_non_terminal_state_has_a_failure_or_abort_path(kind: str) -> None:
    escapes = FAILED_STATES | {State.MAINTENANCE, State.RETIRED}
    for s in states.states_for(kind):  # type: ignore[arg-type]
        if s in states.TERMINAL_STATES:
            assert not [t for t in TABLE if t.src == s], f"{s} is terminal but has exits"
            continue
        exits = {t.dst for t in TABLE if kind in t.kinds and t.src == s}
        assert exits & escapes, f"{kind} state {s} has no failure/abort path (exits: {exits})"


@pytest.mark.parametrize("kind", KINDS)
def test_every_active_state_times_out_into_retry_then_failure(kind: str) -> None:
    for s in states.ACTIVE_STATES & set(states.states_for(kind)):  # type: ignore[arg-type]
        assert next_state(kind, s, Trigger.TIMEOUT, attempts=0, max_attempts=3) == s
        assert next_state(kind, s, Trigger.TIMEOUT, attempts=1, max_attempts=3) == s
        failed = next_state(kind, s, Trigger.TIMEOUT, attempts=2, max_attempts=3)
        assert failed in FAILED_STATES
        # ...and a retry from there leads back into the flow
        back = next_state(kind, failed, Trigger.RETRY)
        assert back in states.ACTIVE_STATES


def test_mission_flow_dpu_then_host() -> None:
    dpu = [(Trigger.PROVISION, State.DPU_BOOTING), (Trigger.INSTALL_STARTED, State.DPU_INSTALLING),
           (Trigger.INSTALL_PROGRESS, State.DPU_INSTALLING), (Trigger.INSTALL_DONE, State.DPU_REBOOTING),
           (Trigger.AGENT_CHECKIN, State.DPU_READY), (Trigger.POLICY_SENT, State.POLICY_PENDING),
           (Trigger.POLICY_APPLIED, State.POLICY_APPLIED), (Trigger.RELEASE, State.RELEASING),
           (Trigger.WIPE_STARTED, State.WIPING), (Trigger.WIPE_DONE, State.AVAILABLE),
           (Trigger.PROVISION, State.DPU_BOOTING)]
    host = [(Trigger.PROVISION, State.HOST_WAITING_DPU), (Trigger.DPU_READY, State.HOST_BOOTING),
            (Trigger.INSTALL_STARTED, State.HOST_INSTALLING), (Trigger.INSTALL_DONE, State.DEPLOYED),
            (Trigger.RELEASE, State.RELEASING), (Trigger.WIPE_STARTED, State.WIPING),
            (Trigger.WIPE_DONE, State.AVAILABLE)]
    for kind, steps in (("dpu", dpu), ("host", host)):
        s = State.REGISTERED
        for trig, want in steps:
            s = next_state(kind, s, trig)
            assert s == want, (kind, trig)


@pytest.mark.parametrize(
    ("kind", "state", "trigger"),
    [("host", "registered", "agent_checkin"), ("dpu", "registered", "install_done"),
     ("dpu", "retired", "provision"), ("host", "deployed", "provision"), ("dpu", "dpu_booting", "dpu_ready"),
     ("host", "registered", "nonsense"), ("dpu", "not-a-state", "provision")])
def test_illegal_transitions_are_rejected_with_a_clear_error(kind: str, state: str, trigger: str) -> None:
    with pytest.raises(IllegalTransition) as e:
        next_state(kind, state, trigger)
    msg = str(e.value)
    assert kind in msg and state in msg and trigger in msg
    assert "<" not in msg  # plain values, not enum reprs


def test_failed_dpu_blocks_its_host() -> None:
    assert next_state("host", "host_waiting_dpu", "dpu_failed") == State.BLOCKED_BY_DPU
    with pytest.raises(IllegalTransition):
        next_state("host", "blocked_by_dpu", "install_started")
    assert next_state("host", "blocked_by_dpu", "dpu_ready") == State.HOST_BOOTING


def test_every_failure_state_has_a_hint() -> None:
    assert set(states.HINTS) == set(FAILED_STATES)


def test_docs_diagrams_are_generated_from_the_table() -> None:
    from bootsvc import docs

    root = Path(__file__).resolve().parents[2]
    assert (root / "docs" / "lifecycle.md").read_text() == docs.lifecycle_md(), "stale: run `make docs`"
    readme = (root / "README.md").read_text()
    assert docs.readme(readme) == readme and states.mermaid(happy_path=True) in readme, "stale: run `make docs`"


@pytest.mark.parametrize("src", [State.DPU_BOOTING, State.DPU_INSTALLING, State.DPU_REBOOTING])
def test_an_installer_that_reported_nothing_still_finishes(src: State) -> None:
    """NVIDIA's installer never calls back: the agent's first check-in ends the install from any phase."""
    assert next_state("dpu", src, Trigger.AGENT_CHECKIN) == State.DPU_READY
