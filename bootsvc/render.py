"""What a network-booting node runs next, and the text of it: iPXE scripts, GRUB configs, bf.cfg.

Owns: the decision "node state -> boot action" (install the DPU's DOCA image, install the host's
tenant OS, erase the disks of a node being wiped, boot from local disk, discovery for unknown
machines, or hold-and-retry for nodes that are not ready), the kernel command lines of the
installers and the erase image (BlueField ``bfnet=``/``bfks=`` plus the lab initramfs' ``bootsvc.*``
arguments: mode, callback URL and per-node token), and rendering the templates in
the top-level ``ipxe/`` directory. Pure: no I/O beyond reading the templates once; no database, no
clock. ``bootsvc.web.boot`` (HTTP) and ``bootsvc.tftp`` (GRUB configs over TFTP) call it.

Every value that reaches a script is either built here from validated parts (DNS-label node names,
normalised MACs, hex tokens, catalog names) or checked against a strict character set, so a script
can never be made to run a command nobody wrote (iPXE and GRUB both expand ``${...}``; bf.cfg is
sourced by a shell).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shlex
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2

from bootsvc import resources
from bootsvc.states import State

if TYPE_CHECKING:
    from bootsvc.images import Catalog, Image
    from bootsvc.views import NodeView

TEMPLATES = resources.templates_dir()
RETRY_SECONDS = 15
# Characters that may appear in a URL or kernel argument we put into a script: no whitespace, quotes,
# '$' (iPXE/GRUB/shell expansion), ';', '&' (iPXE/GRUB/shell operators), '|', '\', '`' or '#'.
_SAFE_ARG = re.compile(r"^[A-Za-z0-9._~:/?=+,@%\[\]-]*$")
_SAFE_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_HASH_RE = re.compile(r"^[A-Za-z0-9./$=,*!-]*$")  # crypt(3) output alphabet, or "!" (locked)
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class RenderError(ValueError):
    """A value that must not go into a boot script (or a missing image file)."""


class Action(StrEnum):
    INSTALL_DPU = "dpu-install"
    INSTALL_HOST = "host-install"
    LOCAL = "local"
    DISCOVERY = "discovery"
    HOLD = "hold"
    WIPE = "wipe"  # boot the erase image (catalog ``defaults.wipe``; lab initramfs ``bootsvc.mode=wipe``)


# Actions whose script carries the node's boot token (the image calls back / fetches per-node files).
TOKEN_ACTIONS: frozenset[Action] = frozenset({Action.INSTALL_DPU, Action.INSTALL_HOST, Action.WIPE})
# Actions that boot a kernel + initrd from the catalog (install.* templates; discovery has its own).
_KERNEL_ACTIONS = (Action.INSTALL_DPU, Action.INSTALL_HOST, Action.WIPE, Action.DISCOVERY)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    image: Image | None = None


S = State
_DPU_INSTALL = {S.DPU_BOOTING, S.DPU_INSTALLING}
_HOST_INSTALL = {S.HOST_BOOTING, S.HOST_INSTALLING}
# Nothing to install and the node is not being worked on: let it boot what it has.
_LOCAL = {S.REGISTERED, S.AVAILABLE, S.DPU_REBOOTING, S.DPU_READY, S.POLICY_PENDING, S.POLICY_APPLIED,
          S.POLICY_FAILED, S.DEPLOYED, S.MAINTENANCE, S.RETIRED}
_WHY_HOLD = {
    S.HOST_WAITING_DPU: "its DPU has not applied the tenant policy yet",
    S.BLOCKED_BY_DPU: "its DPU failed; fix the DPU first",
    S.DPU_INSTALL_FAILED: "the last install failed; waiting for a retry",
    S.HOST_INSTALL_FAILED: "the last install failed; waiting for a retry",
    S.BMC_FAILED: "the BMC failed; waiting for a retry",
    S.RELEASING: "being released",
    S.RELEASE_FAILED: "release failed; waiting for a retry",
}


def decide(node: NodeView | None, catalog: Catalog, *, discovery: bool = True) -> Decision:
    """The boot action for ``node`` (None = a MAC nobody enrolled). Never raises."""
    if node is None:
        img = catalog.resolve(None, "discovery")
        if discovery and catalog.usable(img) and img is not None and img.file("kernel") and img.file("initrd"):
            return Decision(Action.DISCOVERY, "unknown machine", img)
        return Decision(Action.LOCAL, "unknown machine and no discovery image")
    try:
        st = State(node.state)
    except ValueError:
        return Decision(Action.HOLD, f"unknown state {node.state!r}")
    if st in _DPU_INSTALL and node.kind == "dpu":
        return _install(Action.INSTALL_DPU, node, catalog, "dpu")
    if st in _HOST_INSTALL and node.kind == "host":
        return _install(Action.INSTALL_HOST, node, catalog, "host")
    if st is S.WIPING:
        return _erase(catalog)
    if st in _LOCAL:
        return Decision(Action.LOCAL, f"state {st.value}: nothing to install")
    return Decision(Action.HOLD, _WHY_HOLD.get(st, f"state {st.value}"))


def _install(action: Action, node: NodeView, catalog: Catalog, default_for: str) -> Decision:
    img = catalog.resolve(node.image, default_for)
    if img is None:
        return Decision(Action.HOLD, f"no image {node.image or '(default ' + default_for + ')'} in the catalog")
    if not catalog.usable(img):
        return Decision(Action.HOLD, f"image {img.ref} failed verification")
    k, i = _kernel_roles(img, node.arch)
    if img.file(k) is None or img.file(i) is None:
        return Decision(Action.HOLD, f"image {img.ref} has no installer kernel/initrd")
    want = {"dpu": ("bfb",), "host": ("host-os", "kernel-initrd")}[default_for]
    if img.kind not in want:
        return Decision(Action.HOLD, f"image {img.ref} is a {img.kind} image, not {'/'.join(want)}")
    return Decision(action, "install", img)


def _erase(catalog: Catalog) -> Decision:
    """The erase image for a node being wiped. Without one the node holds (the conductor fails the
    wipe before it powers the node on, so this is only reached if the catalog changed meanwhile)."""
    img = catalog.resolve(None, "wipe")
    if img is None:
        return Decision(Action.HOLD, "being wiped, but the catalog has no erase image (defaults.wipe)")
    if not catalog.usable(img):
        return Decision(Action.HOLD, f"erase image {img.ref} failed verification")
    if img.file("kernel") is None or img.file("initrd") is None:
        return Decision(Action.HOLD, f"erase image {img.ref} has no kernel/initrd")
    return Decision(Action.WIPE, "erase the disks", img)


def _kernel_roles(img: Image, arch: str) -> tuple[str, str]:
    if arch in ("aarch64", "arm64") and img.file("kernel-arm64") and img.file("initrd-arm64"):
        return "kernel-arm64", "initrd-arm64"
    return "kernel", "initrd"


# ---------------------------------------------------------------- tokens
def boot_token(node_secret: str) -> str:
    """The token in a node's boot URLs and kernel command line, derived from its secret.

    The agent's long-term secret (``bootsvc.auth_secrets.node_secret``) never appears in a URL or on a
    kernel command line (both are visible to anyone on the segment / in /proc/cmdline); it only travels
    in the token-protected bf.cfg body. Rotating the node's secret generation rotates this token too.
    """
    return hmac.new(node_secret.encode(), b"bootsvc-boot-token", hashlib.sha256).hexdigest()


def token_ok(node_secret: str, presented: str | None) -> bool:
    # bytes: compare_digest raises TypeError on a non-ASCII str (a query string may carry one)
    return bool(presented) and hmac.compare_digest(boot_token(node_secret).encode(),
                                                   str(presented).encode("utf-8", "surrogateescape"))


# ---------------------------------------------------------------- context
@dataclass(frozen=True, slots=True)
class BootContext:
    """Everything a rendered script needs besides the decision."""

    base_url: str  # http://host:port as the client reaches bootsvc
    mac: str  # normalised aa:bb:cc:dd:ee:ff
    token: str | None = None  # boot token (only for install actions)
    retry_seconds: int = RETRY_SECONDS
    tftp_server: str = "${net_default_server}"  # GRUB: the PXE next-server

    def __post_init__(self) -> None:
        check_base_url(self.base_url)


def check_base_url(url: str) -> str:
    m = re.match(r"^http://(.+)$", url)
    if not m or not _SAFE_HOST.match(m.group(1)):
        raise RenderError(f"unusable base URL {url!r}")
    return url


def check_host(host: str) -> str:
    """A Host header we can put into a script (host or host:port, nothing else)."""
    if not _SAFE_HOST.match(host):
        raise RenderError(f"unusable Host {host!r}")
    return host


def _arg(v: str) -> str:
    if not _SAFE_ARG.match(v):
        raise RenderError(f"unsafe value for a boot script: {v!r}")
    return v


def _args(text: str) -> str:
    """Catalog kernel args: whitespace-separated words, each from the safe set."""
    return " ".join(_arg(w) for w in text.split())


def kernel_args(decision: Decision, ctx: BootContext, node: NodeView | None) -> str:
    """The installer's command line (without ``initrd=``) for an install/discovery decision."""
    img = decision.image
    if img is None:
        raise RenderError("no image")
    arm = node is not None and _kernel_roles(img, node.arch)[0] == "kernel-arm64"
    words = [str(img.meta.get("args_arm64", img.args)) if arm else img.args]
    b = ctx.base_url
    if decision.action is Action.DISCOVERY:
        words += ["bootsvc.mode=probe", f"bootsvc.cb={b}/boot/discover"]
        return _args(" ".join(w for w in words if w))
    if node is None or ctx.token is None:
        raise RenderError("install needs a node and its token")
    if decision.action is Action.WIPE:
        # the erase policy (bootsvc.wipe=ends|full) comes from the erase image's catalog args
        words += ["bootsvc.mode=wipe", f"bootsvc.cb={b}/boot/callback/{node.name}", f"bootsvc.token={ctx.token}"]
        return _args(" ".join(w for w in words if w))
    if img.kind == "bfb" and decision.action is Action.INSTALL_DPU:
        # bfnet/bfks are the BFB installer's (bfscripts bfpxe): network on the OOB port by DHCP, and a
        # kickstart script that fetches this DPU's bf.cfg (token-protected) to /etc/bf.cfg.
        words += [f"bfnet={img.meta.get('bfnet', 'oob_net0:dhcp')}",
                  f"bfks={b}/boot/bfks/{node.name}?token={ctx.token}"]
    mode = "dpu-install" if decision.action is Action.INSTALL_DPU else "host-install"
    words += [f"bootsvc.mode={mode}", f"bootsvc.cb={b}/boot/callback/{node.name}", f"bootsvc.token={ctx.token}"]
    disk = img.file("image")
    if disk is not None:
        words += [f"bootsvc.image={b}/images/{img.name}/{img.version}/{disk.name}", f"bootsvc.sha256={disk.sha256}"]
    if decision.action is Action.INSTALL_DPU:
        words.append(f"bootsvc.bfcfg={b}/boot/bfcfg/{node.name}?token={ctx.token}")
    return _args(" ".join(w for w in words if w))


# ---------------------------------------------------------------- templates
@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    # auto_reload off: templates are read once per process (no stat() per render)
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=False,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=False, auto_reload=False)


def _tpl(name: str) -> jinja2.Template:
    return _env().get_template(name)


def _common(decision: Decision, ctx: BootContext, node: NodeView | None) -> dict[str, Any]:
    return {
        "node": node.name if node is not None else "unknown",
        "kind": node.kind if node is not None else "unknown",
        "state": node.state if node is not None else "unknown",
        "action": decision.action.value,
        "reason": _text(decision.reason),
        "mac": ctx.mac,
        "image": decision.image.ref if decision.image is not None else "",
        "retry_seconds": int(ctx.retry_seconds),
    }


def _text(s: str) -> str:
    """Free text (a reason) for an echo line: letters, digits and a little punctuation only."""
    return re.sub(r"[^A-Za-z0-9 .,:()/_-]", "", s)[:200]


_INITRD_WORD = re.compile(r"^initrd=([A-Za-z0-9._-]{1,64})$")


def split_initrd_arg(args: str) -> tuple[str, str]:
    """(the initrd's name, the other words). An image's args may name its initrd as the kernel's EFI
    stub will look for it (``initrd=initramfs`` on a BF3, osbuild's ``org.osbuild.bfb`` stage): iPXE
    then registers the initrd under that name (``initrd --name``) and the word is kept once; GRUB
    loads the initrd itself, so the word is dropped there. Default name: ``initrd``."""
    name, rest = "initrd", []
    for w in args.split():
        m = _INITRD_WORD.match(w)
        if m:
            name = m.group(1)
        else:
            rest.append(w)
    return name, " ".join(rest)


def ipxe_script(decision: Decision, ctx: BootContext, node: NodeView | None) -> str:
    v = _common(decision, ctx, node)
    v["self_url"] = _arg(f"{ctx.base_url}/boot/ipxe?mac={ctx.mac}")
    if decision.action in _KERNEL_ACTIONS:
        img = decision.image
        assert img is not None
        k, i = _kernel_roles(img, node.arch if node is not None else "x86_64")
        kf, inf = img.file(k), img.file(i)
        if kf is None or inf is None:
            raise RenderError(f"image {img.ref} has no kernel/initrd")
        v["kernel_url"] = _arg(f"{ctx.base_url}/images/{img.name}/{img.version}/{kf.name}")
        v["initrd_url"] = _arg(f"{ctx.base_url}/images/{img.name}/{img.version}/{inf.name}")
        v["initrd_name"], v["args"] = split_initrd_arg(kernel_args(decision, ctx, node))
        name = "discovery.ipxe.j2" if decision.action is Action.DISCOVERY else "install.ipxe.j2"
    else:
        name = f"{decision.action.value}.ipxe.j2"
    return _tpl(name).render(**v)


def grub_config(decision: Decision, ctx: BootContext, node: NodeView | None, *, http_port: int = 80,
                grub_port: int = 80) -> str:
    """GRUB config for an arm64 client (served over TFTP as ``grub/grub.cfg-<mac>``, or over HTTP).

    Kernel and initrd always come over HTTP (``(http,host)`` device): TFTP carries network boot
    programs only, never a ~1 GB installer initramfs. GRUB's ``http`` module reaches port 80 unless its
    net code parses ``host:port`` in the device name; GRUB 2.06's ``grub_net_open_real``
    (grub-core/net/net.c) takes everything after the comma as the server name, so a port there is
    not understood by the GRUB Debian 12 ships. ``grub_port`` is therefore 80 unless the site says
    (``boot.grub_http_port``) its GRUB takes a port; ``http_port`` (where iPXE and the rest reach
    bootsvc) is accepted for callers and not used here."""
    del http_port
    v = _common(decision, ctx, node)
    host = check_host(ctx.base_url.removeprefix("http://"))
    host = host[: host.index("]") + 1] if host.startswith("[") else host.split(":")[0]
    dev = f"(http,{host})" if grub_port == 80 else f"(http,{host}:{int(grub_port)})"
    v["self_path"] = f"(tftp,{ctx.tftp_server})/grub/grub.cfg-{ctx.mac}"
    if decision.action in _KERNEL_ACTIONS:
        img = decision.image
        assert img is not None
        k, i = _kernel_roles(img, node.arch if node is not None else "aarch64")
        kf, inf = img.file(k), img.file(i)
        if kf is None or inf is None:
            raise RenderError(f"image {img.ref} has no kernel/initrd")
        v["kernel_path"] = f"{dev}/images/{img.name}/{img.version}/{kf.name}"
        v["initrd_path"] = f"{dev}/images/{img.name}/{img.version}/{inf.name}"
        # GRUB word splitting: quote each argument (none contains a quote: _SAFE_ARG); GRUB loads the
        # initrd itself, so an ``initrd=`` word is dropped (split_initrd_arg)
        v["args"] = " ".join(f"'{w}'" for w in split_initrd_arg(kernel_args(decision, ctx, node))[1].split())
        name = "discovery.grub.j2" if decision.action is Action.DISCOVERY else "install.grub.j2"
    else:
        name = f"{decision.action.value}.grub.j2"
    return _tpl(name).render(**v)


@dataclass(frozen=True, slots=True)
class AgentInstall:
    wheel_url: str  # "" = no agent in the catalog
    wheel_sha256: str
    host_port: str = "pf0hpf"
    uplink: str = "p0"


SSH_ROOT_LOGIN = ("no", "prohibit-password", "yes")


def bfcfg(node: NodeView, *, server_url: str, secret: str, password_hash: str, agent: AgentInstall,
          ssh_root_login: str = "no", callbacks: bool = True) -> str:
    """This DPU's bf.cfg (bash, sourced by NVIDIA's installer, bfb-build ``install.sh``).

    * ``ubuntu_PASSWORD`` carries the site's password hash: cloud-init creates the ``ubuntu`` user
      from it at first boot. Root's password is never touched (it stays locked); ``PermitRootLogin``
      is forced to ``ssh_root_login`` (default ``no``) because the installer sets ``yes``.
    * ``bfb_pre_install`` / ``bfb_post_install`` report ``started`` / ``done`` to this node's callback
      URL with its boot token (NVIDIA's installer never calls anyone back); fail-soft: a callback that
      cannot be delivered is logged and the install goes on (the agent's first check-in finishes it).
    * ``bfb_modify_os`` writes the agent config (with the node's secret) and installs the agent.

    ``callbacks=False`` leaves the progress calls out (e.g. a Redfish push where bootsvc is not
    reachable from the installer). The boot token is derived from ``secret`` (:func:`boot_token`)."""
    if ssh_root_login not in SSH_ROOT_LOGIN:
        raise RenderError(f"ssh_root_login must be one of {', '.join(SSH_ROOT_LOGIN)}")
    if not _LABEL_RE.match(node.name):
        raise RenderError(f"node name {node.name!r} is not a DNS label")
    if not _HASH_RE.match(password_hash) or not password_hash:
        raise RenderError("dpu_password_hash has characters a crypt(3) hash never has")
    if not re.fullmatch(r"[0-9a-f]{32,128}", secret):
        raise RenderError("node secret must be hex")
    for v in (agent.host_port, agent.uplink):
        if not _IFNAME_RE.match(v):
            raise RenderError(f"interface name {v!r} is not valid")
    check_base_url(server_url)
    if agent.wheel_url:
        _arg(agent.wheel_url)
        if not re.fullmatch(r"[0-9a-f]{64}", agent.wheel_sha256):
            raise RenderError("agent wheel sha256 must be 64 hex digits")
    serial = re.sub(r"[^A-Za-z0-9._:-]", "", node.serial)[:64]
    q = shlex.quote
    return _tpl("bf.cfg.j2").render(
        node=node.name, node_q=q(node.name), node_id=int(node.id), serial=serial,
        password_hash=q(password_hash), server=q(server_url), server_raw=server_url,
        agent_url=q(agent.wheel_url), agent_sha256=q(agent.wheel_sha256),
        host_port=q(agent.host_port), uplink=q(agent.uplink), host_port_raw=agent.host_port,
        uplink_raw=agent.uplink, secret=secret, ssh_root_login=ssh_root_login,
        callback_url=q(f"{server_url}/boot/callback/{node.name}") if callbacks else "''",
        boot_token=boot_token(secret) if callbacks else "",
    )


def bfks(node: NodeView | str, bfcfg_url: str) -> str:
    """The BlueField kickstart script (``bfks=``): fetch bf.cfg to /etc/bf.cfg. ``node``: its view or
    only its name (all the script names; the boot plane then reads none of the node's NICs)."""
    name = node if isinstance(node, str) else node.name
    return _tpl("bfks.sh.j2").render(node=name, bfcfg_url=shlex.quote(_arg(bfcfg_url)))
