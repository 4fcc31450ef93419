"""Pure decisions of bootsvc.power.base and the transport-error classing of the Redfish driver."""

from __future__ import annotations

import http.client

import pytest
import requests
import urllib3.exceptions

from bootsvc.power.base import (
    BmcAddress,
    BmcNoAnswer,
    BootOverride,
    FatalBmcError,
    PowerAction,
    PowerState,
    RetryableBmcError,
    TaskState,
    TaskStatus,
    check_boot_readback,
    choose_reset_type,
    error_for_status,
)
from bootsvc.power.redfish import transport_error

SUSHY_ALLOWED = ["On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "Nmi", "ForceOn"]


@pytest.mark.parametrize(("action", "allowed", "want"), [
    (PowerAction.ON, None, "On"),
    (PowerAction.ON, ["ForceOn", "ForceOff"], "ForceOn"),
    (PowerAction.OFF, SUSHY_ALLOWED, "ForceOff"),
    (PowerAction.GRACEFUL_OFF, SUSHY_ALLOWED, "GracefulShutdown"),
    (PowerAction.RESET, SUSHY_ALLOWED, "ForceRestart"),
    (PowerAction.RESET, ["GracefulRestart", "On"], "GracefulRestart"),
    (PowerAction.CYCLE, SUSHY_ALLOWED, "ForceRestart"),  # sushy has no PowerCycle
    (PowerAction.CYCLE, ["PowerCycle", "ForceRestart"], "PowerCycle"),
])
def test_reset_type_follows_allowable_values(action: PowerAction, allowed: list[str] | None, want: str) -> None:
    assert choose_reset_type(action, allowed) == want


def test_reset_type_unsupported_is_fatal_and_names_what_is_allowed() -> None:
    with pytest.raises(FatalBmcError, match=r"allows \['On'\]"):
        choose_reset_type(PowerAction.OFF, ["On"], bmc="https://b")


@pytest.mark.parametrize(("status", "retryable", "words"), [
    (401, False, "credentials rejected"),
    (403, False, "privilege"),
    (404, False, "not on this BMC"),
    (405, False, "not support"),
    (409, True, "another operation"),
    (412, True, "ETag"),
    (428, False, "If-Match"),
    (429, True, "busy"),
    (500, True, "internal error"),
    (503, True, "busy"),
    (400, False, "rejected"),
])
def test_http_status_classing(status: int, retryable: bool, words: str) -> None:
    e = error_for_status(status, bmc="https://10.0.0.1", what="PATCH Boot", detail="x",
                         credential_ref="env:U:P")
    assert e.retryable is retryable
    assert isinstance(e, RetryableBmcError if retryable else FatalBmcError)
    assert words in str(e)
    assert str(e).startswith("BMC https://10.0.0.1: PATCH Boot failed: HTTP")
    assert "\n" not in str(e)


def test_401_names_the_credential_ref_not_a_secret() -> None:
    assert "env:BMC_U:BMC_P" in str(error_for_status(401, bmc="b", what="login", credential_ref="env:BMC_U:BMC_P"))


def test_boot_readback_accepts_continuous_for_once_but_not_a_wrong_target() -> None:
    asked = BootOverride("Pxe", "Once", "UEFI")
    assert check_boot_readback(asked, BootOverride("Pxe", "Once", "UEFI")) is None
    assert check_boot_readback(asked, BootOverride("Pxe", "Continuous", "UEFI")) is None
    problem = check_boot_readback(asked, BootOverride("Hdd", "Continuous", "UEFI"))
    assert problem is not None and "'Hdd'" in problem and "'Pxe'" in problem
    assert "Enabled" in (check_boot_readback(asked, BootOverride("Pxe", "Disabled")) or "")
    assert "Mode" in (check_boot_readback(asked, BootOverride("Pxe", "Once", "Legacy")) or "")
    http = BootOverride("UefiHttp", "Once", uri="http://a/b.efi")
    assert "HttpBootUri" in (check_boot_readback(http, BootOverride("UefiHttp", "Once")) or "")


def test_override_active() -> None:
    assert BootOverride("Pxe", "Once").active
    assert not BootOverride("Pxe", "Disabled").active
    assert not BootOverride("None", "Continuous").active


@pytest.mark.parametrize(("text", "base", "system"), [
    ("10.0.0.5", "https://10.0.0.5", None),
    ("bmc-1.mgmt:8443", "https://bmc-1.mgmt:8443", None),
    ("http://127.0.0.1:18000", "http://127.0.0.1:18000", None),
    ("https://10.0.0.5/redfish/v1/Systems/Bluefield/", "https://10.0.0.5", "/redfish/v1/Systems/Bluefield"),
])
def test_bmc_address_parse(text: str, base: str, system: str | None) -> None:
    a = BmcAddress.parse(text)
    assert (a.base_url, a.system_path) == (base, system)


@pytest.mark.parametrize("bad", ["", "ftp://x", "https://x/redfish/v1/Managers/1"])
def test_bmc_address_rejects(bad: str) -> None:
    with pytest.raises(FatalBmcError):
        BmcAddress.parse(bad)


def test_parse_enums_unknown_values() -> None:
    assert PowerState.parse("On") is PowerState.ON
    assert PowerState.parse("Blinking") is PowerState.UNKNOWN
    assert TaskState.parse(None) is TaskState.UNKNOWN


def test_task_status_done_and_ok() -> None:
    assert TaskStatus("t", TaskState.COMPLETED, 100, (), "OK").ok
    assert not TaskStatus("t", TaskState.COMPLETED, 100, (), "Critical").ok
    assert TaskStatus("t", TaskState.EXCEPTION).done and not TaskStatus("t", TaskState.EXCEPTION).ok
    assert not TaskStatus("t", TaskState.RUNNING, 40).done


def _wrapped(inner: BaseException) -> requests.exceptions.ConnectionError:
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/x", inner))  # type: ignore[arg-type]


def test_refused_connection_is_retryable_and_not_sent() -> None:
    exc = _wrapped(urllib3.exceptions.NewConnectionError(None, "Failed to establish: [Errno 111] refused"))  # type: ignore[arg-type]
    e = transport_error(exc, bmc="b", what="ComputerSystem.Reset On", method="POST", read_timeout=5)
    assert isinstance(e, RetryableBmcError) and not e.maybe_applied
    assert "unreachable" in str(e) and "nothing was sent" in str(e)


def test_dropped_connection_after_post_may_have_been_applied() -> None:
    exc = requests.exceptions.ConnectionError(urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.RemoteDisconnected("closed")))
    e = transport_error(exc, bmc="b", what="ComputerSystem.Reset", method="POST", read_timeout=5)
    assert isinstance(e, BmcNoAnswer) and e.dropped and e.maybe_applied
    g = transport_error(exc, bmc="b", what="GET", method="GET", read_timeout=5)
    assert isinstance(g, BmcNoAnswer) and not g.maybe_applied


def test_read_timeout_and_tls_failure() -> None:
    e = transport_error(requests.exceptions.ReadTimeout("read timed out"), bmc="b", what="PATCH Boot",
                        method="PATCH", read_timeout=7)
    assert isinstance(e, BmcNoAnswer) and not e.dropped and e.maybe_applied and "within 7s" in str(e)
    t = transport_error(requests.exceptions.SSLError("CERTIFICATE_VERIFY_FAILED"), bmc="b", what="GET /",
                        method="GET", read_timeout=7)
    assert isinstance(t, FatalBmcError) and "ca_file" in str(t)


# -- pure helpers for real firmware (bluefield-real.md; captures under ../shared/redfish-captures) ------
def test_route_boot_fields_per_field_like_sushy() -> None:
    from bootsvc.power.base import route_boot_fields

    boot = {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once", "BootOrder": ["a"]}
    # BF3 Settings carries the override fields; Lenovo's Pending carries only BootOrder
    assert route_boot_fields(boot, {"BootSourceOverrideTarget": "x", "BootSourceOverrideEnabled": "y"}) == (
        {"BootOrder": ["a"]}, {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"})
    assert route_boot_fields(boot, {"BootOrder": []}) == (
        {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}, {"BootOrder": ["a"]})
    assert route_boot_fields(boot, None) == (boot, {})


def test_check_allowed_lists_the_values() -> None:
    from bootsvc.power.base import check_allowed

    b = {"BootSourceOverrideTarget@Redfish.AllowableValues": ["None", "Pxe", "Hdd"]}
    check_allowed("BootSourceOverrideTarget", "Pxe", b, "/S")
    with pytest.raises(FatalBmcError, match=r"/S does not allow BootSourceOverrideTarget 'UefiHttp' "
                                            r"\(it allows \['None', 'Pxe', 'Hdd'\]\)"):
        check_allowed("BootSourceOverrideTarget", "UefiHttp", b, "/S")
    check_allowed("BootSourceOverrideTarget", "Anything", {}, "/S")  # no list: no check


def test_etag_protocol_and_uri_helpers() -> None:
    from bootsvc.power.base import image_uri_for, strong_etag, transfer_protocols, update_in_progress

    assert strong_etag('W/"9B9F7D67"') == '"9B9F7D67"' and strong_etag('"x"') == '"x"'
    assert transfer_protocols([["SCP"]]) == ("SCP",) and transfer_protocols(["SCP", "HTTP"]) == ("SCP", "HTTP")
    assert update_in_progress(400, "An update is in progress. Please wait.")
    assert update_in_progress(400, "Another update is in progress")
    assert not update_in_progress(400, "Invalid ImageURI") and not update_in_progress(404, "update in progress")
    assert image_uri_for("http://10.0.0.1:8080/bfb/n/t", with_scheme=False) == "10.0.0.1:8080/bfb/n/t"
    assert image_uri_for("http://10.0.0.1:8080/bfb/n/t", with_scheme=True) == "http://10.0.0.1:8080/bfb/n/t"


def test_blank_override_fields_are_not_active_and_dpu_advice() -> None:
    from bootsvc.power.base import DpuFacts, DpuMode, dpu_advice

    assert not BootOverride("", "").active and not BootOverride("Pxe", "").active
    f = DpuFacts(mode=DpuMode.NIC, secure_boot=True, secure_boot_current="Enabled", os_state=None,
                 host_rshim=None, bmc_rshim=None, firmware="BF-23.10-5", os_version=None, http_push=False,
                 update_protocols=("SCP",))
    adv = dpu_advice(f, network_install=True)
    assert len(adv) == 3 and "NIC mode" in adv[0] and "BF-23.10-5" in adv[1] and "Secure Boot" in adv[2]
