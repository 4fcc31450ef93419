"""TFTP for network boot programs: a read-only root plus per-node GRUB configs from the database.

Shaped like ``bootsvc/dhcp/``:
- ``packet``   - wire format and option negotiation (RFC 1350, 2347, 2348, 2349, 7440), netascii; pure
- ``paths``    - name safety, the read-only root, file contents and their prebuilt DATA packets
- ``transfer`` - one read's DATA/ACK exchange (lock-step or windowed), returning the bytes to send
- ``service``  - one worker's sockets and epoll loop, admission under flood, counters
- ``grub``     - generated GRUB configs (served only to the node's leased address) and catalog files
- ``run``      - the service runner: root, RLIMIT_NOFILE, workers pinned per CPU

Writes (WRQ) are always refused with ERROR 2; nothing is ever written under the root. Every
requirement of the RFCs and the test proving it: docs/conformance.md (TFTP).
"""

from bootsvc.tftp.grub import http_base_for, make_generator
from bootsvc.tftp.packet import (
    ERR_ACCESS,
    ERR_ILLEGAL,
    ERR_NOT_FOUND,
    ERR_OPTION,
    ERR_UNDEFINED,
    ERR_UNKNOWN_TID,
    MAX_BLKSIZE,
    Refused,
    error_packet,
)
from bootsvc.tftp.paths import IPXE_FILES, Content, Resolver, clean_name, ensure_root, open_under, safe_resolve
from bootsvc.tftp.run import pin, prepare_root, raise_nofile, run
from bootsvc.tftp.service import SO_INCOMING_CPU, Slots, TftpService
from bootsvc.tftp.transfer import Transfer

__all__ = [
    "ERR_ACCESS", "ERR_ILLEGAL", "ERR_NOT_FOUND", "ERR_OPTION", "ERR_UNDEFINED", "ERR_UNKNOWN_TID", "IPXE_FILES",
    "MAX_BLKSIZE", "SO_INCOMING_CPU", "Content", "Refused", "Resolver", "Slots", "TftpService", "Transfer",
    "clean_name", "ensure_root", "error_packet", "http_base_for", "make_generator", "open_under", "pin",
    "prepare_root", "raise_nofile", "run", "safe_resolve",
]
