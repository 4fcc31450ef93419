"""In-memory `PowerDriver` for fast tests of code that drives BMCs (conductor, CLI, web).

Owns: `FakePowerDriver` - power transitions that complete after a configurable delay (on an
injectable clock, so tests need not sleep), one-time boot overrides (optionally kept as Continuous
like sushy/BlueField), firmware tasks that progress with time, DPU mode / BMC RShim, injected faults
(`fail(op, error, times)`) and per-operation call counts (`calls`); plus a process-wide registry
(`fake_for(address)`) so `driver_for()` hands the same fake to every caller of one address.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from bootsvc.power.base import (
    EXPECTED_STATE,
    BmcError,
    BmcInfo,
    BootOverride,
    BootTarget,
    DpuFacts,
    DpuMode,
    FatalBmcError,
    PowerAction,
    PowerState,
    RetryableBmcError,
    TaskHandle,
    TaskState,
    TaskStatus,
)


@dataclass
class _Task:
    uri: str
    target: str
    image_uri: str
    started: float
    fail_with: str | None = None


class FakePowerDriver:
    name = "fake"

    def __init__(self, address: str = "fake://node", *, power_delay: float = 0.0,
                 initial: PowerState = PowerState.OFF, ignores_once: bool = False, dpu: bool = True,
                 task_duration: float = 0.0, install_duration: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.address = address
        self.power_delay = power_delay
        self.ignores_once = ignores_once
        self.dpu = dpu
        self.task_duration = task_duration
        self.install_duration = install_duration
        self.os_state: str | None = None  # BootProgress.OemLastState override for tests
        self.secure_boot: bool | None = False
        self.clock = clock
        self.sleep = sleep
        self.calls: Counter[str] = Counter()
        self.resets: list[str] = []  # reset types "sent", in order
        self.mode = DpuMode.DPU
        self.rshim = False
        self.versions: dict[str, str] = {"DPU_OS": "fake-os-1"}
        self.boot = BootOverride(target="None", enabled="Disabled", mode="UEFI")
        self._state = initial
        self._pending: tuple[PowerState, float] | None = None
        self._faults: dict[str, list[BmcError]] = {}
        self._tasks: dict[str, _Task] = {}
        self._task_failure: str | None = None
        self._lock = threading.RLock()

    # -- test controls ----------------------------------------------------------------------------
    def fail(self, op: str, error: BmcError, times: int = 1) -> None:
        """Make the next ``times`` calls of ``op`` (method name, or "*") raise ``error``."""
        with self._lock:
            self._faults.setdefault(op, []).extend([error] * times)

    def fail_next_task(self, message: str) -> None:
        with self._lock:
            self._task_failure = message

    def _enter(self, op: str) -> None:
        with self._lock:
            self.calls[op] += 1
            for key in (op, "*"):
                q = self._faults.get(key)
                if q:
                    raise q.pop(0)

    # -- power ------------------------------------------------------------------------------------
    def _current(self) -> PowerState:
        with self._lock:
            if self._pending and self.clock() >= self._pending[1]:
                self._state, self._pending = self._pending[0], None
            return self._state

    def info(self) -> BmcInfo:
        self._enter("info")
        return BmcInfo(address=self.address, redfish_version="1.15.0", vendor="Fake", model="FakeBMC",
                       firmware="0", system_path="/redfish/v1/Systems/fake", manager_path=None, auth="none",
                       quirks=("fake",), power_state=self._current())

    def power_state(self) -> PowerState:
        self._enter("power_state")
        return self._current()

    def _act(self, action: PowerAction, wait: float) -> None:
        with self._lock:
            cur = self._current()
            target = EXPECTED_STATE[action]
            if action in (PowerAction.RESET, PowerAction.CYCLE):
                self._state = PowerState.OFF  # observable dip, like sushy's fake driver
            if action in (PowerAction.RESET, PowerAction.CYCLE) or cur is not target:
                self._pending = (target, self.clock() + self.power_delay)
                if self.boot.enabled == "Once" and not self.ignores_once and target is PowerState.ON:
                    self.boot = BootOverride(target="None", enabled="Disabled", mode=self.boot.mode)
            self.resets.append(action.value)
        if wait:
            self._wait(target, wait)

    def power_on(self, *, wait: float = 0) -> None:
        self._enter("power_on")
        self._act(PowerAction.ON, wait)

    def power_off(self, *, graceful: bool = False, wait: float = 0) -> None:
        self._enter("power_off")
        self._act(PowerAction.GRACEFUL_OFF if graceful else PowerAction.OFF, wait)

    def reset(self, *, wait: float = 0) -> None:
        self._enter("reset")
        self._act(PowerAction.RESET, wait)

    def power_cycle(self, *, wait: float = 0, host_off: bool = False) -> None:
        self._enter("power_cycle")
        self._act(PowerAction.CYCLE, wait)

    def _wait(self, state: PowerState, timeout: float) -> None:
        deadline = self.clock() + timeout
        while self._current() is not state:
            if self.clock() >= deadline:
                raise RetryableBmcError(f"PowerState is {self._current()}, not {state}, after {timeout:g}s",
                                        bmc=self.address)
            self.sleep(min(0.05, max(0.0, deadline - self.clock())))

    def wait_power(self, state: PowerState, timeout: float) -> None:
        self._enter("wait_power")
        self._wait(state, timeout)

    # -- boot -------------------------------------------------------------------------------------
    def boot_once(self, target: BootTarget, *, uri: str | None = None,
                  mode: str | None = None) -> BootOverride:
        self._enter("boot_once")
        if target is BootTarget.HTTP and not uri:
            raise FatalBmcError("UEFI HTTP boot needs a URI", bmc=self.address)
        with self._lock:
            enabled = "Continuous" if self.ignores_once else "Once"
            self.boot = BootOverride(target=target.value, enabled=enabled, mode=mode or self.boot.mode,
                                     uri=uri, sticky=self.ignores_once)
            return self.boot

    def boot_override(self) -> BootOverride:
        self._enter("boot_override")
        return self.boot

    def clear_boot_override(self) -> BootOverride:
        self._enter("clear_boot_override")
        with self._lock:
            self.boot = BootOverride(target="None", enabled="Disabled", mode=self.boot.mode)
            return self.boot

    # -- firmware ---------------------------------------------------------------------------------
    def firmware_install(self, image_uri: str, *, target: str = "DPU_OS") -> TaskHandle:
        self._enter("firmware_install")
        with self._lock:
            uri = f"/redfish/v1/TaskService/Tasks/{len(self._tasks) + 1}"
            self._tasks[uri] = _Task(uri, target, image_uri, self.clock(), self._task_failure)
            self._task_failure = None
            return TaskHandle(uri, self.address, f"SimpleUpdate {target} from {image_uri}")

    def task_status(self, handle: TaskHandle) -> TaskStatus:
        self._enter("task_status")
        with self._lock:
            t = self._tasks.get(handle.uri)
            if t is None:
                raise FatalBmcError(f"no task {handle.uri}", bmc=self.address, status=404)
            frac = 1.0 if self.task_duration <= 0 else min(1.0, (self.clock() - t.started) / self.task_duration)
            if frac < 1.0:
                return TaskStatus(t.uri, TaskState.RUNNING, int(frac * 100), (f"Transfer is {int(frac * 100)}%",))
            if t.fail_with:
                return TaskStatus(t.uri, TaskState.EXCEPTION, 100, (t.fail_with,), "Critical")
            self.versions[t.target] = t.image_uri.rsplit("/", 1)[-1]
            return TaskStatus(t.uri, TaskState.COMPLETED, 100, ("Task completed",), "OK")

    def wait_task(self, handle: TaskHandle, timeout: float, *,
                  on_progress: Callable[[TaskStatus], None] | None = None) -> TaskStatus:
        deadline = self.clock() + timeout
        last: TaskStatus | None = None
        while True:
            st = self.task_status(handle)
            if on_progress and st != last:
                on_progress(st)
            last = st
            if st.done:
                if st.ok:
                    return st
                raise FatalBmcError(f"task {handle.uri} ended {st.state}: {'; '.join(st.messages)}",
                                    bmc=self.address)
            if self.clock() >= deadline:
                raise RetryableBmcError(f"task {handle.uri} still {st.state} after {timeout:g}s",
                                        bmc=self.address, maybe_applied=True)
            self.sleep(min(0.05, max(0.0, deadline - self.clock())))

    def firmware_version(self, target: str = "DPU_OS") -> str | None:
        self._enter("firmware_version")
        return self.versions.get(target)

    # -- DPU --------------------------------------------------------------------------------------
    def _need_dpu(self, what: str) -> None:
        if not self.dpu:
            raise FatalBmcError(f"{what}: not a BlueField DPU BMC", bmc=self.address, status=404)

    def dpu_mode(self) -> DpuMode:
        self._enter("dpu_mode")
        self._need_dpu("read DPU mode")
        return self.mode

    def bmc_rshim(self) -> bool:
        self._enter("bmc_rshim")
        self._need_dpu("read BMC RShim")
        return self.rshim

    def set_bmc_rshim(self, enabled: bool) -> None:
        self._enter("set_bmc_rshim")
        self._need_dpu("set BMC RShim")
        self.rshim = enabled

    def install_bfb(self, image_uri: str) -> TaskHandle:
        self._enter("install_bfb")
        self._need_dpu("install BFB")
        self.rshim = True
        return self.firmware_install(image_uri, target="DPU_OS")

    def dpu_facts(self) -> DpuFacts:
        self._enter("dpu_facts")
        self._need_dpu("read DPU facts")
        return DpuFacts(mode=self.mode, secure_boot=self.secure_boot, secure_boot_current=None,
                        os_state=self.dpu_os_state(), host_rshim="Disabled", bmc_rshim=self.rshim,
                        firmware="BF-24.10-fake", os_version=None, http_push=True, update_protocols=("HTTP",))

    def set_dpu_mode(self, mode: DpuMode) -> None:
        self._enter("set_dpu_mode")
        self._need_dpu("set DPU mode")
        self.mode = mode

    def set_secure_boot(self, enabled: bool) -> None:
        self._enter("set_secure_boot")
        self._need_dpu("set Secure Boot")
        self.secure_boot = enabled

    def dpu_os_state(self) -> str | None:
        """``os_state`` when a test set it, else OsIsRunning once a BFB transfer ended well and
        ``install_duration`` more seconds passed (the fake's OS install)."""
        self._enter("dpu_os_state")
        self._need_dpu("read BootProgress")
        with self._lock:
            if self.os_state is not None:
                return self.os_state
            ends = [t.started + self.task_duration + self.install_duration for t in self._tasks.values()
                    if t.fail_with is None and t.target == "DPU_OS"]
        return "OsIsRunning" if ends and self.clock() >= max(ends) else None


_FAKES: dict[str, FakePowerDriver] = {}
_FAKES_LOCK = threading.Lock()


def fake_for(address: str) -> FakePowerDriver:
    """The process-wide fake for ``address`` (created on first use; tests may pre-register)."""
    with _FAKES_LOCK:
        drv = _FAKES.get(address)
        if drv is None:
            drv = _FAKES[address] = FakePowerDriver(address)
        return drv


def register_fake(drv: FakePowerDriver) -> FakePowerDriver:
    with _FAKES_LOCK:
        _FAKES[drv.address] = drv
    return drv


def reset_fakes() -> None:
    with _FAKES_LOCK:
        _FAKES.clear()
