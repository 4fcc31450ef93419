"""bootsvc.render: state -> boot action, and every template renders to a script its consumer accepts
(iPXE: a syntax check of the subset we use; GRUB: grub-script-check; bf.cfg: bash -n and sh -n)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.httpd import LoopbackHttpd, QuietHandler

from bootsvc import images as im
from bootsvc import render
from bootsvc.inventory import NicView, NodeView
from bootsvc.render import Action
from bootsvc.states import State

SHA = "a" * 64
SECRET = "0123456789abcdef" * 4


def _node(kind: str = "dpu", state: str = "dpu_booting", arch: str = "aarch64", name: str = "dpu-r1-s1",
          image: str | None = None) -> NodeView:
    return NodeView(id=7, name=name, kind=kind, serial="SN-1", state=state, arch=arch, vendor=None, model=None,
                    rack=None, slot=None, tenant=None, host_id=None, dpu_ids=(),
                    nics=(NicView("52:54:00:00:00:07", "oob", None),), bmc_address=None, bmc_driver="redfish",
                    bmc_credential_ref=None, bmc_verify_tls=True, provision_method="pxe", image=image,
                    secret_generation=1, deadline=None, attempts=0, last_error=None, hint=None, version=1)


def _img(name: str, kind: str, roles: tuple[str, ...], args: str = "console=ttyS0", **meta: object) -> im.Image:
    files = tuple(im.ImageFile(r, f"{r}.bin" if r != "initrd-arm64" else "initrd-arm64.gz", Path(f"/x/{r}"), SHA)
                  for r in roles)
    return im.Image(name, "1", kind, files, args, dict(meta))


CAT = im.Catalog(
    images=(
        _img("doca", "bfb", ("kernel", "initrd", "image", "kernel-arm64", "initrd-arm64"),
             args_arm64="console=ttyAMA0", bfnet="oob_net0:dhcp"),
        _img("os", "host-os", ("kernel", "initrd", "image")),
        _img("disc", "kernel-initrd", ("kernel", "initrd")),
        _img("nokernel", "bfb", ("bfb",)),
    ),
    defaults={"dpu": "doca", "host": "os", "discovery": "disc"},
)
CTX = render.BootContext("http://10.77.0.1:8080", "52:54:00:00:00:07", token="f" * 64)


# ---------------------------------------------------------------- decisions
@pytest.mark.parametrize(("kind", "state", "action"), [
    ("dpu", "dpu_booting", Action.INSTALL_DPU),
    ("dpu", "dpu_installing", Action.INSTALL_DPU),
    ("dpu", "dpu_rebooting", Action.LOCAL),
    ("dpu", "policy_applied", Action.LOCAL),
    ("dpu", "registered", Action.LOCAL),
    ("dpu", "dpu_install_failed", Action.HOLD),
    ("dpu", "bmc_failed", Action.HOLD),
    ("host", "host_waiting_dpu", Action.HOLD),
    ("host", "blocked_by_dpu", Action.HOLD),
    ("host", "host_booting", Action.INSTALL_HOST),
    ("host", "host_installing", Action.INSTALL_HOST),
    ("host", "deployed", Action.LOCAL),
    ("host", "releasing", Action.HOLD),
])
def test_decide_by_state(kind: str, state: str, action: Action) -> None:
    d = render.decide(_node(kind, state), CAT)
    assert d.action is action, d
    if action is Action.INSTALL_DPU:
        assert d.image is not None and d.image.name == "doca"
    if action is Action.INSTALL_HOST:
        assert d.image is not None and d.image.name == "os"


def test_every_state_has_a_decision() -> None:
    for st in State:
        for kind in ("dpu", "host"):
            assert render.decide(_node(kind, st.value), CAT).action in Action


def test_unknown_mac_discovery_or_local() -> None:
    assert render.decide(None, CAT).action is Action.DISCOVERY
    assert render.decide(None, CAT, discovery=False).action is Action.LOCAL
    assert render.decide(None, im.Catalog()).action is Action.LOCAL


def test_missing_bad_or_wrong_images_hold() -> None:
    assert render.decide(_node(image="nope"), CAT).action is Action.HOLD
    assert render.decide(_node(image="nokernel"), CAT).action is Action.HOLD
    assert render.decide(_node(image="os"), CAT).action is Action.HOLD  # a host OS is not a DPU image
    bad = replace(CAT, bad=frozenset({"doca:1"}))
    d = render.decide(_node(), bad)
    assert d.action is Action.HOLD and "verification" in d.reason


# ---------------------------------------------------------------- iPXE
IPXE_COMMANDS = {"echo", "kernel", "initrd", "boot", "chain", "sleep", "goto", "iseq", "isset", "exit", "sanboot",
                 "imgfetch", "imgfree", "dhcp"}


def check_ipxe(script: str) -> None:
    """Syntax of the iPXE subset our templates use: shebang, known commands, labels, ${} balance."""
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    labels = {ln[1:] for ln in lines if ln.startswith(":")}
    for ln in lines[1:]:
        if not ln.strip() or ln.startswith("#") or ln.startswith(":"):
            continue
        assert ln.count("${") == ln.count("}"), ln
        for part in re.split(r"\s*(?:&&|\|\|)\s*", ln):
            if not part:
                continue
            cmd = part.split()[0]
            assert cmd in IPXE_COMMANDS, f"unknown iPXE command {cmd!r} in {ln!r}"
            if cmd == "goto":
                assert part.split()[1] in labels, ln
        assert "$(" not in ln and "`" not in ln and ";" not in ln


@pytest.mark.parametrize("decision", [
    render.decide(_node("dpu", "dpu_booting", arch="x86_64"), CAT),
    render.decide(_node("host", "host_booting", arch="x86_64"), CAT),
    render.decide(_node("dpu", "policy_applied"), CAT),
    render.decide(_node("host", "host_waiting_dpu"), CAT),
    render.decide(None, CAT),
], ids=lambda d: d.action.value)
def test_ipxe_templates_render_valid(decision: render.Decision) -> None:
    node = None if decision.action is Action.DISCOVERY else _node(
        "dpu" if decision.action is Action.INSTALL_DPU else "host", arch="x86_64")
    s = render.ipxe_script(decision, CTX, node)
    check_ipxe(s)
    assert f"chain --autofree --replace http://10.77.0.1:8080/boot/ipxe?mac={CTX.mac}" in s or \
        decision.action is Action.LOCAL


def test_dpu_install_cmdline() -> None:
    node = _node("dpu", "dpu_booting", arch="x86_64")
    s = render.ipxe_script(render.decide(node, CAT), CTX, node)
    kernel = next(ln for ln in s.splitlines() if ln.startswith("kernel "))
    assert kernel.startswith("kernel http://10.77.0.1:8080/images/doca/1/kernel.bin initrd=initrd console=ttyS0 ")
    for want in ("bfnet=oob_net0:dhcp", f"bfks=http://10.77.0.1:8080/boot/bfks/dpu-r1-s1?token={'f' * 64}",
                 "bootsvc.mode=dpu-install", "bootsvc.cb=http://10.77.0.1:8080/boot/callback/dpu-r1-s1",
                 f"bootsvc.token={'f' * 64}", "bootsvc.image=http://10.77.0.1:8080/images/doca/1/image.bin",
                 f"bootsvc.sha256={SHA}", "bootsvc.bfcfg=http://10.77.0.1:8080/boot/bfcfg/dpu-r1-s1?token="):
        assert want in kernel, want
    assert "initrd --name initrd http://10.77.0.1:8080/images/doca/1/initrd.bin" in s


def test_host_install_has_no_bfcfg() -> None:
    node = _node("host", "host_booting", arch="x86_64")
    s = render.ipxe_script(render.decide(node, CAT), CTX, node)
    assert "bootsvc.mode=host-install" in s and "bfks=" not in s and "bfcfg" not in s


def test_local_and_hold_carry_no_token() -> None:
    for st in ("policy_applied", "dpu_install_failed"):
        s = render.ipxe_script(render.decide(_node(state=st), CAT), CTX, _node(state=st))
        assert "f" * 64 not in s
    assert "sanboot --no-describe --drive 0x80" in render.ipxe_script(
        render.decide(_node(state="policy_applied"), CAT), CTX, _node())


def test_hostile_values_refused() -> None:
    with pytest.raises(render.RenderError):
        render.BootContext("http://evil;shell", "52:54:00:00:00:07")
    with pytest.raises(render.RenderError):
        render.check_host("a b")
    with pytest.raises(render.RenderError):
        render.check_host("x${y}")
    evil = replace(CAT, images=(_img("doca", "bfb", ("kernel", "initrd"), args="a;reboot"),))
    node = _node("dpu", arch="x86_64")
    with pytest.raises(render.RenderError):
        render.ipxe_script(render.decide(node, evil), CTX, node)


# ---------------------------------------------------------------- GRUB
@pytest.mark.skipif(shutil.which("grub-script-check") is None, reason="grub-common not installed")
@pytest.mark.parametrize("state", ["dpu_booting", "policy_applied", "dpu_install_failed"])
def test_grub_configs_pass_grub_script_check(state: str, tmp_path: Path) -> None:
    node = _node("dpu", state)
    ctx = render.BootContext("http://10.77.0.1:8080", node.nics[0].mac, token="f" * 64)
    cfg = render.grub_config(render.decide(node, CAT), ctx, node, http_port=8080)
    p = tmp_path / "grub.cfg"
    p.write_text(cfg)
    r = subprocess.run(["grub-script-check", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + cfg
    if state == "dpu_booting":
        assert "linux (http,10.77.0.1)/images/doca/1/kernel-arm64.bin 'console=ttyAMA0'" in cfg
        assert "initrd (http,10.77.0.1)/images/doca/1/initrd-arm64.gz" in cfg
        assert "(tftp," not in cfg.split("configfile")[0]


def test_grub_uses_http_on_port_80() -> None:
    node = _node("dpu")
    ctx = render.BootContext("http://10.77.0.1", node.nics[0].mac, token="f" * 64)
    cfg = render.grub_config(render.decide(node, CAT), ctx, node, http_port=80)
    assert "linux (http,10.77.0.1)/images/doca/1/kernel-arm64.bin" in cfg


# ---------------------------------------------------------------- bf.cfg
AGENT = render.AgentInstall("http://10.77.0.1:8080/images/agent/1/a.whl", SHA, "pf0hpf", "p0")


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_bfcfg_parses(shell: str, tmp_path: Path) -> None:
    cfg = render.bfcfg(_node(), server_url="http://10.77.0.1:8080", secret=SECRET,
                       password_hash="$6$salt$abcdefghijklmnopqrstuvwxyz./ABCDEFG", agent=AGENT)
    p = tmp_path / "bf.cfg"
    p.write_text(cfg)
    r = subprocess.run([shell, "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ubuntu_PASSWORD='$6$salt$abcdefghijklmnopqrstuvwxyz./ABCDEFG'" in cfg
    assert f"secret = {SECRET}" in cfg and "node = dpu-r1-s1" in cfg
    assert "bfb_modify_os()" in cfg and "bfb_post_install()" in cfg


def test_bfcfg_modify_os_writes_config_and_agent(tmp_path: Path) -> None:
    """Run bfb_modify_os against a fake /mnt (paths rewritten into tmp) with a fake wget."""
    import hashlib
    import zipfile

    whl = tmp_path / "a.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("bootsvc/agent/main.py", "print('agent')\n")
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    agent = render.AgentInstall("http://10.77.0.1:8080/images/agent/1/a.whl", sha, "eth1", "eth0")
    cfg = render.bfcfg(_node(), server_url="http://10.77.0.1:8080", secret=SECRET, password_hash="!", agent=agent,
                       callbacks=False)
    mnt = tmp_path / "mnt"
    (mnt / "etc").mkdir(parents=True)
    (mnt / "etc" / "bootsvc-lab" / "rc.d").mkdir(parents=True)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "wget").write_text(f"#!/bin/sh\n# wget -q -O FILE URL\ncp {whl} \"$3\"\n")
    (fake / "wget").chmod(0o755)
    script = cfg.replace("/mnt/", f"{mnt}/").replace("/tmp/bootsvc-agent.whl", f"{tmp_path}/dl.whl")
    (tmp_path / "bf.cfg").write_text(script)
    if shutil.which("unzip") is None:
        pytest.skip("unzip not installed")
    r = subprocess.run(["bash", "-c", f". {tmp_path}/bf.cfg && bfb_modify_os"], capture_output=True, text=True,
                       env={"PATH": f"{fake}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    conf = (mnt / "etc" / "bootsvc-agent" / "agent.conf").read_text()
    assert f"secret = {SECRET}" in conf and "host_port = eth1" in conf and "url = http://10.77.0.1:8080" in conf
    assert oct((mnt / "etc" / "bootsvc-agent" / "agent.conf").stat().st_mode & 0o777) == "0o600"
    assert (mnt / "opt" / "bootsvc-agent" / "lib" / "bootsvc" / "agent" / "main.py").exists()
    assert (mnt / "etc" / "hostname").read_text().strip() == "dpu-r1-s1"
    assert (mnt / "etc" / "bootsvc-lab" / "rc.d" / "bootsvc-agent").is_symlink()


def test_bfcfg_refuses_bad_inputs() -> None:
    kw = {"server_url": "http://10.77.0.1:8080", "secret": SECRET, "password_hash": "!", "agent": AGENT}
    with pytest.raises(render.RenderError):
        render.bfcfg(_node(), **{**kw, "password_hash": "x'; reboot; '"})  # type: ignore[arg-type]
    with pytest.raises(render.RenderError):
        render.bfcfg(_node(), **{**kw, "secret": "not hex"})  # type: ignore[arg-type]
    with pytest.raises(render.RenderError):
        render.bfcfg(_node(), **{**kw, "agent": render.AgentInstall("", "", "eth0; reboot", "p0")})  # type: ignore[arg-type]
    with pytest.raises(render.RenderError):
        render.bfcfg(_node(name="Bad_Name"), **kw)  # type: ignore[arg-type]


def test_bfks_is_valid_shell(tmp_path: Path) -> None:
    s = render.bfks(_node(), "http://10.77.0.1:8080/boot/bfcfg/dpu-r1-s1?token=abc")
    (tmp_path / "ks").write_text(s)
    assert subprocess.run(["sh", "-n", str(tmp_path / "ks")]).returncode == 0
    assert "'http://10.77.0.1:8080/boot/bfcfg/dpu-r1-s1?token=abc'" in s


def test_boot_token_is_derived_not_the_secret() -> None:
    t = render.boot_token(SECRET)
    assert t != SECRET and len(t) == 64
    assert render.token_ok(SECRET, t)
    assert not render.token_ok(SECRET, SECRET)
    assert not render.token_ok(SECRET, None)
    assert not render.token_ok("1" * 64, t)


# ---------------------------------------------------------------- the erase image (release -> wiping)
WIPE_CAT = replace(CAT, images=(*CAT.images, _img("erase", "kernel-initrd", ("kernel", "initrd"),
                                                  args="console=ttyS0 bootsvc.wipe=ends")),
                   defaults={**CAT.defaults, "wipe": "erase"})


@pytest.mark.parametrize("kind", ["dpu", "host"])
def test_wiping_boots_the_erase_image_with_the_token(kind: str) -> None:
    node = _node(kind, "wiping", arch="x86_64", name="n-1")
    d = render.decide(node, WIPE_CAT)
    assert d.action is Action.WIPE and d.image is not None and d.image.name == "erase"
    assert Action.WIPE in render.TOKEN_ACTIONS
    s = render.ipxe_script(d, CTX, node)
    check_ipxe(s)
    kernel = next(ln for ln in s.splitlines() if ln.startswith("kernel "))
    assert kernel.split()[1:4] == ["http://10.77.0.1:8080/images/erase/1/kernel.bin", "initrd=initrd",
                                   "console=ttyS0"]
    for want in ("bootsvc.wipe=ends", "bootsvc.mode=wipe", "bootsvc.cb=http://10.77.0.1:8080/boot/callback/n-1",
                 f"bootsvc.token={'f' * 64}"):
        assert want in kernel.split(), want
    # an erase image installs nothing and fetches no per-node files
    assert "bootsvc.image=" not in s and "bfcfg" not in s and "bfks=" not in s
    assert "initrd --name initrd http://10.77.0.1:8080/images/erase/1/initrd.bin" in s
    with pytest.raises(render.RenderError):  # never without the node's token
        render.ipxe_script(d, replace(CTX, token=None), node)


def test_wiping_without_a_usable_erase_image_holds() -> None:
    node = _node("host", "wiping", arch="x86_64")
    d = render.decide(node, CAT)  # no defaults.wipe
    assert d.action is Action.HOLD and "no erase image" in d.reason
    nokernel = replace(WIPE_CAT, images=(*CAT.images, _img("erase", "kernel-initrd", ("kernel",))))
    assert render.decide(node, nokernel).action is Action.HOLD
    bad = replace(WIPE_CAT, bad=frozenset({"erase:1"}))
    assert render.decide(node, bad).action is Action.HOLD
    assert "f" * 64 not in render.ipxe_script(d, CTX, node)
    # releasing (power off first) still holds: the erase image boots only once the node is wiping
    assert render.decide(_node("host", "releasing"), WIPE_CAT).action is Action.HOLD
    assert render.decide(_node("host", "available"), WIPE_CAT).action is Action.LOCAL


@pytest.mark.skipif(shutil.which("grub-script-check") is None, reason="grub-common not installed")
def test_wiping_grub_config_for_arm64(tmp_path: Path) -> None:
    node = _node("dpu", "wiping")
    cat = replace(WIPE_CAT, images=(*CAT.images, _img("erase", "kernel-initrd",
                                                      ("kernel", "initrd", "kernel-arm64", "initrd-arm64"),
                                                      args_arm64="console=ttyAMA0 bootsvc.wipe=full")))
    ctx = render.BootContext("http://10.77.0.1:8080", node.nics[0].mac, token="f" * 64)
    cfg = render.grub_config(render.decide(node, cat), ctx, node, http_port=8080)
    p = tmp_path / "grub.cfg"
    p.write_text(cfg)
    r = subprocess.run(["grub-script-check", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + cfg
    assert "linux (http,10.77.0.1)/images/erase/1/kernel-arm64.bin 'console=ttyAMA0' " \
           "'bootsvc.wipe=full' 'bootsvc.mode=wipe'" in cfg
    assert f"'bootsvc.token={'f' * 64}'" in cfg


# ---------------------------------------------------------------- the installer contract (NVIDIA's hooks)
class _Recorder:
    """A loopback HTTP server recording POSTs (the callback endpoint as the hooks see it)."""

    def __init__(self, status: int = 200) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        rec = self

        class H(QuietHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                rec.got.append((self.path, dict(self.headers.items()), self.rfile.read(n)))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.srv = LoopbackHttpd(H)
        self.url = self.srv.url

    def close(self) -> None:
        self.srv.close()


def _hook(cfg: str, tmp_path: Path, hook: str, mnt: Path | None = None) -> subprocess.CompletedProcess[str]:
    script = cfg.replace("/mnt/", f"{mnt}/") if mnt is not None else cfg
    script = script.replace("rm -f /etc/bf.cfg /tmp/bf.cfg", "true")
    (tmp_path / "bf.cfg").write_text(script)
    return subprocess.run(["bash", "-c", f"set -e; . {tmp_path}/bf.cfg && {hook}"], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_pre_and_post_install_report_to_the_callback_with_the_token(tmp_path: Path) -> None:
    import json

    rec = _Recorder()
    try:
        cfg = render.bfcfg(_node(), server_url=rec.url, secret=SECRET, password_hash="!", agent=AGENT)
        assert _hook(cfg, tmp_path, "bfb_pre_install").returncode == 0
        assert _hook(cfg, tmp_path, "bfb_post_install").returncode == 0
    finally:
        rec.close()
    assert [(p, json.loads(b)["event"]) for p, _h, b in rec.got] == [
        ("/boot/callback/dpu-r1-s1", "started"), ("/boot/callback/dpu-r1-s1", "done")]
    for _p, h, _b in rec.got:
        assert h["Authorization"] == f"Bearer {render.boot_token(SECRET)}"
        assert h["Content-Type"] == "application/json"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_callbacks_are_fail_soft(tmp_path: Path) -> None:
    """bootsvc down (nothing listens) or refusing (500): the hooks still succeed under set -e."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = render.bfcfg(_node(), server_url=f"http://127.0.0.1:{port}", secret=SECRET, password_hash="!", agent=AGENT)
    r = _hook(cfg, tmp_path, "bfb_pre_install && bfb_post_install && echo finished")
    assert r.returncode == 0 and "finished" in r.stdout and "not delivered" in r.stdout
    rec = _Recorder(status=500)
    try:
        cfg = render.bfcfg(_node(), server_url=rec.url, secret=SECRET, password_hash="!", agent=AGENT)
        r = _hook(cfg, tmp_path, "bfb_post_install && echo finished")
    finally:
        rec.close()
    assert r.returncode == 0 and "finished" in r.stdout and rec.got


def test_callbacks_can_be_left_out() -> None:
    cfg = render.bfcfg(_node(), server_url="http://10.77.0.1:8080", secret=SECRET, password_hash="!", agent=AGENT,
                       callbacks=False)
    assert "BOOTSVC_CALLBACK=''" in cfg and render.boot_token(SECRET) not in cfg


def _fake_root(tmp_path: Path) -> Path:
    mnt = tmp_path / "mnt"
    (mnt / "etc" / "ssh").mkdir(parents=True)
    # a real BFB's root at bfb_modify_os time: no "ubuntu" line yet (cloud-init makes it at first boot)
    (mnt / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    (mnt / "etc" / "ssh" / "sshd_config").write_text("Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin yes\n")
    return mnt


def _modify_os(tmp_path: Path, **kw: str) -> Path:
    mnt = _fake_root(tmp_path)
    cfg = render.bfcfg(_node(), server_url="http://127.0.0.1:9", secret=SECRET,
                       password_hash="$6$salt$abcdefghijklmnopqrstuvwxyz./ABCDEFG",
                       agent=render.AgentInstall("", "", "pf0hpf", "p0"), callbacks=False, **kw)
    r = _hook(cfg, tmp_path, "bfb_modify_os", mnt)
    assert r.returncode == 0, r.stdout + r.stderr
    return mnt


def test_modify_os_never_gives_root_a_password_and_turns_root_ssh_off(tmp_path: Path) -> None:
    mnt = _modify_os(tmp_path)
    assert (mnt / "etc" / "shadow").read_text().startswith("root:*:")  # untouched: root stays locked
    assert (mnt / "etc" / "ssh" / "sshd_config.d" / "50-bootsvc.conf").read_text().strip() == "PermitRootLogin no"
    assert "PermitRootLogin yes" not in (mnt / "etc" / "ssh" / "sshd_config").read_text()


def test_site_may_allow_root_ssh_by_key(tmp_path: Path) -> None:
    mnt = _modify_os(tmp_path, ssh_root_login="prohibit-password")
    assert "PermitRootLogin prohibit-password" in (mnt / "etc" / "ssh" / "sshd_config").read_text()
    with pytest.raises(render.RenderError):
        render.bfcfg(_node(), server_url="http://127.0.0.1:9", secret=SECRET, password_hash="!", agent=AGENT,
                     ssh_root_login="yes; reboot")


def test_bf3_initrd_name_is_kept_for_ipxe_and_dropped_for_grub() -> None:
    bf3 = im.Image("bf", "1", "bfb", tuple(im.ImageFile(r, n, Path(f"/x/{n}"), SHA) for r, n in (
        ("bfb", "bf.bfb"), ("kernel", "dump-image-v0"), ("initrd", "dump-initramfs-v0"))), im.BF3_ARGS)
    cat = im.Catalog((bf3,), {"dpu": "bf"})
    node = _node()
    s = render.ipxe_script(render.decide(node, cat), CTX, node)
    assert "kernel http://10.77.0.1:8080/images/bf/1/dump-image-v0 initrd=initramfs console=hvc0 console=ttyAMA0 " \
           "earlycon=pl011,0x13010000 bfnet=oob_net0:dhcp bfks=" in s
    assert s.count("initrd=") == 1
    assert "initrd --name initramfs http://10.77.0.1:8080/images/bf/1/dump-initramfs-v0" in s
    g = render.grub_config(render.decide(node, cat), CTX, node, http_port=8080)
    assert "linux (http,10.77.0.1)/images/bf/1/dump-image-v0 'console=hvc0'" in g and "initrd=" not in g
    assert "initrd (http,10.77.0.1)/images/bf/1/dump-initramfs-v0" in g


def test_grub_port_in_the_device_when_the_site_says_its_grub_takes_one() -> None:
    node = _node()
    g = render.grub_config(render.decide(node, CAT), CTX, node, http_port=8080, grub_port=8080)
    assert "linux (http,10.77.0.1:8080)/images/doca/1/kernel-arm64.bin" in g
