"""The fake power driver (delays on an injected clock, faults, call counts) and driver_for()."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bootsvc import config as config_mod
from bootsvc.power import driver_for, settings_from_config
from bootsvc.power.base import (
    BootTarget,
    DpuMode,
    FatalBmcError,
    PowerDriver,
    PowerState,
    RetryableBmcError,
    TaskState,
)
from bootsvc.power.fake import FakePowerDriver, fake_for, register_fake, reset_fakes
from bootsvc.power.redfish import RedfishDriver


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += max(s, 0.01)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_both_drivers_satisfy_the_protocol() -> None:
    assert isinstance(FakePowerDriver(), PowerDriver)
    assert isinstance(RedfishDriver("https://10.0.0.1", "env:A:B"), PowerDriver)


def test_power_transitions_take_the_configured_delay(clock: Clock) -> None:
    f = FakePowerDriver(power_delay=5.0, clock=clock, sleep=clock.sleep)
    f.power_on()
    assert f.power_state() is PowerState.OFF
    clock.t += 5.0
    assert f.power_state() is PowerState.ON
    f.power_cycle()
    assert f.power_state() is PowerState.OFF  # the dip is observable, like sushy's fake
    f.wait_power(PowerState.ON, 10)
    assert f.power_state() is PowerState.ON
    assert f.resets == ["on", "cycle"]
    assert f.calls["power_on"] == 1 and f.calls["power_state"] == 4


def test_wait_times_out_with_retryable_error(clock: Clock) -> None:
    f = FakePowerDriver(power_delay=30.0, clock=clock, sleep=clock.sleep)
    with pytest.raises(RetryableBmcError, match="not On"):
        f.power_on(wait=10)
    assert clock.t < 1000 + 11


def test_injected_faults_fire_once_each(clock: Clock) -> None:
    f = FakePowerDriver(clock=clock, sleep=clock.sleep)
    f.fail("power_on", RetryableBmcError("busy", status=503), times=2)
    for _ in range(2):
        with pytest.raises(RetryableBmcError, match="busy"):
            f.power_on()
    f.power_on(wait=1)
    assert f.power_state() is PowerState.ON and f.calls["power_on"] == 3
    f.fail("*", FatalBmcError("dead"))
    with pytest.raises(FatalBmcError):
        f.boot_override()


def test_boot_once_sticky_when_bmc_ignores_once(clock: Clock) -> None:
    keeps = FakePowerDriver(ignores_once=True, clock=clock, sleep=clock.sleep)
    b = keeps.boot_once(BootTarget.PXE)
    assert (b.target, b.enabled, b.sticky) == ("Pxe", "Continuous", True)
    keeps.power_on(wait=1)
    assert keeps.boot_override().active
    assert not keeps.clear_boot_override().active

    honest = FakePowerDriver(clock=clock, sleep=clock.sleep)
    honest.boot_once(BootTarget.PXE)
    honest.power_on(wait=1)
    assert not honest.boot_override().active  # Once consumed by the boot
    with pytest.raises(FatalBmcError, match="needs a URI"):
        honest.boot_once(BootTarget.HTTP)


def test_firmware_task_progress_and_failure(clock: Clock) -> None:
    f = FakePowerDriver(task_duration=10.0, clock=clock, sleep=clock.sleep)
    h = f.install_bfb("http://127.0.0.1/img/doca-2.9.bfb")
    assert f.rshim
    clock.t += 4
    st = f.task_status(h)
    assert st.state is TaskState.RUNNING and st.percent == 40
    seen: list[int] = []
    done = f.wait_task(h, 60, on_progress=lambda s: seen.append(s.percent or 0))
    assert done.ok and seen[-1] == 100 and seen == sorted(seen)
    assert f.firmware_version() == "doca-2.9.bfb"
    f.fail_next_task("checksum mismatch")
    h2 = f.firmware_install("http://127.0.0.1/img/x.bfb")
    with pytest.raises(FatalBmcError, match="checksum mismatch"):
        f.wait_task(h2, 60)


def test_non_dpu_fake_refuses_dpu_calls() -> None:
    f = FakePowerDriver(dpu=False)
    with pytest.raises(FatalBmcError, match="not a BlueField"):
        f.dpu_mode()
    assert FakePowerDriver().dpu_mode() is DpuMode.DPU


@dataclass
class NodeStub:
    name: str = "dpu-1"
    bmc_address: str | None = "https://10.1.0.5"
    bmc_driver: str = "redfish"
    bmc_credential_ref: str | None = "dpu-bmc"
    bmc_verify_tls: bool = True


def test_driver_for_redfish_uses_config() -> None:
    cfg = config_mod.from_mapping({"power": {"read_timeout": 7, "max_sessions_per_bmc": 3},
                                   "bmc_credentials": {"dpu-bmc": {"ref": "env:U:P", "networks": ["10.1.0.0/16"]}}},
                                  env={})
    d = driver_for(NodeStub(bmc_verify_tls=False), cfg)
    assert isinstance(d, RedfishDriver)
    assert d.address == "https://10.1.0.5" and d.verify_tls is False
    assert d.settings.read_timeout == 7 and d.settings.max_sessions_per_bmc == 3
    assert d.settings.credentials == {"dpu-bmc": "env:U:P"}
    assert settings_from_config(None).read_timeout == 30.0


def test_driver_for_fake_is_shared_per_address() -> None:
    reset_fakes()
    pre = register_fake(FakePowerDriver("fake://rack1/3", initial=PowerState.ON))
    assert driver_for(NodeStub(bmc_driver="fake", bmc_address="fake://rack1/3")) is pre
    assert fake_for("fake://rack1/3") is pre
    assert driver_for(NodeStub(bmc_driver="fake", bmc_address="fake://other")) is not pre
    reset_fakes()


@pytest.mark.parametrize(("stub", "words"), [
    (NodeStub(bmc_address=None), "has no bmc_address"),
    (NodeStub(bmc_driver="ipmi"), "unknown bmc_driver 'ipmi'"),
])
def test_driver_for_rejects(stub: NodeStub, words: str) -> None:
    with pytest.raises(FatalBmcError, match=words):
        driver_for(stub)
