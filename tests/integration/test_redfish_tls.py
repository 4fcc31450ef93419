"""TLS verification of the Redfish driver against an HTTPS BlueField BMC emulator (self-signed cert).

Verification is on by default (the library alone would verify nothing); a site CA file makes it pass;
``verify_tls=False`` is the explicit lab opt-out.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsvc.lab.bfbmc import BfBmcProcess, self_signed_cert
from bootsvc.power.base import FatalBmcError, PowerSettings, PowerState, RetryableBmcError
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


def test_process_environment_never_reaches_bmc_traffic(tls_bmc: tuple[BfBmcProcess, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY, REQUESTS_CA_BUNDLE and ~/.netrc are not read for BMCs (redfish_session.open_client):
    a dead proxy in the environment changes nothing, and an environment CA bundle does not replace the
    verification the driver asks for."""
    bmc, cert = tls_bmc
    bmc.reset()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # would make the unpinned driver trust the BMC
    monkeypatch.setenv("CURL_CA_BUNDLE", str(cert))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login intruder password nope\n")
    assert RedfishDriver(bmc.url, REF, settings=PowerSettings(ca_file=str(cert))).power_state() is PowerState.ON
    with pytest.raises(FatalBmcError, match="TLS verification"):
        RedfishDriver(bmc.url, REF).power_state()
    for var in ("HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(var)  # the emulator's control client (urllib) does read them
    s = bmc.stats()
    assert s["sessions_created"] == 1 and s["sessions_open"] == 0


def test_ca_directory_verifies_too(tls_bmc: tuple[BfBmcProcess, Path], tmp_path: Path) -> None:
    """power.ca_file may name a hashed CA directory (OpenSSL CApath): the adapter keeps the file-or-directory
    answer per session instead of asking the filesystem on every request."""
    bmc, cert = tls_bmc
    bmc.reset()
    cadir = tmp_path / "ca"
    cadir.mkdir()
    shutil.copy(cert, cadir / "bmc.pem")
    subprocess.run(["openssl", "rehash", str(cadir)], check=True, capture_output=True)
    assert RedfishDriver(bmc.url, REF, settings=PowerSettings(ca_file=str(cadir))).info().auth == "session"
    assert bmc.stats()["sessions_open"] == 0


def test_configured_proxy_is_used(tls_bmc: tuple[BfBmcProcess, Path]) -> None:
    """power.proxy is the one way to put a proxy between bootsvc and BMCs: a dead one fails as unreachable,
    before any credential is sent."""
    bmc, cert = tls_bmc
    bmc.reset()
    drv = RedfishDriver(bmc.url, REF, settings=PowerSettings(ca_file=str(cert), proxy="http://127.0.0.1:9",
                                                             connect_timeout=2))
    with pytest.raises(RetryableBmcError, match="unreachable"):
        drv.power_state()
    assert bmc.stats()["sessions_created"] == 0
