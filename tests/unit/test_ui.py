"""The tech UI's routes through Flask's test client: auth, roles, CSRF, enroll validation, search,
confirmed actions, live status JSON; and its pure helpers (health colours, steps, actions)."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from helpers.ui import GOOD, TOKENS, Env, enroll, login, make_env
from sqlalchemy import select
from sqlalchemy.orm import Session

from bootsvc import inventory, lifecycle, metrics, operations
from bootsvc.models import ApiToken, Discovered, Event, Lease, Node, Tenant
from bootsvc.power.base import PowerState, RetryableBmcError
from bootsvc.states import KINDS, State, Trigger, states_for
from bootsvc.web import ui


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path)


# ------------------------------------------------------------------------------------ auth


def test_root_redirects_and_every_page_needs_login(env: Env) -> None:
    c = env.client()
    assert c.get("/").headers["Location"] == "/ui/"
    for path in ("/ui/", "/ui/enroll", "/ui/search?q=x", "/ui/machines/1"):
        r = c.get(path)
        assert r.status_code == 302 and r.headers["Location"].startswith("/ui/login?next=/ui/"), path
    r = c.get("/ui/machines/1/status.json")
    assert r.status_code == 401 and r.json == {"error": "unauthorized", "reason": "log in again at /ui/login"}
    assert c.get("/ui/static/ui.css").status_code == 200


def test_login_sets_signed_httponly_strict_cookie(env: Env) -> None:
    c = env.client()
    r = c.get("/ui/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', r.text)
    assert nonce
    r = c.post("/ui/login", data={"token": TOKENS["tech"], "login_nonce": nonce.group(1),
                                  "next": "/ui/search?q=x"})
    assert r.status_code == 302 and r.headers["Location"] == "/ui/search?q=x"
    cookie = next(h for h in r.headers.getlist("Set-Cookie") if h.startswith("bootsvc_ui="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert TOKENS["tech"] not in cookie  # the token itself never goes into the cookie
    assert "t-tech" in c.get("/ui/").text


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/api/v1/nodes"])
def test_login_never_redirects_outside_the_ui(env: Env, target: str) -> None:
    c = env.client()
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', c.get("/ui/login").text)
    assert nonce
    r = c.post("/ui/login", data={"token": TOKENS["tech"], "login_nonce": nonce.group(1), "next": target})
    assert r.headers["Location"] == "/ui/"


@pytest.mark.parametrize(("token", "message"), [
    ("wrong", "not valid"), ("tok-revoked", "not valid"), ("", "not valid"),
    ("tok-agent", "for DPU agents, not people"),
])
def test_login_refuses_bad_tokens_with_a_reason(env: Env, token: str, message: str) -> None:
    c = env.client()
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', c.get("/ui/login").text)
    assert nonce
    r = c.post("/ui/login", data={"token": token, "login_nonce": nonce.group(1)})
    assert r.status_code == 401 and message in r.text
    assert not any(h.startswith("bootsvc_ui=") for h in r.headers.getlist("Set-Cookie"))


def test_login_form_needs_its_nonce(env: Env) -> None:
    c = env.client()
    r = c.post("/ui/login", data={"token": TOKENS["tech"], "login_nonce": "forged"})
    assert r.status_code == 401 and "expired" in r.text


def test_tampered_or_revoked_session_is_logged_out(env: Env) -> None:
    c, _ = env.logged_in()
    raw = c.get_cookie("bootsvc_ui", path="/ui")
    assert raw is not None
    c.set_cookie("bootsvc_ui", raw.value[:-3] + "AAA", path="/ui")
    assert c.get("/ui/").status_code == 302
    c.set_cookie("bootsvc_ui", raw.value, path="/ui")
    assert c.get("/ui/").status_code == 200
    with env.sessions() as s:
        s.scalars(select(ApiToken).where(ApiToken.name == "t-tech")).one().revoked = True
        s.commit()
    assert c.get("/ui/").status_code == 302  # revocation applies at once


def test_logout_needs_csrf_and_clears_the_cookie(env: Env) -> None:
    c, csrf = env.logged_in()
    assert c.post("/ui/logout", data={}).status_code == 400
    r = c.post("/ui/logout", data={"csrf_token": csrf})
    assert r.status_code == 302 and "bootsvc_ui=;" in " ".join(r.headers.getlist("Set-Cookie"))
    assert c.get("/ui/").status_code == 302


def test_pages_send_strict_security_headers(env: Env) -> None:
    c, _ = env.logged_in()
    r = c.get("/ui/")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    assert "<script>" not in r.text  # no inline script, so the CSP can forbid it


# ------------------------------------------------------------------------------------ CSRF and roles


@pytest.mark.parametrize("csrf", [None, "", "wrong"])
def test_every_post_needs_the_session_csrf_token(env: Env, csrf: str | None) -> None:
    c, real = env.logged_in()
    enroll(c, real)
    host = env.node("r1-u07")
    data = {"node": str(host.id), "action": "provision"}
    if csrf is not None:
        data["csrf_token"] = csrf
    r = c.post(f"/ui/machines/{host.id}/act", data=data)
    assert r.status_code == 400 and "security check failed" in r.text
    r = c.post("/ui/enroll", data={**GOOD, "host_serial": "X2", "dpu_serial": "Y2", "host_mac": "02:00:00:00:00:01",
                                   "dpu_mac": "02:00:00:00:00:02", "rack": "R9",
                                   **({"csrf_token": csrf} if csrf is not None else {})})
    assert r.status_code == 400
    assert env.node("r1-u07").state == "registered"
    with env.sessions() as s:
        assert len(list(s.scalars(select(Node)))) == 2


def test_automation_is_read_only_with_reasons_shown(env: Env) -> None:
    tech = env.client()
    enroll(tech, login(tech))
    host = env.node("r1-u07")
    c, csrf = env.logged_in("automation")
    page = c.get(f"/ui/machines/{host.id}").text
    assert "read-only" in page
    assert re.search(r'<button type="button" class="button" disabled title="your token&#39;s role '
                     r'&#39;automation&#39; is read-only in the UI" data-action="provision"', page)
    assert 'href="/ui/machines/' not in re.sub(r'href="/ui/machines/\d+"', "", page)  # no confirm links
    assert c.get(f"/ui/machines/{host.id}/confirm?node={host.id}&action=provision").status_code == 403
    r = c.post(f"/ui/machines/{host.id}/act", data={"csrf_token": csrf, "node": host.id, "action": "provision"})
    assert r.status_code == 403 and "read-only" in r.text
    r = enroll(c, csrf, host_serial="other", dpu_serial="other2", host_mac="02:00:00:00:00:03",
               dpu_mac="02:00:00:00:00:04", rack="R2")
    assert r.status_code == 403
    assert env.node("r1-u07").state == "registered"


# ------------------------------------------------------------------------------------ enroll


def test_enroll_creates_host_and_dpu_atomically_and_normalises_macs(env: Env) -> None:
    c = env.client()
    r = enroll(c, login(c))
    assert r.status_code == 302 and r.headers["Location"].startswith("/ui/enroll?done=")
    assert "rack=R1" in r.headers["Location"] and "tenant=red" in r.headers["Location"]
    page = c.get(r.headers["Location"]).text
    assert "Enrolled host r1-u07 and DPU r1-u07-dpu." in page
    assert 'value="R1"' in page  # the rack is kept for the next scan
    with env.sessions() as s:
        host = s.scalars(select(Node).where(Node.name == "r1-u07")).one()
        dpu = s.scalars(select(Node).where(Node.name == "r1-u07-dpu")).one()
        assert [(n.mac, n.role) for n in host.nics] == [("aa:bb:cc:00:00:01", "host-pf")]
        assert [(n.mac, n.role) for n in dpu.nics] == [("aa:bb:cc:00:00:02", "oob")]
        assert dpu.host_id == host.id and host.tenant is not None and host.tenant.name == "red"
        assert (host.rack, host.slot, dpu.rack, dpu.slot) == ("R1", 7, "R1", 7)
        assert host.bmc_driver == "fake" and dpu.bmc_address == "fake://d1"
        assert (host.arch, dpu.arch) == ("x86_64", "aarch64")  # the defaults: a BlueField is arm
        evs = list(s.scalars(select(Event).order_by(Event.id)))
        assert [(e.node_id, e.trigger, e.actor) for e in evs] == [(host.id, "enrolled", "ui:t-tech"),
                                                                  (dpu.id, "enrolled", "ui:t-tech")]


def test_enroll_can_start_provisioning(env: Env) -> None:
    c = env.client()
    r = enroll(c, login(c), provision="1")
    assert "Provisioning started" in c.get(r.headers["Location"]).text
    assert env.node("r1-u07").state == State.HOST_WAITING_DPU


@pytest.mark.parametrize(("over", "field", "text"), [
    ({"rack": ""}, "rack", "Type or scan the rack name"),
    ({"rack": "R 1"}, "rack", "Use letters, digits"),
    ({"slot": ""}, "slot", "Type the slot"),
    ({"slot": "1x"}, "slot", "is not a slot number"),
    ({"slot": "1001"}, "slot", "is not a slot number"),
    ({"host_serial": ""}, "host_serial", "Scan the host&#39;s serial number label"),
    ({"host_serial": "b8:3f:d2:00:00:01"}, "host_serial", "looks like a MAC address"),
    ({"host_serial": "x" * 65}, "host_serial", "at most 64"),
    ({"dpu_serial": "HS-0001"}, "dpu_serial", "cannot have the same serial"),
    ({"host_mac": ""}, "host_mac", "Scan the host NIC MAC label"),
    ({"host_mac": "HS-0001"}, "host_mac", "is not a MAC address"),
    ({"host_mac": "aa:bb:cc:00:00:0g"}, "host_mac", "is not a MAC address"),
    ({"dpu_mac": "AA:BB:CC:00:00:01"}, "dpu_mac", "was already scanned above"),
    ({"dpu_bmc_mac": "zz"}, "dpu_bmc_mac", "is not a MAC address"),
    ({"tenant": "green"}, "tenant", "No tenant named"),
    ({"hostname": "Bad_Name"}, "hostname", "lower-case letters"),
    ({"bmc_driver": "ipmi"}, "bmc_driver", "Choose redfish"),
    ({"bmc_credential": "nope"}, "bmc_credential", "No BMC credential named"),
    ({"bmc_driver": "redfish", "host_bmc": "ftp://x/y", "dpu_bmc": ""}, "host_bmc", "type the BMC as an IP"),
    ({"dpu_oob_ip": "10.77.0.300"}, "dpu_oob_ip", "is not an IPv4 address"),
    ({"dpu_oob_ip": "192.0.2.5"}, "dpu_oob_ip", "is not in a Zone 0 (OOB) network (10.77.0.0/24)"),
    ({"dpu_oob_ip": "10.77.0.1"}, "dpu_oob_ip", "is the gateway address of oob"),
    ({"dpu_oob_ip": "10.77.0.2"}, "dpu_oob_ip", "is the boot server address of oob"),
    ({"dpu_oob_ip": "10.77.0.255"}, "dpu_oob_ip", "is the broadcast address of oob"),
    ({"dpu_arch": "mips"}, "dpu_arch", "Choose the DPU CPU architecture: x86_64 or aarch64"),
    ({"host_arch": "arm64"}, "host_arch", "Choose the host CPU architecture"),
])
def test_enroll_error_is_shown_next_to_the_wrong_field(env: Env, over: dict[str, str], field: str,
                                                       text: str) -> None:
    c = env.client()
    r = enroll(c, login(c), **over)
    assert r.status_code == 422
    m = re.search(rf'<p class="field-error" id="e-{field}" role="alert">(.*?)</p>', r.text, re.S) or \
        re.search(r'<p class="field-error" role="alert">(.*?)</p>', r.text, re.S)
    assert m is not None, f"no error next to {field}"
    assert text in m.group(1)
    assert r.text.count('class="field-error"') == 1, "only the wrong field is marked"
    assert "Nothing was enrolled" in r.text
    assert f'id="f-{field}"' in r.text
    with env.sessions() as s:
        assert s.scalars(select(Node)).first() is None


def test_enroll_conflicts_point_at_the_existing_machine(env: Env) -> None:
    c, csrf = env.logged_in()
    enroll(c, csrf)
    host = env.node("r1-u07")
    cases = [
        ({"host_serial": "N1", "dpu_serial": "N2", "slot": "8", "dpu_mac": "02:00:00:00:00:09"}, "host_mac",
         "already belongs to host r1-u07"),
        ({"dpu_serial": "N2", "slot": "8", "host_mac": "02:00:00:00:00:08", "dpu_mac": "02:00:00:00:00:09"},
         "host_serial", "already enrolled as host r1-u07"),
        ({"host_serial": "N1", "dpu_serial": "N2", "host_mac": "02:00:00:00:00:08",
          "dpu_mac": "02:00:00:00:00:09", "hostname": "x1"}, "slot", "already holds host r1-u07"),
        ({"host_serial": "N1", "dpu_serial": "N2", "host_mac": "02:00:00:00:00:08",
          "dpu_mac": "02:00:00:00:00:09", "slot": "9", "hostname": "r1-u07"}, "hostname", "A node named r1-u07"),
    ]
    for over, field, text in cases:
        r = enroll(c, csrf, **over)
        assert r.status_code == 422
        m = re.search(rf'id="e-{field}" role="alert">(.*?)</p>', r.text, re.S)
        assert m and text in m.group(1), (field, r.text[:200])
        assert f'href="/ui/machines/{host.id}">Open it</a>' in m.group(1)
    with env.sessions() as s:
        assert len(list(s.scalars(select(Node)))) == 2


def test_enroll_reserves_the_dpu_oob_address_once(env: Env) -> None:
    """The DPU OOB port's fixed Zone 0 address lands on its NIC (what DHCP hands out); a second machine
    cannot take the same address, and the error links to the machine that holds it."""
    c, csrf = env.logged_in()
    r = enroll(c, csrf, dpu_oob_ip=" 10.77.0.12 ", dpu_arch="x86_64")
    assert r.status_code == 302, r.text
    assert env.node("r1-u07-dpu").arch == "x86_64"  # the lab's DPU VMs are x86
    with env.sessions() as s:
        dpu = s.scalars(select(Node).where(Node.name == "r1-u07-dpu")).one()
        host = s.scalars(select(Node).where(Node.name == "r1-u07")).one()
        assert [(n.role, n.ipv4) for n in dpu.nics] == [("oob", "10.77.0.12")]
        assert [n.ipv4 for n in host.nics] == [None]
    r = enroll(c, csrf, host_serial="N1", dpu_serial="N2", slot="8", host_mac="02:00:00:00:00:08",
               dpu_mac="02:00:00:00:00:09", dpu_oob_ip="10.77.0.12")
    assert r.status_code == 422
    m = re.search(r'id="e-dpu_oob_ip" role="alert">(.*?)</p>', r.text, re.S)
    assert m and "already reserved for dpu r1-u07-dpu" in m.group(1), r.text[:300]
    assert f'href="/ui/machines/{dpu.id}">Open it</a>' in m.group(1)
    assert "<details open" in r.text, "the section holding the wrong field must be open"
    r = enroll(c, csrf, host_serial="N1", dpu_serial="N2", slot="8", host_mac="02:00:00:00:00:08",
               dpu_mac="02:00:00:00:00:09", dpu_oob_ip="")
    assert r.status_code == 302
    assert [n.ipv4 for n in env.node("r1-u08-dpu").nics] == [None]


def test_enroll_error_field_mapping_from_inventory() -> None:
    assert ui.enroll_field("1.nics.0.ipv4") == "dpu_oob_ip"
    assert ui.enroll_field("1.arch") == "dpu_arch"
    assert ui.enroll_field("0.serial") == "host_serial"
    assert ui.enroll_field("1.nics.0.mac") == "dpu_mac"
    assert ui.enroll_field("1.nics") == "dpu_mac"
    assert ui.enroll_field("0.name") == "hostname"
    assert ui.enroll_field("1.host") == "hostname"
    assert ui.enroll_field("tenant") == "tenant"
    assert ui.enroll_field("(record)") == "host_serial"


# ------------------------------------------------------------------------------------ search


@contextlib.contextmanager
def _edit(env: Env, node_id: int) -> Iterator[tuple[Session, Node]]:
    """A database session and the node ``node_id`` in it, to change it behind the UI's back."""
    with env.sessions() as s:
        n = s.get(Node, node_id)
        assert n is not None
        yield s, n


def _act(c: FlaskClient, csrf: str, machine: int, node: int, action: str, **more: str) -> str:
    """Send a machine action as the confirmation form does; the text of the page it redirects to."""
    r = c.post(f"/ui/machines/{machine}/act", data={"csrf_token": csrf, "node": node, "action": action, **more})
    assert r.status_code == 302, r.text
    return c.get(r.headers["Location"]).text


def _seed(env: Env) -> tuple[int, int]:
    with env.sessions() as s:
        host, dpu = inventory.enroll(s, [
            inventory.NodeSpec(name="r2-u03", kind="host", serial="SER-HOST-3", rack="R2", slot=3,
                               nics=[inventory.NicSpec("b8:3f:d2:00:00:03", "host-pf")], bmc_address="fake://h",
                               bmc_driver="fake"),
            inventory.NodeSpec(name="r2-u03-dpu", kind="dpu", serial="SER-DPU-3", rack="R2", slot=3, host="r2-u03",
                               nics=[inventory.NicSpec("b8:3f:d2:00:01:03", "oob", "10.77.0.13")],
                               bmc_address="fake://d", bmc_driver="fake")], actor="test")
        now = dt.datetime.now(dt.UTC)
        s.add(Lease(vrf="red", network="red-hosts", address="10.0.0.103", mac="b8:3f:d2:00:00:03",
                    node_id=host.id, state="bound", expires_at=now + dt.timedelta(hours=1), updated_at=now))
        s.add(Discovered(mac="02:11:22:33:44:55", vendor_class="NVIDIA/BF/PXE", address="10.77.0.150"))
        s.commit()
        return host.id, dpu.id


@pytest.mark.parametrize(("q", "who"), [
    ("B8-3F-D2-00-00-03", "host"), ("b83f.d200.0103", "dpu"), ("10.0.0.103", "host"), ("10.77.0.13", "dpu"),
    ("SER-HOST-3", "host"), ("r2-u03-dpu", "dpu"), ("  SER-DPU-3 ", "dpu"), ("01:03", "dpu"),
])
def test_search_finds_the_machine_by_serial_mac_or_ip(env: Env, q: str, who: str) -> None:
    host_id, dpu_id = _seed(env)
    c, _ = env.logged_in()
    r = c.get("/ui/search", query_string={"q": q})
    assert r.status_code == 302
    assert r.headers["Location"] == f"/ui/machines/{host_id if who == 'host' else dpu_id}"


def test_search_lists_several_and_reports_nothing(env: Env) -> None:
    _seed(env)
    c, _ = env.logged_in()
    r = c.get("/ui/search", query_string={"q": "SER-"})
    assert r.status_code == 200 and r.text.count('<tr>\n    <td><a href="/ui/machines/') == 2
    r = c.get("/ui/search", query_string={"q": "no-such-thing"})
    assert r.status_code == 404 and "Nothing found" in r.text
    r = c.get("/ui/search", query_string={"q": "02-11-22-33-44-55"})
    assert r.status_code == 200 and "Seen on the network but not enrolled" in r.text
    assert "NVIDIA/BF/PXE" in r.text


def test_search_input_is_escaped(env: Env) -> None:
    c, _ = env.logged_in()
    r = c.get("/ui/search", query_string={"q": "<script>alert(1)</script>"})
    assert "<script>alert" not in r.text and "&lt;script&gt;" in r.text


# ------------------------------------------------------------------------------------ machine page and actions


def test_machine_page_shows_host_dpus_lease_error_and_hint(env: Env) -> None:
    host_id, dpu_id = _seed(env)
    with _edit(env, dpu_id) as (s, dpu):
        lifecycle.apply(s, dpu, Trigger.PROVISION, actor="t")
        lifecycle.apply(s, dpu, Trigger.INSTALL_FAILED, actor="t", error="BFB checksum mismatch")
    c, _ = env.logged_in()
    for ident in (host_id, dpu_id):  # a DPU's page is its machine's page
        page = c.get(f"/ui/machines/{ident}").text
        assert "Machine r2-u03" in page
        assert 'data-node-name="r2-u03-dpu" data-state="dpu_install_failed"' in page
        assert "BFB checksum mismatch" in page and "DOCA image exists and verifies" in page
        assert "10.0.0.103" in page and "VRF red" in page
        assert '<li class="step failed">' in page


def test_timeline_marks_only_failures_red(env: Env) -> None:
    """A reason on the happy path is information; only an error, or the reason of a move into a failed
    state, is shown as an alarm. Bytes written read as MB."""
    host_id, dpu_id = _seed(env)
    with _edit(env, dpu_id) as (s, dpu):
        lifecycle.apply(s, dpu, Trigger.PROVISION, actor="t", detail={"reason": "host r2-u03 waits for it"})
        lifecycle.apply(s, dpu, Trigger.INSTALL_STARTED, actor="t")
        lifecycle.apply(s, dpu, Trigger.INSTALL_PROGRESS, actor="t", detail={"phase": "write", "bytes": 195469312})
        lifecycle.apply(s, dpu, Trigger.INSTALL_FAILED, actor="t", detail={"reason": "deadline passed"},
                        error="installer stopped calling back")
    c, _ = env.logged_in()
    page = c.get(f"/ui/machines/{host_id}").text
    assert '<span class="">reason: host r2-u03 waits for it</span>' in page
    assert '<span class="error">reason: deadline passed</span>' in page
    assert '<span class="">bytes: 195 MB</span>' in page


def test_status_json_sends_panels_only_when_changed_and_only_new_events(env: Env) -> None:
    host_id, dpu_id = _seed(env)
    c, _ = env.logged_in()
    first: dict[str, Any] = c.get(f"/ui/machines/{host_id}/status.json").json or {}
    assert first["health"] == "idle" and "panels_html" in first and first["last_event"] > 0
    same: dict[str, Any] = c.get(f"/ui/machines/{host_id}/status.json",
                                 query_string={"sig": first["sig"], "after": first["last_event"]}).json or {}
    assert "panels_html" not in same and same["events_html"] == "" and same["sig"] == first["sig"]
    with _edit(env, dpu_id) as (s, dpu):
        lifecycle.apply(s, dpu, Trigger.PROVISION, actor="t")
    later: dict[str, Any] = c.get(f"/ui/machines/{host_id}/status.json",
                                  query_string={"sig": first["sig"], "after": first["last_event"]}).json or {}
    assert later["sig"] != first["sig"] and "panels_html" in later and later["health"] == "busy"
    assert later["health_text"] == "\u21bb IN PROGRESS"
    assert later["events_html"].count("<tr") == 1 and "DPU BOOTING" in later["events_html"]
    assert [n["state"] for n in later["nodes"]] == ["registered", "dpu_booting"]
    assert later["nodes"][0]["leases"] == [{"address": "10.0.0.103", "vrf": "red", "network": "red-hosts",
                                            "state": "bound"}]


def test_confirmed_transition_applies_through_lifecycle(env: Env) -> None:
    host_id, _ = _seed(env)
    c, csrf = env.logged_in()
    page = c.get(f"/ui/machines/{host_id}/confirm", query_string={"node": host_id, "action": "provision"}).text
    version = re.search(r'name="version" value="(\d+)"', page)
    assert version and "Provision HOST r2-u03?" in page
    text = _act(c, csrf, host_id, host_id, "provision", version=version.group(1))
    assert "REGISTERED \u2192 HOST WAITING DPU" in text
    with env.sessions() as s:
        ev = s.scalars(select(Event).order_by(Event.id.desc())).first()
        assert ev is not None and (ev.trigger, ev.actor, ev.to_state) == ("provision", "ui:t-tech", "host_waiting_dpu")


def test_action_refused_if_node_changed_since_confirmation(env: Env) -> None:
    host_id, _ = _seed(env)
    c, csrf = env.logged_in()
    seen = env.node("r2-u03").version
    with _edit(env, host_id) as (s, n):
        lifecycle.apply(s, n, Trigger.PROVISION, actor="someone-else")
    text = _act(c, csrf, host_id, host_id, "release", version=str(seen))
    assert "changed (now HOST WAITING DPU) after you opened the confirmation" in text
    assert env.node("r2-u03").state == "host_waiting_dpu"


def test_illegal_action_is_explained_not_applied(env: Env) -> None:
    host_id, _ = _seed(env)
    c, csrf = env.logged_in()
    assert c.get(f"/ui/machines/{host_id}/confirm", query_string={"node": host_id, "action": "retry"}).status_code \
        == 409
    text = _act(c, csrf, host_id, host_id, "retry")
    assert "Not done:" in text and "cannot take &#39;retry&#39;" in text
    assert env.node("r2-u03").state == "registered"


def test_power_action_uses_the_driver_and_records_an_event(env: Env) -> None:
    host_id, _ = _seed(env)
    c, csrf = env.logged_in()
    assert "BMC now reports power On" in _act(c, csrf, host_id, host_id, "power_on")
    assert env.fake.power_state() is PowerState.ON and env.fake.calls["power_on"] == 1
    env.fake.fail("power_cycle", RetryableBmcError("connection refused", bmc="fake://h", hint="check the BMC"))
    before = metrics.counters.get("bootsvc_bmc_errors_total", {"op": "power_cycle", "class": "retryable"})
    text = _act(c, csrf, host_id, host_id, "power_cycle")
    assert "flash-error" in text and "connection refused" in text and "check the BMC" in text
    assert metrics.counters.get("bootsvc_bmc_errors_total", {"op": "power_cycle", "class": "retryable"}) == before + 1
    with env.sessions() as s:
        evs = [(e.trigger, e.detail) for e in s.scalars(select(Event).where(Event.node_id == host_id)
                                                         .order_by(Event.id))][1:]
    assert evs[0] == ("power_action", {"action": "on", "power_state": "On"})
    assert evs[1][0] == "power_action" and "connection refused" in evs[1][1]["error"]


def test_power_refused_while_bootsvc_drives_the_node(env: Env) -> None:
    host_id, dpu_id = _seed(env)
    with _edit(env, dpu_id) as (s, dpu):
        lifecycle.apply(s, dpu, Trigger.PROVISION, actor="t")
    c, csrf = env.logged_in()
    page = c.get(f"/ui/machines/{host_id}").text
    assert 'title="bootsvc drives its power while DPU BOOTING: abort first" data-action="power_off"' in page
    assert "bootsvc drives its power now" in _act(c, csrf, host_id, dpu_id, "power_off")
    assert env.fake.calls["power_off"] == 0


def test_rack_view_groups_dpus_with_hosts_and_colours_by_worst(env: Env) -> None:
    _, dpu_id = _seed(env)
    with _edit(env, dpu_id) as (s, dpu):
        lifecycle.apply(s, dpu, Trigger.PROVISION, actor="t")
        lifecycle.apply(s, dpu, Trigger.BMC_ERROR, actor="t", error="refused")
    c, _ = env.logged_in()
    page = c.get("/ui/").text
    slot = re.search(r'<li class="slot h-(\w+)">(.*?)</li>', page, re.S)
    assert slot and slot.group(1) == "fail" and "r2-u03-dpu" in slot.group(2) and "r2-u03" in slot.group(2)
    assert "BMC FAILED" in slot.group(2) and "REGISTERED" in slot.group(2)  # words, not colour alone
    assert c.get("/ui/", query_string={"fragment": "1"}).text.lstrip().startswith("<table")
    assert "r2-u03" in c.get("/ui/", query_string={"problems": "1"}).text
    assert "r2-u03" not in c.get("/ui/", query_string={"rack": "R9"}).text


# ------------------------------------------------------------------------------------ pure helpers


def test_every_state_has_a_health_colour() -> None:
    seen = {ui.health(s.value) for kind in KINDS for s in states_for(kind)}
    assert seen == {"ok", "busy", "wait", "fail", "idle"}
    assert ui.health("deployed") == "ok" and ui.health("policy_applied") == "ok"
    assert ui.health("dpu_installing") == "busy" and ui.health("host_waiting_dpu") == "wait"
    assert ui.health("maintenance") == "wait" and ui.health("host_install_failed") == "fail"
    assert ui.health("registered") == "idle" and ui.health("retired") == "idle"
    assert ui.health("no_such_state") == "fail"
    assert ui.worst(["ok", "busy", "fail"]) == "fail" and ui.worst([]) == "idle"


def test_progress_steps() -> None:
    assert [s.status for s in ui.progress_steps("host", "host_booting")] == ["done", "current", "todo", "todo"]
    assert [s.status for s in ui.progress_steps("host", "deployed")] == ["done"] * 4
    assert [s.status for s in ui.progress_steps("dpu", "dpu_install_failed")][:3] == ["done", "failed", "todo"]
    assert [s.status for s in ui.progress_steps("host", "registered")] == ["todo"] * 4
    assert [s.percent for s in ui.progress_steps("host", "host_installing", 40)] == [None, None, 40, None]


def test_machine_page_shows_install_percent_of_the_current_state_only(env: Env) -> None:
    host_id, dpu_id = _seed(env)
    c, _ = env.logged_in()
    with _edit(env, dpu_id) as (s, dpu):
        for trig in (Trigger.PROVISION, Trigger.INSTALL_STARTED):
            lifecycle.apply(s, dpu, trig, actor="t")
        lifecycle.apply(s, dpu, Trigger.INSTALL_PROGRESS, actor="t", detail={"percent": 35})
        assert '<span class="percent">35%</span>' in c.get(f"/ui/machines/{host_id}").text
        lifecycle.apply(s, dpu, Trigger.INSTALL_PROGRESS, actor="t", detail={"percent": "bogus"})
        assert '<span class="percent">' not in c.get(f"/ui/machines/{host_id}").text
        lifecycle.apply(s, dpu, Trigger.INSTALL_PROGRESS, actor="t", detail={"percent": 70})
        lifecycle.apply(s, dpu, Trigger.INSTALL_FAILED, actor="t")
        lifecycle.apply(s, dpu, Trigger.RETRY, actor="t")
        lifecycle.apply(s, dpu, Trigger.INSTALL_STARTED, actor="t")
    assert '<span class="percent">' not in c.get(f"/ui/machines/{host_id}").text  # 70% was the last attempt's


def test_actions_offered_follow_the_transition_table() -> None:
    acts = {a.key: a for a in ui.actions_for("host", "deployed", has_bmc=True, can_act=True, role="tech")}
    assert {"reprovision", "release", "power_cycle", "maintenance"} <= set(acts)
    assert "provision" not in acts and "retry" not in acts
    assert all(a.enabled for a in acts.values())
    acts = {a.key: a for a in ui.actions_for("dpu", "dpu_installing", has_bmc=False, can_act=True, role="tech")}
    assert acts["abort"].enabled and acts["power_on"].why == "no BMC address enrolled for this node"
    acts = {a.key: a for a in ui.actions_for("dpu", "registered", has_bmc=True, can_act=False, role="automation")}
    assert not any(a.enabled for a in acts.values())
    assert acts["provision"].why == "your token's role 'automation' is read-only in the UI"


def test_group_slots_orders_racks_naturally_top_slot_first(env: Env) -> None:
    with env.sessions() as s:
        specs = []
        for rack, slot in (("R10", 1), ("R2", 1), ("R2", 30), (None, None)):
            n = f"h-{rack or 'x'}-{slot or 0}".lower()
            specs.append(inventory.NodeSpec(name=n, kind="host", serial=n, rack=rack, slot=slot))
        specs.append(inventory.NodeSpec(name="lone-dpu", kind="dpu", serial="lone", rack="R2", slot=5))
        inventory.enroll(s, specs, actor="t")
        grouped = ui.group_slots(list(s.scalars(select(Node))))
    assert list(grouped) == ["R2", "R10", ui.NO_RACK]
    assert [sv.slot for sv in grouped["R2"]] == [30, 5, 1]
    assert grouped["R2"][1].host is None and grouped["R2"][1].dpus[0].name == "lone-dpu"


# ------------------------------------------------------------------------------------ details a tech reads


def test_dpu_panel_shows_the_tenant_it_enforces_for_its_host(env: Env) -> None:
    host_id, _ = _seed(env)
    with _edit(env, host_id) as (s, host):
        host.tenant_id = s.scalars(select(Tenant).where(Tenant.name == "red")).one().id
        s.commit()
    c, _ = env.logged_in()
    page = c.get(f"/ui/machines/{host_id}").text
    dpu_card = re.search(r'data-node-name="r2-u03-dpu".*?</section>', page, re.S)
    assert dpu_card and "red / <span class=\"mono\">red</span>" in dpu_card.group(0)
    assert "enforced for r2-u03" in dpu_card.group(0) and ">none<" not in dpu_card.group(0).split("NICs")[0]


def test_power_on_is_not_the_main_button_on_a_running_machine() -> None:
    running = {a.key: a for a in ui.actions_for("host", "deployed", has_bmc=True, can_act=True, role="tech")}
    assert running["power_on"].primary is False and running["power_cycle"].primary is True
    idle = {a.key: a for a in ui.actions_for("host", "available", has_bmc=True, can_act=True, role="tech")}
    assert idle["power_on"].primary is True


def test_rack_summary_counts_a_rackless_dpu_in_its_hosts_rack(env: Env) -> None:
    with env.sessions() as s:
        inventory.enroll(s, [
            inventory.NodeSpec(name="h1", kind="host", serial="H1", rack="R7", slot=1,
                               nics=[inventory.NicSpec("b8:3f:d2:00:07:01", "host-pf")]),
            inventory.NodeSpec(name="h1-dpu", kind="dpu", serial="D1", host="h1",
                               nics=[inventory.NicSpec("b8:3f:d2:00:07:02", "oob")])], actor="test")
        summary = {r["rack"]: r["total"] for r in ui._rack_summary(s)}
    assert summary == {"R7": 2}  # not {"R7": 1, "(no rack)": 1}
    c, _ = env.logged_in()
    page = c.get("/ui/", query_string={"rack": "R7"}).text
    slot = re.search(r'<li class="slot h-\w+">(.*?)</li>', page, re.S)
    assert slot and "h1-dpu" in slot.group(1)  # drawn with its host when the rack is filtered too


def test_ui_provision_runs_the_same_preflight_as_cli_and_api(env: Env) -> None:
    """A DPU without a BMC cannot be provisioned from the UI either (operations.check_provision)."""
    host_id, dpu_id = _seed(env)
    with _edit(env, dpu_id) as (s, dpu):
        dpu.bmc_address = None
        s.commit()
    c, csrf = env.logged_in()
    text = _act(c, csrf, host_id, dpu_id, "provision")
    assert "flash-error" in text and "Not done: r2-u03-dpu has no BMC" in text
    assert env.node("r2-u03-dpu").state == "registered"


def test_ui_power_counts_bmc_requests_with_the_ui_label(env: Env) -> None:
    host_id, _ = _seed(env)
    c, csrf = env.logged_in()
    before = metrics.counters.get("bootsvc_bmc_requests_total", {"op": "power_on", "via": "ui"})
    c.post(f"/ui/machines/{host_id}/act", data={"csrf_token": csrf, "node": host_id, "action": "power_on"})
    assert metrics.counters.get("bootsvc_bmc_requests_total", {"op": "power_on", "via": "ui"}) == before + 1


def test_machine_page_shows_power_read_on_demand_and_unknown_with_the_reason(env: Env) -> None:
    host_id, _ = _seed(env)
    env.fake.power_on()
    c, _ = env.logged_in()
    page = c.get(f"/ui/machines/{host_id}").text
    assert page.count('data-power="On"') == 2  # host and DPU (the fixture's one fake BMC)
    operations.forget_power()
    env.fake.fail("power_state", RetryableBmcError("connection refused", bmc="fake://h"), times=2)
    page = c.get(f"/ui/machines/{host_id}").text
    assert page.count('data-power="unknown"') == 2 and "the BMC did not answer: connection refused" in page
    calls = env.fake.calls["power_state"]
    c.get(f"/ui/machines/{host_id}/status.json")
    assert env.fake.calls["power_state"] == calls  # cached: a poll every 2 s does not ask the BMC each time


def test_host_callback_events_show_the_hosts_address_not_its_dpus(env: Env) -> None:
    """The DPU masquerades its host's boot traffic, so the callback's recorded source is the DPU's OOB
    address (10.77.0.13 here); the timeline shows the host's lease (10.0.0.103) and the DPU it came through."""
    host_id, dpu_id = _seed(env)
    with _edit(env, host_id) as (s, host):
        lifecycle.record(s, host, "install_progress", actor="installer",
                         detail={"event": "progress", "ip": "10.77.0.13", "percent": 40})
        dpu = s.get(Node, dpu_id)
        assert dpu is not None
        lifecycle.record(s, dpu, "bfcfg_served", actor="boot", detail={"ip": "10.77.0.13"})
    c, _ = env.logged_in()
    page = c.get(f"/ui/machines/{host_id}").text
    assert '<span class="host-ip">10.0.0.103</span> <small class="muted">via r2-u03-dpu 10.77.0.13</small>' in page
    assert page.count('class="host-ip"') == 1  # the DPU's own event keeps its own address
    assert "ip: 10.77.0.13</span>" in page
