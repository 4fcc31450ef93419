#!/bin/bash
# Capture real DHCP traffic from firmware (QEMU TCG) and Linux clients into pcaps under this folder.
# Everything runs inside netns bdcap/bdcli (devices bd*); dnsmasq is only the stand-in answerer so the
# clients go through a full DORA. Usage: capture.sh [bios uefi uefi-native arm64 dhclient udhcpc]
# Needs root, qemu-system-{x86,arm}, ovmf, qemu-efi-aarch64, ipxe-qemu, dnsmasq-base, dumpcap.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
W=${W:-/tmp/bdcap-work}
mkdir -p "$W"
NS=bdcap; CNS=bdcli
cleanup() {
  for f in "$W"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  ip netns del $NS 2>/dev/null; ip netns del $CNS 2>/dev/null
}
trap cleanup EXIT
cleanup
ip netns add $NS; ip netns add $CNS
ip -n $NS link set lo up; ip -n $CNS link set lo up
ip -n $NS link add bdbr0 type bridge forward_delay 0 stp_state 0
ip -n $NS addr add 198.18.10.1/24 dev bdbr0
ip -n $NS link set bdbr0 up
ip -n $NS tuntap add dev bdtap0 mode tap
ip -n $NS link set bdtap0 master bdbr0 up
ip -n $NS link add bdv0 type veth peer name bdv1 netns $CNS
ip -n $NS link set bdv0 master bdbr0 up
ip -n $CNS link set bdv1 address 52:54:00:bd:00:99 up
mkdir -p "$W/tftp/arm64"; cp /usr/lib/ipxe/snponly.efi /usr/lib/ipxe/undionly.kpxe "$W/tftp/"
cat > "$W/dnsmasq.conf" <<CONF
port=0
bind-interfaces
interface=bdbr0
dhcp-authoritative
no-ping
log-dhcp
log-facility=$W/dnsmasq.log
dhcp-leasefile=$W/dnsmasq.leases
pid-file=
user=root
dhcp-range=198.18.10.100,198.18.10.199,255.255.255.0,10m
dhcp-userclass=set:ipxe,iPXE
dhcp-match=set:ipxe,175
dhcp-match=set:bios,option:client-arch,0
dhcp-match=set:efi64,option:client-arch,7
dhcp-match=set:efiarm64,option:client-arch,11
dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe
dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi
dhcp-boot=tag:!ipxe,tag:efiarm64,arm64/grubnetaa64.efi
dhcp-option=tag:ipxe,encap:175,176,1
dhcp-boot=tag:ipxe,http://198.18.10.1:9/boot.ipxe
enable-tftp
tftp-root=$W/tftp
CONF
: > "$W/dnsmasq.leases"
ip netns exec $NS dnsmasq -k -C "$W/dnsmasq.conf" & echo $! > "$W/dnsmasq.pid"
cap() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local pcap="$HERE/$name.pcap"; rm -f "$pcap"
  ip netns exec $NS dumpcap -q -i bdbr0 -f 'udp port 67 or udp port 68' -w "$pcap" >/dev/null 2>&1 &
  local cpid=$!; echo $cpid > "$W/cap.pid"
  for i in $(seq 50); do [ -s "$pcap" ] && break; sleep 0.1; done
  "$@" & local p=$!; echo $p > "$W/client.pid"
  local end=$((SECONDS + secs))
  while kill -0 $p 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.5; done
  kill $p 2>/dev/null; wait $p 2>/dev/null; rm -f "$W/client.pid"
  sleep 0.3; kill $cpid; wait $cpid 2>/dev/null; rm -f "$W/cap.pid"
  echo "== $name"; tshark -r "$pcap" -Y dhcp -T fields -e dhcp.option.dhcp -e dhcp.option.vendor_class_id -e dhcp.option.user_class 2>/dev/null | sort | uniq -c
}
qx86() {  # romfile [ovmf]
  local rom=$1 fw=${2:-}
  local args=(-machine q35,accel=tcg -cpu qemu64)
  if [ -n "$fw" ]; then cp /usr/share/OVMF/OVMF_VARS_4M.fd "$W/vars.fd"
    args+=(-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
           -drive if=pflash,format=raw,unit=1,file="$W/vars.fd"); fi
  exec ip netns exec $NS qemu-system-x86_64 "${args[@]}" -smp 1 -m 512 -nographic -monitor none \
    -serial null -no-reboot -uuid 7ab00000-0000-4000-8000-525400bd0010 \
    -netdev tap,id=n0,ifname=bdtap0,script=no,downscript=no \
    -device virtio-net-pci,disable-legacy=on,netdev=n0,mac=52:54:00:bd:00:10,romfile=$rom,bootindex=1 </dev/null >/dev/null 2>&1
}
qarm() {
  cp /usr/share/AAVMF/AAVMF_VARS.fd "$W/avars.fd"
  exec ip netns exec $NS qemu-system-aarch64 -machine virt,accel=tcg -cpu cortex-a72 -smp 1 -m 1024 \
    -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd \
    -drive if=pflash,format=raw,unit=1,file="$W/avars.fd" -nographic -monitor none -serial null \
    -no-reboot -uuid 7ab00000-0000-4000-8000-525400bd0020 \
    -netdev tap,id=n0,ifname=bdtap0,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:bd:00:20,romfile=,bootindex=1 </dev/null >/dev/null 2>&1
}
dhc() {  # DORA, RELEASE, INIT-REBOOT (from the lease file), RELEASE
  local a="-v -pf $W/dhclient.pid -lf $W/dhclient.leases -sf /sbin/dhclient-script bdv1"
  exec ip netns exec $CNS bash -c "dhclient -1 $a && dhclient -r $a && dhclient -1 $a && dhclient -r $a"
}
udh() {  # DORA, RENEW (SIGUSR1: unicast REQUEST with ciaddr), RELEASE on SIGTERM (-R)
  printf '#!/bin/sh\ncase "$1" in bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface";; esac\n' > "$W/udhcpc.sh"
  chmod +x "$W/udhcpc.sh"
  ip netns exec $CNS busybox udhcpc -f -i bdv1 -R -s "$W/udhcpc.sh" -x hostname:bdtest -V udhcp &
  local u=$!
  for i in $(seq 100); do ip -n $CNS -4 addr show bdv1 | grep -q inet && break; sleep 0.1; done
  sleep 0.5; kill -USR1 $u; sleep 1.5; kill -TERM $u; wait $u
}
for what in "${@:-bios uefi uefi-native arm64 dhclient udhcpc}"; do for w in $what; do
  case $w in
    bios) cap seabios-ipxe 30 qx86 /usr/lib/ipxe/qemu/pxe-virtio.rom ;;
    uefi) cap ovmf-ipxe 45 qx86 /usr/lib/ipxe/qemu/efi-virtio.rom ovmf ;;
    uefi-native) cap ovmf-native 70 qx86 "" ovmf ;;
    arm64) cap aavmf-arm64 90 qarm ;;
    dhclient) cap dhclient 30 dhc ;;
    udhcpc) cap udhcpc 20 udh ;;
  esac
done; done
