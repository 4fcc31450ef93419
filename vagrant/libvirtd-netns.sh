#!/bin/bash
# Start (up) or stop (down) a private libvirtd inside a network namespace, without systemd.
#
#   vagrant/libvirtd-netns.sh up   NS WORK   # creates NS with bridges <p>oob0/<p>host0, starts libvirtd
#   vagrant/libvirtd-netns.sh down NS WORK   # destroys leftover domains, stops libvirtd by PID, deletes NS
#
# Why this shape (measured recipe: /work/shared/docs/lab.md section 6, "libvirt works without systemd"):
# * libvirtd runs under `ip netns exec NS`, so every QEMU it spawns is inside NS and its taps can only
#   join NS's bridges: nothing the VMs send (DHCP, PXE) can reach a real interface.
# * `ip netns exec` bind-mounts /etc/netns/NS/* over /etc/*, so the libvirt config lives in
#   /etc/netns/NS/libvirt and the machine's /etc/libvirt stays untouched.
# * The socket is in WORK (unix_sock_dir), not /run/libvirt: clients use
#   qemu:///system?socket=WORK/run/libvirt-sock, and a second lab can run next to this one.
# * qemu.conf: no cgroups and no per-VM mount namespaces (`ip netns exec` remounts /sys, so no cgroup
#   tree is visible), no security driver, no virtlogd (stdio_handler=file).
# * libvirt checks its compiled-in default user "libvirt-qemu" before it reads qemu.conf; Debian
#   creates it in libvirt-daemon-system, which we do not install (service units, a NAT network).
# * vagrant-libvirt wants a storage pool named "default" for the VMs' disks: a dir pool in WORK.
set -euo pipefail
cmd=${1:?up|down}; NS=${2:?namespace}; WORK=${3:?work dir}
WORK=$(realpath -m "$WORK")
SOCK="$WORK/run/libvirt-sock"
URI="qemu:///system?socket=$SOCK"
BR_OOB=${BOOTSVC_VAGRANT_BR_OOB:-vgoob0}
BR_HOST=${BOOTSVC_VAGRANT_BR_HOST:-vghost0}

case "$cmd" in
up)
  mkdir -p "$WORK"/{run,logs,pool,nvram} "/etc/netns/$NS/libvirt"
  getent passwd libvirt-qemu >/dev/null || \
    useradd --system --no-create-home --shell /usr/sbin/nologin --user-group libvirt-qemu
  [ -e "/run/netns/$NS" ] || ip netns add "$NS"
  ip -n "$NS" link set lo up
  for br in "$BR_OOB" "$BR_HOST"; do
    ip -n "$NS" link show "$br" >/dev/null 2>&1 || ip -n "$NS" link add "$br" type bridge
    ip -n "$NS" link set "$br" up
  done
  ip -n "$NS" addr replace 10.77.0.1/24 dev "$BR_OOB"
  # the host segment only switches frames (as the QEMU lab's bx<N>hb): no address, no IPv6 of its own
  ip netns exec "$NS" sysctl -qw "net.ipv6.conf.$BR_HOST.disable_ipv6=1"
  cp /etc/libvirt/libvirt.conf /etc/libvirt/libvirt-admin.conf "/etc/netns/$NS/libvirt/" 2>/dev/null || true
  cat > "/etc/netns/$NS/libvirt/libvirtd.conf" <<CONF
unix_sock_dir = "$WORK/run"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:$WORK/logs/libvirtd.log"
CONF
  cat > "/etc/netns/$NS/libvirt/qemu.conf" <<CONF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
nvram = [ "/usr/share/AAVMF/AAVMF_CODE.fd:/usr/share/AAVMF/AAVMF_VARS.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd:/usr/share/OVMF/OVMF_VARS_4M.fd" ]
CONF
  ip netns exec "$NS" /usr/sbin/libvirtd --config /etc/libvirt/libvirtd.conf --pid-file "$WORK/run/libvirtd.pid" \
    >"$WORK/logs/libvirtd.out" 2>&1 &
  echo $! > "$WORK/libvirtd.pid"
  for _ in $(seq 200); do virsh -c "$URI" version >/dev/null 2>&1 && break; sleep 0.1; done
  virsh -c "$URI" version >/dev/null || { echo "libvirtd did not start; see $WORK/logs/libvirtd.out" >&2; exit 1; }
  if ! virsh -c "$URI" pool-info default >/dev/null 2>&1; then
    virsh -c "$URI" pool-define-as default dir --target "$WORK/pool" >/dev/null
    virsh -c "$URI" pool-start default >/dev/null
  fi
  echo "$URI"
  ;;
down)
  if [ -S "$SOCK" ]; then
    for d in $(virsh -c "$URI" list --all --name 2>/dev/null); do
      virsh -c "$URI" destroy "$d" >/dev/null 2>&1 || true
      virsh -c "$URI" undefine "$d" --nvram --remove-all-storage >/dev/null 2>&1 || \
        virsh -c "$URI" undefine "$d" --nvram >/dev/null 2>&1 || true
    done
  fi
  if [ -f "$WORK/libvirtd.pid" ]; then
    pid=$(cat "$WORK/libvirtd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$WORK/libvirtd.pid"
  fi
  if [ -e "/run/netns/$NS" ]; then ip netns del "$NS"; fi
  rm -rf "/etc/netns/$NS"
  ;;
*) echo "usage: $0 up|down NS WORK" >&2; exit 2 ;;
esac
