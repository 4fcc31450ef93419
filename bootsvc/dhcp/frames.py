"""Interface facts and raw frames for the DHCP server's reply delivery.

Owns: the address and MAC of an interface (SIOCGIFADDR / SIOCGIFHWADDR ioctls), the socket option
numbers the server needs where Python's ``socket`` module lacks a name, and the Ethernet/IPv4/UDP
frame that carries a reply to a client which has no address yet (RFC 2131 §4.1: unicast to chaddr
and yiaddr). No state; the sockets themselves belong to ``bootsvc.dhcp.server``.
"""

from __future__ import annotations

import fcntl
import socket
import struct

__all__ = ["ETH_P_IP", "IP_PKTINFO", "SO_BINDTODEVICE", "ether_frame", "iface_ipv4", "iface_mac"]

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SIOCGIFADDR = 0x8915
SIOCGIFHWADDR = 0x8927
ETH_P_IP = 0x0800

IPv4Bytes = bytes


def iface_ipv4(ifname: str) -> IPv4Bytes | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        return res[20:24]
    except OSError:
        return None
    finally:
        s.close()


def iface_mac(ifname: str) -> bytes | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
        return res[18:24]
    except OSError:
        return None
    finally:
        s.close()



def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\x00"
    s: int = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ether_frame(src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, payload: bytes,
                sport: int = 67, dport: int = 68) -> bytes:
    """Ethernet/IPv4/UDP frame for delivering a reply to a client that has no address yet
    (RFC 2131 §4.1: unicast to chaddr/yiaddr). UDP checksum 0 = none (allowed over IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip_hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + len(udp), 0, 0x4000, 64, 17, 0, src_ip, dst_ip)
    ip_hdr = ip_hdr[:10] + struct.pack("!H", _csum(ip_hdr)) + ip_hdr[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + ip_hdr + udp
