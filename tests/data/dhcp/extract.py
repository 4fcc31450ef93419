#!/usr/bin/env python3
"""Turn the captured pcaps in this folder into captures.json (hex of each DHCP payload) so the unit
tests need neither scapy nor tshark. Run after capture.sh:  python extract.py"""
import json
import pathlib

from scapy.all import IP, UDP, rdpcap  # type: ignore[import-untyped]

here = pathlib.Path(__file__).resolve().parent
out = {}
for pcap in sorted(here.glob("*.pcap")):
    frames = []
    for i, p in enumerate(rdpcap(str(pcap))):
        if UDP in p and {p[UDP].sport, p[UDP].dport} & {67, 68}:
            frames.append({"frame": i + 1, "src": p[IP].src, "dst": p[IP].dst, "sport": p[UDP].sport,
                           "dport": p[UDP].dport, "hex": bytes(p[UDP].payload).hex()})
    out[pcap.stem] = frames
(here / "captures.json").write_text(json.dumps(out, indent=1) + "\n")
print({k: len(v) for k, v in out.items()})
