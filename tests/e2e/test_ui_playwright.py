"""The tech's web UI in a real browser: Debian's chromium driven headless by Playwright.

Starts ``bootsvc serve --only http`` (gunicorn, 2 workers: the session cookie must work across
workers) on 127.0.0.1 in 18200-18299 with SQLite in a temp dir, then as a tech would: logs in with a
token, enrolls a machine through the form typing like a barcode scanner (each scan ends with Enter),
watches it progress live while this test drives the lifecycle (the conductor's part: triggers through
``bootsvc.lifecycle``; tests/e2e/test_lab_e2e.py does the flow for real in the QEMU lab), sees a
failure with its hint and retries it, searches by MAC/IP/serial, power-cycles the host through the
confirmation step (fake BMC driver), checks a read-only token sees disabled buttons, and scrapes
/metrics. Screenshots go to ``artifacts/ui/`` (CI artifact folder).

Needs: apt ``chromium`` (/usr/bin/chromium) and pip ``playwright`` (its own browser download is not
used). Skipped when they are missing, except in CI (CI=true) where that is a failure.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from bootsvc import auth_secrets, db, inventory, lifecycle
from bootsvc.models import ApiToken, Base, Lease, Node, Tenant
from bootsvc.states import Trigger

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "ui"
PORTS = range(18200, 18300)
TIMEOUT_MS = 15_000

IN_CI = os.environ.get("CI") == "true"
try:
    from playwright import sync_api as playwright_sync
except ImportError:
    if IN_CI:  # in CI a missing browser stack is a failure, never a silent skip
        raise
    pytest.skip("pip package playwright not installed", allow_module_level=True)
if not Path(CHROMIUM).exists():
    if IN_CI:
        raise RuntimeError(f"{CHROMIUM} missing: CI must `apt-get install chromium`")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)

expect = playwright_sync.expect


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18200-18299")


@dataclass
class Server:
    url: str
    db_url: str
    tokens: dict[str, str]
    workdir: Path

    def session(self) -> Any:
        return db.session_factory(db.make_engine(self.db_url))()


def _wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bootsvc exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} not answering: {last}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("bu-ui")
    port = _free_port()
    db_url = f"sqlite:///{work / 'bootsvc.db'}"
    cfg: dict[str, Any] = {
        "site": {"name": "e2e-lab", "domain": "lab.test"},
        "database": {"url": db_url},
        "state_dir": str(work / "state"),
        "security": {"node_key_ref": f"file:{work / 'node.key'}"},
        "listeners": {"http": [{"address": "127.0.0.1", "port": port}]},
        "tenants": [{"name": "red", "vrf": "red", "l3vni": 5001, "prefixes": ["10.0.0.0/24"]},
                    {"name": "blue", "vrf": "blue", "l3vni": 5002, "prefixes": ["10.0.0.0/24"]}],
        "images": {"catalog": str(work / "catalog.yaml"), "root": str(work / "images")},
        "boot": {"tftp_root": str(work / "tftp")},
    }
    (work / "catalog.yaml").write_text("images: []\n")
    cfg_path = work / "bootsvc.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    engine = db.make_engine(db_url)
    Base.metadata.create_all(engine)
    tokens = {"tech": "bsv_e2e_tech_" + auth_secrets.new_token(),
              "automation": "bsv_e2e_auto_" + auth_secrets.new_token()}
    with db.session_factory(engine)() as s:
        for role, tok in tokens.items():
            s.add(ApiToken(name=f"e2e-{role}", role=role, token_hash=auth_secrets.hash_token(tok)))
        for t in cfg["tenants"]:
            s.add(Tenant(name=t["name"], vrf=t["vrf"], l3vni=t["l3vni"], prefixes=t["prefixes"]))
        s.commit()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTSVC_")}
    env.update(BOOTSVC_HTTP_WORKERS="2", BOOTSVC_HTTP_THREADS="4")
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in the finalizer
    proc = subprocess.Popen([sys.executable, "-m", "bootsvc", "--config", str(cfg_path), "serve", "--only", "http"],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", time.monotonic() + 60, proc)
        yield Server(f"http://127.0.0.1:{port}", db_url, tokens, work)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        if IN_CI:
            SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "serve.log", SHOTS / "serve.log")


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def login(page: Any, server: Server, role: str) -> None:
    page.goto(f"{server.url}/")
    expect(page).to_have_url(f"{server.url}/ui/login?next=/ui/")
    page.fill("#token", server.tokens[role])
    page.click("button[type=submit]")
    expect(page.locator(".role")).to_contain_text(role)


def scan(page: Any, expected_field: str, text: str) -> None:
    """A barcode scanner: types the code, then Enter. The focus must be on the field we expect."""
    assert page.evaluate("document.activeElement.name") == expected_field
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def apply(server: Server, name: str, trigger: Trigger, **kw: Any) -> None:
    """Drive the lifecycle as the conductor/installer/agent would (this is their part of the flow)."""
    with server.session() as s:
        n = s.scalars(select(Node).where(Node.name == name)).one()
        lifecycle.apply(s, n, trigger, actor="e2e-driver", **kw)


def wait_state(page: Any, node_name: str, state: str) -> None:
    """The machine page shows ``state`` for the node without a reload (it polls every 2 s)."""
    card = page.locator(f".node-card[data-node-name='{node_name}']")
    expect(card).to_have_attribute("data-state", state, timeout=TIMEOUT_MS)


def test_tech_enrolls_watches_searches_and_power_cycles(server: Server, browser: Any) -> None:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console_errors: list[str] = []
    # Script errors and CSP violations; the 401/404/422 statuses of pages we expect are not errors here.
    page.on("console", lambda m: console_errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))

    # -- login: a wrong token is refused with a message, the right one gets in
    page.goto(f"{server.url}/")
    page.fill("#token", "not-a-token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    shot(page, "01-login-refused")
    login(page, server, "tech")
    cookies = {c["name"]: c for c in ctx.cookies()}
    assert cookies["bootsvc_ui"]["httpOnly"] and cookies["bootsvc_ui"]["sameSite"] == "Strict"

    # -- enroll as a scanner would; the first try has a mis-scanned MAC (the serial label)
    page.click("text=Enroll")
    page.click("#f-rack")
    scan(page, "rack", "R07")
    scan(page, "slot", "12")
    scan(page, "host_serial", "HX-00412")
    scan(page, "host_mac", "HX-00412")  # wrong label scanned
    scan(page, "dpu_serial", "MT2334X00871")
    scan(page, "dpu_mac", "B8-3F-D2-AA-00-71")
    assert page.evaluate("document.activeElement.name") == "tenant", "Enter must move on, not submit"
    assert page.url.endswith("/ui/enroll")
    page.select_option("#f-tenant", "red")
    page.click("summary")
    page.fill("#f-host_bmc", "fake://r07-u12-host")
    page.fill("#f-dpu_bmc", "fake://r07-u12-dpu")
    page.select_option("#f-bmc_driver", "fake")
    page.click("#enroll-button")
    err = page.locator("#e-host_mac")
    expect(err).to_contain_text("not a MAC address")
    expect(page.locator("#enroll-errors")).to_contain_text("Nothing was enrolled")
    expect(page.locator("#f-host_mac")).to_be_focused()
    shot(page, "02-enroll-field-error")
    with server.session() as s:
        assert s.scalars(select(Node)).first() is None, "a failed enroll must leave nothing behind"
    page.fill("#f-host_mac", "")
    page.keyboard.type("b83f.d2aa.0070")  # Cisco dotted format: accepted and normalised
    expect(page.locator("#f-host_mac ~ .mac-preview")).to_have_text("\u2192 b8:3f:d2:aa:00:70")
    page.click("#enroll-button")
    expect(page.locator(".flash-ok").first).to_contain_text("Enrolled host r07-u12 and DPU r07-u12-dpu")
    expect(page.locator("#f-rack")).to_have_value("R07")
    shot(page, "03-enroll-done")
    with server.session() as s:
        host = s.scalars(select(Node).where(Node.name == "r07-u12")).one()
        assert [n.mac for n in host.nics] == ["b8:3f:d2:aa:00:70"]
        assert [d.name for d in host.dpus] == ["r07-u12-dpu"]
        assert host.tenant is not None and host.tenant.name == "red"

    # -- other machines in other states, so the rack view shows every colour
    with server.session() as s:
        for slot, serial in ((14, "HX-00414"), (16, "HX-00416"), (18, "HX-00418")):
            inventory.enroll(s, [
                inventory.NodeSpec(name=f"r07-u{slot}", kind="host", serial=serial, rack="R07", slot=slot,
                                   tenant="blue", nics=[inventory.NicSpec(f"b8:3f:d2:bb:00:{slot:02x}", "host-pf")]),
                inventory.NodeSpec(name=f"r07-u{slot}-dpu", kind="dpu", serial=f"MT-{serial}", rack="R07",
                                   slot=slot, host=f"r07-u{slot}",
                                   nics=[inventory.NicSpec(f"b8:3f:d2:cc:00:{slot:02x}", "oob")])], actor="e2e")
    apply(server, "r07-u14-dpu", Trigger.PROVISION)
    apply(server, "r07-u14-dpu", Trigger.INSTALL_STARTED)
    apply(server, "r07-u16", Trigger.MAINTENANCE)
    apply(server, "r07-u18-dpu", Trigger.PROVISION)
    apply(server, "r07-u18-dpu", Trigger.BMC_ERROR, error="BMC 10.9.7.18: connection refused")

    page.click("text=Racks")
    slot12 = page.locator(".slot", has=page.locator("text=r07-u12-dpu"))
    expect(slot12).to_have_class("slot h-idle")
    expect(page.locator(".slot", has=page.locator("text=r07-u18-dpu"))).to_have_class("slot h-fail")
    expect(page.locator(".slot", has=page.locator("text=r07-u16-dpu"))).to_have_class("slot h-wait")
    shot(page, "04-rack-view")

    # -- machine page; provision through the confirmation step
    slot12.locator("a").click()
    expect(page.locator("h1")).to_have_text("Machine r07-u12")
    host_card = page.locator("#node-" + str(host.id))
    host_card.locator("a[data-action=provision]").click()
    expect(page.locator("h1")).to_contain_text("Provision HOST r07-u12?")
    page.click("#confirm-button")
    expect(page.locator(".flash-ok")).to_contain_text("REGISTERED \u2192 HOST WAITING DPU")
    wait_state(page, "r07-u12", "host_waiting_dpu")

    # -- the DPU's flow, driven from outside; the page follows live (no reload)
    marker = page.evaluate("window.__noReload = 1")
    assert marker == 1
    apply(server, "r07-u12-dpu", Trigger.PROVISION)
    wait_state(page, "r07-u12-dpu", "dpu_booting")
    apply(server, "r07-u12-dpu", Trigger.INSTALL_STARTED)
    apply(server, "r07-u12-dpu", Trigger.INSTALL_FAILED, error="BFB checksum mismatch (image doca-2.9.1)")
    wait_state(page, "r07-u12-dpu", "dpu_install_failed")
    dpu_card = page.locator(".node-card[data-node-name='r07-u12-dpu']")
    expect(dpu_card.locator(".last-error")).to_have_text("BFB checksum mismatch (image doca-2.9.1)")
    expect(dpu_card.locator(".hint")).to_contain_text("DOCA image exists and verifies")
    expect(page.locator("#machine-health")).to_contain_text("FAILED")
    expect(page.locator("#events tr").first).to_contain_text("install failed")
    assert page.evaluate("window.__noReload") == 1, "the page must update in place"
    shot(page, "05-machine-dpu-failed-hint")

    dpu_card.locator("a[data-action=retry]").click()
    page.click("#confirm-button")
    expect(page.locator(".flash-ok")).to_contain_text("DPU INSTALL FAILED \u2192 DPU BOOTING")
    page.evaluate("window.__noReload = 1")
    apply(server, "r07-u12-dpu", Trigger.INSTALL_STARTED)
    apply(server, "r07-u12-dpu", Trigger.INSTALL_PROGRESS, detail={"percent": 60})
    wait_state(page, "r07-u12-dpu", "dpu_installing")
    expect(dpu_card.locator(".step.current")).to_contain_text("Install 60%")
    shot(page, "06-machine-dpu-installing")
    for trig in (Trigger.INSTALL_DONE, Trigger.AGENT_CHECKIN, Trigger.POLICY_SENT, Trigger.POLICY_APPLIED):
        apply(server, "r07-u12-dpu", trig)
    wait_state(page, "r07-u12-dpu", "policy_applied")
    apply(server, "r07-u12", Trigger.DPU_READY)
    apply(server, "r07-u12", Trigger.INSTALL_STARTED)
    with server.session() as s:  # the host's lease in its tenant VRF, as the DHCP server writes it
        now = dt.datetime.now(dt.UTC)
        s.add(Lease(vrf="red", network="red-hosts", address="10.0.0.105", mac="b8:3f:d2:aa:00:70",
                    node_id=host.id, state="bound", expires_at=now + dt.timedelta(hours=1), updated_at=now))
        s.commit()
    apply(server, "r07-u12", Trigger.INSTALL_DONE)
    wait_state(page, "r07-u12", "deployed")
    expect(page.locator("#machine-health")).to_contain_text("OK")
    expect(host_card.locator(".leases")).to_contain_text("10.0.0.105")
    expect(host_card.locator(".leases")).to_contain_text("VRF red")
    assert page.evaluate("window.__noReload") == 1
    shot(page, "07-machine-deployed")

    # -- search: MAC in another format, IP (lease), serial fragment
    for q in ("B8-3F-D2-AA-00-70", "10.0.0.105", "HX-00412"):
        page.fill("#q", q)
        page.press("#q", "Enter")
        expect(page.locator("h1")).to_have_text("Machine r07-u12")
    page.fill("#q", "HX-004")
    page.press("#q", "Enter")
    expect(page.locator("table.results tbody tr")).to_have_count(7)  # 4 hosts + 3 DPUs "MT-HX-004.."
    shot(page, "08-search-results")
    page.fill("#q", "nothing-like-this")
    page.press("#q", "Enter")
    expect(page.locator("p.error")).to_contain_text("Nothing found")

    # -- power cycle with confirmation (fake BMC driver in the server process)
    page.goto(f"{server.url}/ui/machines/{host.id}")
    host_card.locator("a[data-action=power_cycle]").click()
    expect(page.locator("h1")).to_contain_text("Power cycle HOST r07-u12?")
    expect(page.locator(".confirm")).to_contain_text("Cuts power and turns it back on")
    shot(page, "09-confirm-power-cycle")
    page.click("#confirm-button")
    expect(page.locator(".flash-ok")).to_contain_text("Power cycle done")
    # the machine page reads power through operations.power_statuses (a fake BMC here): shown per node
    expect(host_card.locator("dd.power-state")).to_have_attribute("data-power", "On")
    expect(page.locator("#events tr").first).to_contain_text("power action")
    shot(page, "10-power-cycled")
    assert not console_errors, console_errors
    ctx.close()

    # -- a read-only token: sees everything, every button disabled with the reason
    ro = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ro.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    login(page, server, "automation")
    page.goto(f"{server.url}/ui/machines/{host.id}")
    btn = page.locator(f"#node-{host.id} button[data-action=power_cycle]")
    expect(btn).to_be_disabled()
    expect(btn).to_have_attribute("title", "your token's role 'automation' is read-only in the UI")
    shot(page, "11-read-only")
    ro.close()

    # -- metrics: the state gauges reflect what the UI shows
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'bootsvc_nodes{kind="host",state="deployed"} 1' in text
    assert 'bootsvc_nodes{kind="dpu",state="bmc_failed"} 1' in text
    assert 'bootsvc_leases{network="red-hosts",state="bound",vrf="red"} 1' in text
