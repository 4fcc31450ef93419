"""TLS verification of the Redfish driver against an HTTPS BlueField BMC emulator (self-signed cert).

Verification is on by default (the library alone would verify nothing); a site CA file makes it pass;
``verify_tls=False`` is the explicit lab opt-out.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsvc.lab.bfbmc import BfBmcProcess, self_signed_cert
from bootsvc.power.base import FatalBmcError, PowerSettings, PowerState
from bootsvc.power.redfish import RedfishDriver

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
USER, PASSWORD = "root", "bp-tls-pass"
REF = "env:BP_TLS_USER:BP_TLS_PASS"


@pytest.fixture(scope="module")
def tls_bmc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BfBmcProcess, Path]]:
    work = tmp_path_factory.mktemp("bfbmc-tls")
    cert, key = self_signed_cert(work)
    with BfBmcProcess(work, user=USER, password=PASSWORD, tls=(cert, key)) as p:
        yield p, cert


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_TLS_USER", USER)
    monkeypatch.setenv("BP_TLS_PASS", PASSWORD)


def test_unknown_certificate_is_refused_by_default(tls_bmc: tuple[BfBmcProcess, Path]) -> None:
    bmc, _ = tls_bmc
    assert bmc.url.startswith("https://")
    bmc.reset()
    with pytest.raises(FatalBmcError, match=r"TLS verification of the BMC certificate failed.*ca_file"):
        RedfishDriver(bmc.url, REF).power_state()
    assert bmc.stats()["sessions_created"] == 0  # nothing, credentials included, went over the wire


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # the opt-out, on purpose
def test_site_ca_file_and_lab_opt_out(tls_bmc: tuple[BfBmcProcess, Path]) -> None:
    bmc, cert = tls_bmc
    bmc.reset()
    pinned = RedfishDriver(bmc.url, REF, settings=PowerSettings(ca_file=str(cert)))
    assert pinned.info().auth == "session"
    assert RedfishDriver(bmc.url, REF, verify_tls=False).power_state() is PowerState.ON
    s = bmc.stats()
    assert s["sessions_created"] == 2 and s["sessions_open"] == 0
