"""The Redfish driver against four real BMC captures (BF3 BF-24.10, Dell iDRAC 9, HPE iLO 5, DMTF
public-rackmount1), replayed by tests/helpers/redfish_replay.py: identity, and the exact requests each
operation sends (method, URI, key headers, body)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from helpers.redfish_replay import VENDORS, Knobs, Replay, captures_present

from bootsvc import db, inventory
from bootsvc.cli import cli
from bootsvc.power.base import BootTarget, DpuMode, FatalBmcError, PowerSettings, PowerState
from bootsvc.power.redfish import RedfishDriver

pytestmark = pytest.mark.skipif(not captures_present(),
                                reason="../shared/redfish-captures (real BMC captures) not present")
USER, PASSWORD = "root", "replay-pass"
REF = "env:RP_USER:RP_PASS"
BF = "nvidia-bf3-bmc-24.10"
DPU_OS = "redfish/v1/UpdateService/FirmwareInventory/DPU_OS"
SETTINGS = PowerSettings(poll_interval=0.01, update_wait=2.0, rshim_wait=0.2, drop_grace=0.2,
                         power_timeout=2.0)


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RP_USER", USER)
    monkeypatch.setenv("RP_PASS", PASSWORD)


def driver(r: Replay) -> RedfishDriver:
    return RedfishDriver(r.url, REF, verify_tls=False, settings=SETTINGS)


@pytest.fixture(params=VENDORS)
def replay(request: pytest.FixtureRequest) -> Iterator[Replay]:
    with Replay(request.param, user=USER, password=PASSWORD) as r:
        yield r


KIND = {BF: "nvidia-bluefield-bmc", "dell-idrac9-r750": "dell-idrac", "hpe-ilo5-dl385": "hpe-ilo",
        "dmtf-public-rackmount1": "dmtf-mockup"}
SYSTEM = {BF: "/redfish/v1/Systems/Bluefield", "dell-idrac9-r750": "/redfish/v1/Systems/System.Embedded.1",
          "hpe-ilo5-dl385": "/redfish/v1/Systems/1", "dmtf-public-rackmount1": "/redfish/v1/Systems/437XR1138R2"}


def test_identity_from_what_the_firmware_says(replay: Replay) -> None:
    info = driver(replay).info()
    assert info.kind == KIND[replay.name] and info.quirks == (KIND[replay.name],)
    assert info.system_path == SYSTEM[replay.name] and info.auth == "session"
    assert info.evidence
    if replay.name == BF:
        assert info.evidence[0] == ("nvidia-bluefield-bmc: root Vendor 'Nvidia' ~ 'nvidia'; "
                                    "Systems member 'Bluefield' ~ 'bluefield'")
        assert info.dpu is not None and info.dpu.mode is DpuMode.DPU and info.dpu.secure_boot is False
        assert info.dpu.os_state == "OsIsRunning" and info.dpu.http_push and info.firmware == "BF-24.10-10"
    else:
        assert info.dpu is None


def test_every_request_refuses_compression(replay: Replay) -> None:
    driver(replay).power_state()
    assert replay.calls and all(c.headers.get("Accept-Encoding") == "identity" for c in replay.calls)
    # one session per operation, logged out at the end
    assert [c.method for c in replay.calls if "/SessionService/Sessions" in c.path] == ["POST", "DELETE"]


def test_bf3_pxe_once_goes_to_settings_with_uefi() -> None:
    with Replay(BF, user=USER, password=PASSWORD) as r:
        ov = driver(r).boot_once(BootTarget.PXE)
        assert r.sent() == [("PATCH", "/redfish/v1/Systems/Bluefield/Settings", {"Boot": {
            "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once",
            "BootSourceOverrideMode": "UEFI"}})]
        assert ov.pending and ov.sticky and ov.target == "Pxe"


def test_bf3_target_checked_against_the_settings_list_before_any_patch() -> None:
    with Replay(BF, user=USER, password=PASSWORD) as r:
        # the live System allows UefiHttp, the Settings object (which gets the PATCH) does not
        with pytest.raises(FatalBmcError, match=r"Settings does not allow BootSourceOverrideTarget 'UefiHttp'"
                                                r".*'None', 'Pxe', 'Hdd', 'Cd', 'Diags', 'BiosSetup', 'Usb'"):
            driver(r).boot_once(BootTarget.HTTP, uri="http://10.0.0.1/x.efi")
        assert r.sent() == []


def test_dell_pxe_once_on_the_system_with_its_etag() -> None:
    with Replay("dell-idrac9-r750", user=USER, password=PASSWORD) as r:
        ov = driver(r).boot_once(BootTarget.PXE)
        patches = [c for c in r.calls if c.method == "PATCH"]
        assert [(c.path, c.body) for c in patches] == [("/redfish/v1/Systems/System.Embedded.1", {"Boot": {
            "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}})]
        assert patches[0].headers["If-Match"].startswith('"') and not ov.pending and not ov.sticky


def test_hpe_weak_etag_sent_in_strong_form() -> None:
    with Replay("hpe-ilo5-dl385", user=USER, password=PASSWORD) as r:
        driver(r).boot_once(BootTarget.PXE)
        p = [c for c in r.calls if c.method == "PATCH"]
        assert len(p) == 1 and p[0].headers["If-Match"].startswith('"')


def test_hpe_strong_form_refused_then_sent_without_if_match() -> None:
    with Replay("hpe-ilo5-dl385", user=USER, password=PASSWORD, knobs=Knobs(refuse_strong_etag=True)) as r:
        driver(r).boot_once(BootTarget.PXE)
        p = [c for c in r.calls if c.method == "PATCH"]
        assert [("If-Match" in c.headers) for c in p] == [True, False]
        assert p[0].body == p[1].body == {"Boot": {"BootSourceOverrideTarget": "Pxe",
                                                   "BootSourceOverrideEnabled": "Once"}}


def test_hpe_clear_sends_only_disabled() -> None:
    with Replay("hpe-ilo5-dl385", user=USER, password=PASSWORD, knobs=Knobs(hpe_refuses_none=True)) as r:
        d = driver(r)
        d.boot_once(BootTarget.PXE)
        seen = d.clear_boot_override()
        assert r.sent("PATCH")[-1] == ("PATCH", "/redfish/v1/Systems/1",
                                       {"Boot": {"BootSourceOverrideEnabled": "Disabled"}})
        assert not seen.active


def test_dmtf_clear_of_the_captured_once_pxe_override() -> None:
    with Replay("dmtf-public-rackmount1", user=USER, password=PASSWORD) as r:
        d = driver(r)
        assert d.boot_override().active  # the mockup ships with Pxe/Once set
        d.clear_boot_override()
        assert r.sent() == [("PATCH", "/redfish/v1/Systems/437XR1138R2", {"Boot": {
            "BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "None"}})]


CYCLE = {BF: "ForceRestart", "dell-idrac9-r750": "PowerCycle", "hpe-ilo5-dl385": "ForceRestart",
         "dmtf-public-rackmount1": "ForceRestart"}


def test_power_off_on_cycle(replay: Replay) -> None:
    d = driver(replay)
    sysp = SYSTEM[replay.name]
    reset = ("/redfish/v1/Systems/Bluefield/Actions/ComputerSystem.Reset" if replay.name == BF
             else f"{sysp}/Actions/ComputerSystem.Reset")
    assert d.power_state() is PowerState.ON
    d.power_cycle(wait=2)
    d.power_off(wait=2)
    d.power_on(wait=2)
    assert replay.sent() == [("POST", reset, {"ResetType": CYCLE[replay.name]}),
                             ("POST", reset, {"ResetType": "ForceOff"}),
                             ("POST", reset, {"ResetType": "On"})]


def test_session_expired_mid_operation_logs_in_once_more() -> None:
    with Replay("dell-idrac9-r750", user=USER, password=PASSWORD) as r:
        d = driver(r)
        d.info()
        r.calls.clear()
        orig = r.handle

        def expire_after_login(req):  # type: ignore[no-untyped-def]
            resp = orig(req)
            if req.method == "GET" and req.path.rstrip("/") == "/redfish/v1/Systems/System.Embedded.1" and \
                    not getattr(r, "_expired", False):
                r._expired = True  # type: ignore[attr-defined]
                r.expire_sessions()
            return resp

        r.handle = expire_after_login  # type: ignore[method-assign]
        d.boot_once(BootTarget.PXE)
        logins = [c for c in r.calls if c.method == "POST" and c.path.endswith("/Sessions")]
        assert len(logins) == 2
        # the PATCH that met the expired session (401, not applied) is sent once more after the login
        patches = [c for c in r.calls if c.method == "PATCH"]
        assert [(c.path, c.body) for c in patches] == [("/redfish/v1/Systems/System.Embedded.1", {"Boot": {
            "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}})] * 2
        assert patches[0].headers["X-Auth-Token"] != patches[1].headers["X-Auth-Token"]


def test_bf3_bfb_push_sequence() -> None:
    with Replay(BF, user=USER, password=PASSWORD, knobs=Knobs(busy_updates=1)) as r:
        d = driver(r)
        task = d.install_bfb("http://127.0.0.1:8080/bfb/dpu-1/0123abcd")
        assert r.sent() == [
            ("POST", "/redfish/v1/Systems/Bluefield/Oem/Nvidia/Actions/HostRshim.Set", {"HostRshim": "Disabled"}),
            *[("POST", "/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate",
               {"ImageURI": "127.0.0.1:8080/bfb/dpu-1/0123abcd", "TransferProtocol": "HTTP",
                "Targets": [DPU_OS]})] * 2,  # the first answered 400 "An update is in progress"
        ]
        st = d.wait_task(task, 5)
        assert st.ok and st.percent == 100
        assert d.dpu_os_state() == "OsIsRunning"


def test_bf3_bmc_rshim_enabled_when_off() -> None:
    with Replay(BF, user=USER, password=PASSWORD) as r:
        (r.doc("/redfish/v1/Managers/Bluefield_BMC/Oem/Nvidia") or {})["BmcRShim"]["BmcRShimEnabled"] = False
        driver(r).install_bfb("http://127.0.0.1:8080/bfb/x")
        assert ("PATCH", "/redfish/v1/Managers/Bluefield_BMC/Oem/Nvidia",
                {"BmcRShim": {"BmcRShimEnabled": True}}) in r.sent()


def bf2310(r: Replay) -> None:
    """Turn the replayed BF-24.10 tree into the documented BF-23.10 shape (bluefield-real.md §1, §3.3)."""
    sysdoc = r.doc("/redfish/v1/Systems/Bluefield") or {}
    sysdoc.pop("Manufacturer")
    sysdoc.pop("Model")
    (r.doc("/redfish/v1/Managers/Bluefield_BMC") or {})["FirmwareVersion"] = "BF-23.10-5"
    act = (r.doc("/redfish/v1/UpdateService") or {})["Actions"]["#UpdateService.SimpleUpdate"]
    act["TransferProtocol@Redfish.AllowableValues"] = [["SCP"]]
    (r.doc("/redfish/v1/Systems/Bluefield/Oem/Nvidia") or {})["Mode"] = ""


def test_bf2310_identified_and_push_refused_naming_the_firmware() -> None:
    with Replay(BF, user=USER, password=PASSWORD) as r:
        bf2310(r)
        d = driver(r)
        info = d.info()
        assert info.kind == "nvidia-bluefield-bmc" and info.model == "Nvidia-BMCMezz"
        assert info.dpu is not None and not info.dpu.http_push and info.dpu.mode is DpuMode.UNKNOWN
        with pytest.raises(FatalBmcError, match=r"BMC firmware BF-23.10-5 takes SimpleUpdate images only by SCP"):
            d.install_bfb("http://127.0.0.1:8080/bfb/x")
        assert r.sent() == []


@pytest.fixture
def dburl(tmp_path_factory: pytest.TempPathFactory, replay: Replay) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('capdb') / 'bootsvc.db'}"
    cli_run(url, "db", "upgrade")
    engine = db.make_engine(url)
    with db.session_factory(engine)() as s:
        inventory.enroll(s, [inventory.NodeSpec(name="n1", kind="dpu" if replay.name == BF else "host",
                                                serial="S1", bmc_address=replay.url, bmc_credential_ref=REF,
                                                bmc_verify_tls=False)], actor="test")
    engine.dispose()
    return url


def cli_run(url: str, *args: str) -> str:
    r = CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout


def test_cli_bmc_check_prints_the_evidence(dburl: str, replay: Replay) -> None:
    out = cli_run(dburl, "bmc", "check", "n1")
    assert f"identified as:   {KIND[replay.name]}" in out and "evidence:" in out
    if replay.name == BF:
        assert "root Vendor 'Nvidia'" in out and "dpu mode:        DpuMode" in out
        assert "secure boot:     disabled" in out and "bfb push:        HTTP ok" in out
    d = json.loads(cli_run(dburl, "bmc", "check", "n1", "--json"))
    assert d["kind"] == KIND[replay.name]


def test_cli_power_and_pxe_once(dburl: str, replay: Replay) -> None:
    assert cli_run(dburl, "power", "status", "n1").startswith("n1: On;")
    cli_run(dburl, "power", "pxe-once", "n1")
    cli_run(dburl, "power", "cycle", "n1", "--wait", "2")
    sent = replay.sent()
    assert sent[0][0] == "PATCH" and sent[0][2]["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    assert sent[-1][2] == {"ResetType": CYCLE[replay.name]}


def test_settings_object_without_the_override_fields_gets_nothing() -> None:
    """Lenovo's pending object carries only BootOrder: the override goes to the System (sushy's rule)."""
    with Replay("dmtf-public-rackmount1", user=USER, password=PASSWORD) as r:
        sysp = "/redfish/v1/Systems/437XR1138R2"
        (r.doc(sysp) or {})["@Redfish.Settings"] = {"SettingsObject": {"@odata.id": sysp + "/Pending"}}
        r.docs[sysp + "/Pending"] = {"@odata.id": sysp + "/Pending", "Boot": {"BootOrder": []}}
        ov = driver(r).boot_once(BootTarget.PXE)
        assert r.sent("PATCH") == [("PATCH", sysp, {"Boot": {"BootSourceOverrideTarget": "Pxe",
                                                              "BootSourceOverrideEnabled": "Once"}})]
        assert not ov.pending


def test_supermicro_uefi_pxe_read_back_as_uefibootnext_is_accepted() -> None:
    with Replay("dmtf-public-rackmount1", user=USER, password=PASSWORD,
                knobs=Knobs(pxe_reads_back_as="UefiBootNext")) as r:
        sysp = "/redfish/v1/Systems/437XR1138R2"
        (r.doc(sysp) or {})["Manufacturer"] = "Supermicro"
        (r.doc(sysp) or {})["Boot"]["BootSourceOverrideTarget@Redfish.AllowableValues"].append("UefiBootNext")
        ov = driver(r).boot_once(BootTarget.PXE)
        assert ov.target == "UefiBootNext"
        # Supermicro gets the whole Boot object (Mode kept), DMTF Redfishtool #106
        assert r.sent("PATCH")[0][2] == {"Boot": {"BootSourceOverrideMode": "UEFI", "BootSourceOverrideTarget": "Pxe",
                                                  "BootSourceOverrideEnabled": "Once"}}
    with Replay("dmtf-public-rackmount1", user=USER, password=PASSWORD,
                knobs=Knobs(pxe_reads_back_as="UefiBootNext")) as r, \
            pytest.raises(FatalBmcError, match="ignored it: BootSourceOverrideTarget reads 'UefiBootNext'"):
        driver(r).boot_once(BootTarget.PXE)  # not Supermicro: the same read-back is a real mismatch


ONCE = {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}
PXE_CLEAR = {  # (PATCH URI, pxe-once body, clear body) as each vendor documents it
    BF: ("/redfish/v1/Systems/Bluefield/Settings", {**ONCE, "BootSourceOverrideMode": "UEFI"},
         {"BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "None"}),
    "dell-idrac9-r750": ("/redfish/v1/Systems/System.Embedded.1", ONCE,
                         {"BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "None"}),
    "hpe-ilo5-dl385": ("/redfish/v1/Systems/1", ONCE, {"BootSourceOverrideEnabled": "Disabled"}),
    "dmtf-public-rackmount1": ("/redfish/v1/Systems/437XR1138R2", ONCE,
                               {"BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "None"}),
}


def test_pxe_once_then_clear_exact_requests(replay: Replay) -> None:
    uri, once, clear = PXE_CLEAR[replay.name]
    d = driver(replay)
    d.boot_once(BootTarget.PXE)
    d.clear_boot_override()
    writes = [c for c in replay.calls if c.method in ("PATCH", "POST") and "/Sessions" not in c.path]
    assert [(c.method, c.path, c.body) for c in writes] == [("PATCH", uri, {"Boot": once}),
                                                            ("PATCH", uri, {"Boot": clear})]
    for c in writes:
        assert c.headers["Content-Type"] == "application/json" and c.headers["Accept-Encoding"] == "identity"
        assert "X-Auth-Token" in c.headers and "Authorization" not in c.headers  # session auth, no password
        # the ETag the BMC handed out, in its strong form (RFC 9110 §13.1.1)
        assert c.headers["If-Match"].startswith('"')


def test_bfb_push_refused_on_x86_bmcs_without_a_request(replay: Replay) -> None:
    if replay.name == BF:
        pytest.skip("the BF3 push has its own tests")
    with pytest.raises(FatalBmcError, match="is not a BlueField DPU BMC"):
        driver(replay).install_bfb("http://127.0.0.1:8080/bfb/x")
    assert replay.sent() == []


def test_bf3_image_uri_keeps_its_scheme_when_the_site_says_so_for_this_firmware() -> None:
    with Replay(BF, user=USER, password=PASSWORD) as r:
        s = PowerSettings(poll_interval=0.01, update_wait=2.0, rshim_wait=0.2, bfb_uri_scheme_firmware=("BF-24.10-*",))
        RedfishDriver(r.url, REF, verify_tls=False, settings=s).install_bfb("http://127.0.0.1:8080/bfb/x")
        assert r.sent()[-1][2]["ImageURI"] == "http://127.0.0.1:8080/bfb/x"


def test_bf3_bmc_rshim_toggled_when_it_does_not_come_up() -> None:
    with Replay(BF, user=USER, password=PASSWORD) as r:
        oem = r.doc("/redfish/v1/Managers/Bluefield_BMC/Oem/Nvidia") or {}
        oem["BmcRShim"]["BmcRShimEnabled"] = False
        orig = r._patch
        n = {"patches": 0}

        def sticky_first_enable(req, path, body):  # type: ignore[no-untyped-def]
            resp = orig(req, path, body)
            if path.endswith("/Bluefield_BMC/Oem/Nvidia"):
                n["patches"] += 1
                if n["patches"] == 1:  # the first enable does not take (dpu-update try_enable_rshim_on_bmc)
                    oem["BmcRShim"]["BmcRShimEnabled"] = False
            return resp

        r._patch = sticky_first_enable  # type: ignore[method-assign]
        driver(r).install_bfb("http://127.0.0.1:8080/bfb/x")
        rshim = [b for m, p, b in r.sent() if p.endswith("/Bluefield_BMC/Oem/Nvidia")]
        assert rshim == [{"BmcRShim": {"BmcRShimEnabled": v}} for v in (True, False, True)]


def test_bf3_without_hostrshim_action_still_pushes() -> None:
    with Replay(BF, user=USER, password=PASSWORD) as r:
        (r.doc("/redfish/v1/Systems/Bluefield/Oem/Nvidia") or {})["Actions"].pop("#HostRshim.Set")
        driver(r).install_bfb("http://127.0.0.1:8080/bfb/x")
        assert [p for _m, p, _b in r.sent()] == ["/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate"]
