"""The conductor's BMC steps: what one decided BMC operation does, through the node's power driver.

Owns: `BmcSteps`, a mixin of `bootsvc.conductor.Conductor` that carries out the BMC ops of
``bootsvc.orchestrate`` (network boot / BFB push / erase boot with power on, task and DPU OS polls,
clearing a consumed boot override, reboot, power off, finishing a wipe), the BlueField preflight
before a DPU install (mode and Secure Boot: bluefield-real.md §2, §5), and the one-time BFB URL.
Each step records what the BMC said as an event and books the outcome on the node; the conductor
claims the node, takes the power tokens and turns a `BmcError` into a backoff or a failure.
`StepError` is a step that cannot run for a reason other than the BMC (no image).

Write transactions (SQLite has one writer, and every write transaction queues for it): a step's notes
are kept in memory while its BMC calls go out and written with its bookkeeping in the step's one
transaction, the bookkeeping carried by the last note's row lock (``lifecycle.record(values=...)``:
one UPDATE, not two). Only what must be durable before a BMC call commits earlier: the ``~sent``
marker of a power-on from Off (with a DPU's preflight note in the same transaction) and a wipe's first
secret rotation. Notes taken before a BMC error are written, not lost, when the step fails.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from bootsvc import lifecycle, orchestrate
from bootsvc.config import Config
from bootsvc.models import AgentStatus, Node
from bootsvc.orchestrate import Decision, Facts, Op
from bootsvc.policy import PolicyBuildError
from bootsvc.power.base import BmcError, BootTarget, DpuMode, FatalBmcError, PowerDriver, PowerState, TaskHandle
from bootsvc.states import State, Trigger, allowed_triggers

log = logging.getLogger("bootsvc.conductor")

# How often a DPU whose BFB was transferred is asked for its OS state (BootProgress.OemLastState is
# refreshed about every 30 s, bluefield-real.md §3.6).
OS_POLL_SECONDS = 15.0


# action_key suffix booked just before a power-on from Off goes out; ``orchestrate.decide`` compares
# action_key with the step's key, so the marked step still reads "not done". A reset of a node that
# was already on cannot be told apart after a crash and stays at-least-once.
SENT = "~sent"
POWERED = frozenset({PowerState.ON, PowerState.POWERING_ON})

# A note of one step not yet written (its event trigger, detail, time): written with the step's next write.
Note = tuple[str, dict[str, Any], dt.datetime]

# Session.info keys of the claim hand-back: the conductor's ``step`` puts its name under RELEASE_CLAIM
# when the step gives its claim back at its end; the step's outcome (``_write``) then releases it in
# its row lock's UPDATE and says so under CLAIM_RELEASED (the node id), and ``step`` sends no UPDATE
# of its own for it. Without RELEASE_CLAIM nothing changes.
RELEASE_CLAIM = "bootsvc.conductor.release_claim"
CLAIM_RELEASED = "bootsvc.conductor.claim_released"


def aware(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes for timezone=True columns; they were written as UTC."""
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=dt.UTC)
    return t


class StepError(Exception):
    """A step that cannot run for a reason other than the BMC (e.g. no image): fail via ``trigger``."""

    def __init__(self, trigger: Trigger, reason: str) -> None:
        super().__init__(reason)
        self.trigger, self.reason = trigger, reason


class BmcSteps:
    """The BMC half of `bootsvc.conductor.Conductor` (which supplies what is declared here)."""

    config: Config
    clock: Callable[[], dt.datetime]
    actor: str

    def _driver(self, n: Node) -> PowerDriver:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def _apply(self, s: Session, n: Node, trigger: Trigger, reason: str, detail: dict[str, Any] | None = None,
               commit: bool = False) -> str:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def _book(self, s: Session, node_id: int, *, commit: bool = False,
              **values: Any) -> None:  # pragma: no cover - Conductor's
        raise NotImplementedError

    def _record(self, s: Session, n: Node, note: str, detail: dict[str, Any],
                commit: bool = False) -> None:  # pragma: no cover
        raise NotImplementedError

    def _noted(self, note: str, detail: dict[str, Any]) -> Note:
        return note, detail, self.clock()

    def _write(self, s: Session, n: Node, notes: list[Note], *, commit: bool = False, **values: Any) -> None:
        """The step's notes (events, in order) and its bookkeeping ``values`` (node columns) in the
        session's transaction: the values ride in the last note's row lock (one UPDATE less than a
        ``_book`` of their own); committed only if ``commit`` (else ``step``'s one commit does it,
        and the claim goes back in the same UPDATE when ``step`` asks for it: RELEASE_CLAIM)."""
        if not notes:
            if values:
                self._book(s, n.id, commit=commit, **values)
            elif commit:
                s.commit()
            return
        *first, (note, detail, at) = notes
        notes.clear()
        for nt, dt_, t in first:
            lifecycle.record(s, n, nt, actor=self.actor, detail=dt_, now=t, commit=False)
        claimant = None if commit else s.info.get(RELEASE_CLAIM)
        lifecycle.record(s, n, note, actor=self.actor, detail=detail, now=at, commit=commit, values=values or None,
                         release_claim=claimant)
        if claimant is not None:
            s.info[CLAIM_RELEASED] = n.id

    def _bfb_uri(self, n: Node) -> str:
        """A one-time URL for this node's BMC (`bootsvc.web.bfbpush`: the BFB + the node's bf.cfg)."""
        from bootsvc import auth_secrets, images
        from bootsvc.policy import boot_server
        from bootsvc.power import bfbtoken

        cat = images.load_catalog(self.config.resolve(self.config.images.catalog))
        img = cat.resolve(n.image, "dpu")
        f = img.file("bfb") if img is not None and cat.usable(img) else None
        if f is None:
            raise StepError(Trigger.INSTALL_FAILED, f"no usable BFB image for {n.image or 'the dpu default'} "
                                                    f"in {cat.source}")
        try:
            server = boot_server(self.config)
        except PolicyBuildError as e:
            raise StepError(Trigger.INSTALL_FAILED, str(e)) from None
        key = auth_secrets.read_ref(self.config.security.node_key_ref, create=True)
        token = bfbtoken.mint(key, n.id, bfbtoken.bmc_host(n.bmc_address or ""), now=self.clock().timestamp(),
                              ttl=self.config.power.bfb_url_ttl)
        return bfbtoken.push_url(f"http://{server}:{self.config.boot.http_port}", token, f.name)

    def _dpu_preflight(self, n: Node, drv: PowerDriver, notes: list[Note], *, network_install: bool) -> dict[str, Any]:
        """Mode and Secure Boot before provisioning a DPU (bluefield-real.md §2, §5). Returns what was
        seen for the event, adds its notes to ``notes``; raises StepError with the reason and the way
        out when it cannot go on."""
        try:
            facts = drv.dpu_facts()
        except FatalBmcError as e:
            if e.status == 404:  # not a BlueField BMC (lab emulators of other kinds): nothing to check
                return {}
            raise
        seen: dict[str, Any] = {"dpu_mode": facts.mode.value, "secure_boot": facts.secure_boot,
                                "bmc_firmware": facts.firmware}
        # what the BMC said, kept whatever follows (the UI machine page shows the latest): written with
        # the step's next write (``_bmc_step``), never holding the write lock across a BMC call
        notes.append(self._noted("dpu_checked", {**seen, "os_state": facts.os_state, "http_push": facts.http_push}))
        pc = self.config.power
        if facts.mode is DpuMode.NIC:
            if not pc.dpu_mode_switch:
                raise StepError(Trigger.BMC_ERROR if n.state == State.DPU_BOOTING else Trigger.INSTALL_FAILED,
                                "the DPU is in NIC mode: no agent can run on its Arm cores. Switch it to DPU "
                                "mode (Redfish Mode.Set DpuMode, two Arm reboots, a host power cycle) or set "
                                "power.dpu_mode_switch: true, then retry")
            # bluefieldbmcv2510ltsu1, modes of operation: Mode.Set, reboot the Arm twice, power-cycle.
            # The power cycle takes effect only when the host resets (bluefieldbmcv2401), so bootsvc does
            # the first part and asks for the host power cycle. [verify] on a real card.
            drv.set_dpu_mode(DpuMode.DPU)
            drv.reset()
            drv.reset()
            notes.append(self._noted("dpu_mode_set", {"from": "NicMode", "to": "DpuMode", "arm_resets": 2}))
            raise StepError(Trigger.BMC_ERROR, "DPU mode set (Mode.Set DpuMode, two Arm resets): power-cycle the "
                                               "host to finish the switch, then retry")
        if network_install and facts.secure_boot:
            if not pc.secure_boot_disable:
                raise StepError(Trigger.BMC_ERROR,
                                "UEFI Secure Boot is on: the unsigned network boot loader will not run. Set "
                                "power.secure_boot_disable: true to let bootsvc turn it off, or use "
                                "provision_method redfish (a BFB push through the BMC)")
            drv.set_secure_boot(False)
            seen["secure_boot_disabled"] = True
            log.info("node %s: UEFI Secure Boot turned off for a network install (power.secure_boot_disable)",
                     n.name)
        return seen

    def _erase_image(self) -> None:
        """Fail the wipe at once (WIPE_FAILED) when there is no erase image to boot: a node
        network-booted without one would only loop in the hold script until the deadline."""
        from bootsvc import images

        cat = images.load_catalog(self.config.resolve(self.config.images.catalog))
        img = cat.resolve(None, "wipe")
        if img is None or not cat.usable(img) or img.file("kernel") is None or img.file("initrd") is None:
            raise StepError(Trigger.WIPE_FAILED, f"no usable erase image (catalog defaults.wipe: a kernel + "
                                                 f"initrd) in {cat.source}")

    def _bmc_step(self, s: Session, n: Node, f: Facts, d: Decision) -> str:
        notes: list[Note] = []
        try:
            return self._bmc_op(s, n, f, d, notes)
        except (BmcError, StepError):
            if notes:
                # what the BMC said before the failure is kept (the conductor then rolls back and books
                # the failure in a transaction of its own): nothing else of this step is pending here,
                # every write before a BMC call is committed or is a note
                s.rollback()
                s.info.pop(CLAIM_RELEASED, None)
                self._write(s, s.get(Node, n.id) or n, notes, commit=True)
            raise

    def _bmc_op(self, s: Session, n: Node, f: Facts, d: Decision, notes: list[Note]) -> str:
        drv = self._driver(n)
        timeout = self.config.orchestration.power_timeout_seconds
        done: dict[str, Any] = {}
        if d.op is Op.WIPE:
            self._erase_image()
            if f.attempts == 0:
                # Revoke before anything boots: the installed OS/agent held a secret (and boot token)
                # derived from this generation; the erase image gets a token of the new one (rendered
                # when it asks for its script, so the rotation must be committed before power on).
                n.secret_generation += 1
                s.execute(delete(AgentStatus).where(AgentStatus.node_id == n.id))
                s.commit()
                done["secret_rotated"] = True
            done["purpose"] = "erase"
        if d.op in (Op.BOOT_NETWORK, Op.PUSH_BFB, Op.WIPE):
            before = drv.power_state()  # verifies the BMC answers and the credentials work
            done["power_before"] = before.value
            sent = f"{d.key}{SENT}" if d.key else None
            if sent and d.op is not Op.PUSH_BFB and n.action_key == sent and before in POWERED:
                # A conductor booked this power-on as about to go out, then stopped (killed, lost its
                # database) before booking it done. The node was off then and is on now: it went out.
                # Sending it again would reset a node that is already booting.
                done.update(power="on (sent by a conductor that stopped before booking it)")
                notes.append(self._noted("bmc_boot_network", done))
                self._write(s, n, notes, action_key=d.key, action_failures=0, next_check_at=None,
                            boot_override_set=True)
                return "power-on already sent by an earlier step; booked"
            if n.kind == "dpu" and d.op is not Op.WIPE:
                done.update(self._dpu_preflight(n, drv, notes, network_install=d.op is Op.BOOT_NETWORK))
            if d.op is Op.PUSH_BFB:
                uri = self._bfb_uri(n)
                task = drv.install_bfb(uri)
                # the URL carries a one-time token: the event names the image, never the token
                done.update(image=uri.rsplit("/", 1)[-1], task=task.uri)
                notes.append(self._noted("bmc_bfb_push", done))
                self._write(s, n, notes, action_key=d.key, action_failures=0, next_check_at=None,
                            bmc_task=task.uri)
                return f"BFB push started, task {task.uri}"
            if sent and before not in POWERED:
                # committed before anything is sent: a conductor taking this step over after a crash can
                # tell a power-on that went out (the node is on) from one that did not (still off). A
                # DPU's preflight note rides in the same transaction (one write lock, not two).
                self._write(s, n, notes, commit=True, action_key=sent)
            ov = drv.boot_once(BootTarget.PXE)
            done["boot_override"] = f"{ov.target}/{ov.enabled}"
            if before is PowerState.ON:
                drv.reset()
                done["power"] = "reset"
            else:
                drv.power_on()
                done["power"] = "on"
            notes.append(self._noted("bmc_boot_network", done))
            self._write(s, n, notes, action_key=d.key, action_failures=0, next_check_at=None, boot_override_set=True)
            return f"network boot set ({done['boot_override']}), power {done['power']}"
        if d.op is Op.POLL_TASK:
            assert f.bmc_task
            st = drv.task_status(TaskHandle(f.bmc_task, n.bmc_address or ""))
            trig, why = orchestrate.after_task(n.state, st.done, st.ok, st.percent, st.messages)
            out = why
            if trig is not None and trig in allowed_triggers(n.kind, n.state):
                out = self._apply(s, n, trig, why, {"task": f.bmc_task, "percent": st.percent})
            if st.done:
                # a finished transfer is not an installed DPU: wait for its OS (orchestrate.OS_WAIT);
                # booked after the transition, which clears bmc_task
                if st.ok and n.kind == "dpu":
                    # the install has its own deadline (power.install_timeout, checked by decide):
                    # the state's deadline (set by the transition on the loaded node) must not cut it short
                    until = self.clock() + dt.timedelta(seconds=self.config.power.install_timeout + 60)
                    cur = aware(n.deadline)
                    notes.append(self._noted("bfb_transferred", {"task": f.bmc_task, "percent": st.percent}))
                    self._write(s, n, notes, bmc_task=f"{orchestrate.OS_WAIT}{self.clock().timestamp():.0f}",
                                deadline=max(cur, until) if cur else until)
                else:
                    self._book(s, n.id, bmc_task=None)
            return out
        if d.op is Op.CLEAR_BOOT:
            ov = drv.clear_boot_override()
            notes.append(self._noted("bmc_clear_boot", {"boot_override": f"{ov.target}/{ov.enabled}"}))
            self._write(s, n, notes, action_failures=0, next_check_at=None, boot_override_set=False)
            return "boot override cleared"
        if d.op is Op.POLL_OS:
            os_state = drv.dpu_os_state()
            if os_state == "OsIsRunning":
                return self._apply(s, n, Trigger.INSTALL_DONE, "the DPU OS runs (BootProgress.OemLastState "
                                                               "OsIsRunning)", {"os_state": os_state})
            # OemLastState refreshes about every 30 s (bluefield-real.md §3.6): no need to ask every pass
            self._book(s, n.id, next_check_at=self.clock() + dt.timedelta(seconds=OS_POLL_SECONDS))
            return f"DPU OS state {os_state or 'unknown'}; asking again in {OS_POLL_SECONDS:g}s"
        if d.op is Op.REBOOT:
            drv.clear_boot_override()
            if n.kind == "dpu":
                # ForceRestart: a PowerCycle would wait for the host's PERST while the host runs
                drv.reset()
                notes.append(self._noted("bmc_reset", {"reset": "arm"}))
                self._write(s, n, notes, action_key=d.key, action_failures=0, next_check_at=None,
                            boot_override_set=False)
                return "Arm reset"
            drv.power_cycle()
            notes.append(self._noted("bmc_power_cycle", {}))
            self._write(s, n, notes, action_key=d.key, action_failures=0, next_check_at=None,
                        boot_override_set=False)
            return "power-cycled"
        if d.op is Op.POWER_OFF:
            drv.power_off(wait=timeout)
            notes.append(self._noted("bmc_power_off", {}))
            self._write(s, n, notes, action_key=d.key, action_failures=0, next_check_at=None)
            assert d.trigger is not None
            return "powered off; " + self._apply(s, n, d.trigger, d.reason)
        if d.op is Op.FINISH_WIPE:
            # The erase image powers the node off itself; make sure, then drop the (maybe sticky)
            # network boot so the next power-on boots what the next owner installs.
            if drv.power_state() is not PowerState.OFF:
                drv.power_off(wait=timeout)
                done["power"] = "off"
            ov = drv.clear_boot_override()
            done["boot_override"] = f"{ov.target}/{ov.enabled}"
            # the erase image's boot token (on its kernel command line, in its script) must not fetch
            # the next owner's bf.cfg: rotate once more (flushed by the note's write: the rotation, the
            # event and the bookkeeping commit together, after the last BMC call)
            n.secret_generation += 1
            done["secret_rotated"] = True
            notes.append(self._noted("wipe_finished", done))
            self._write(s, n, notes, action_failures=0, next_check_at=None, boot_override_set=False)
            return "wipe finished: powered off, boot override cleared, secret rotated"
        raise AssertionError(f"unhandled op {d.op}")  # pragma: no cover
