"""The BlueField-3 BMC emulator as pytest fixtures (bootsvc/lab/bfbmc.py, the BF-24.10 capture replayed).

Owns what every Redfish test against the emulator starts and checks the same way: one ``BfBmcProcess``
per test module on loopback, the credentials the driver reads through the ref ``REF`` put in the
environment, the emulator back to the captured state before each test, and, after each test, faults
cleared and no Redfish session left open on the BMC (sessions are counted on the emulator side, so a
driver or pool that forgets its logout fails the test that leaked it); and ``network_boot_step``, the
calls the conductor's network-boot step makes, for the tests that count what a step costs the BMC.

Use: ``bf, fresh = bfbmc_fixtures("bfbmc-cost")`` at module level; the test functions take ``bf``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from bootsvc.lab.bfbmc import BfBmcProcess
from bootsvc.power.base import BootTarget, PowerState
from bootsvc.power.redfish import RedfishDriver

USER, PASSWORD = "root", "bp-bfbmc-pass"
USER_VAR, PASS_VAR = "BP_BMC_USER", "BP_BMC_PASS"
REF = f"env:{USER_VAR}:{PASS_VAR}"  # a credential ref (bootsvc/power/credentials.py): env:USERVAR:PASSVAR


def assert_no_session_open(bf: BfBmcProcess) -> None:
    """Fail when the emulator still holds a Redfish session (a logout the code under test forgot)."""
    s = bf.stats()
    assert s["sessions_open"] == 0, (
        f"session leak: {s['sessions_open']} open on the BMC ({s['sessions_created']} created, "
        f"{s['sessions_deleted']} deleted since the emulator's last reset)")


def network_boot_step(drv: RedfishDriver, *, dpu: bool) -> None:
    """What the conductor's network-boot step asks of a BMC (bootsvc/conductor_bmc.py, Op.BOOT_NETWORK):
    the power state, for a DPU its facts (the preflight), the one-time PXE boot, then a reset if the
    node was on, else power on."""
    before = drv.power_state()
    if dpu:
        drv.dpu_facts()
    drv.boot_once(BootTarget.PXE)
    if before is PowerState.ON:
        drv.reset()
    else:
        drv.power_on()


def bfbmc_fixtures(tmp_name: str, *, power_delay: float | None = 0.3,
                   faults: Mapping[str, Any] | None = None) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The module fixture ``bf`` (one emulator in ``tmp_name``, power transitions taking ``power_delay`` s)
    and the autouse fixture ``fresh`` (credentials in the environment, the emulator reset and given
    ``faults`` before each test; faults cleared and no open session checked after it).
    Assign both to module-level names so pytest finds them."""

    @pytest.fixture(scope="module", name="bf")
    def bf_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BfBmcProcess]:
        with BfBmcProcess(tmp_path_factory.mktemp(tmp_name), user=USER, password=PASSWORD,
                          power_delay=power_delay) as p:
            yield p

    @pytest.fixture(autouse=True, name="fresh")
    def fresh_fixture(bf: BfBmcProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        monkeypatch.setenv(USER_VAR, USER)
        monkeypatch.setenv(PASS_VAR, PASSWORD)
        bf.reset()  # captured state, faults but power_delay cleared, counters zeroed (BfBmc.reset_state)
        if faults:
            bf.faults(**faults)
        yield
        bf.clear_faults()
        assert_no_session_open(bf)

    return bf_fixture, fresh_fixture
