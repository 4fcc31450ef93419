"""One read transfer after its first packet, without sockets: an ACK in, the DATA packets to send out.

Owns: the DATA/ACK exchange of RFC 1350 §2 (lock-step) and RFC 7440 (``windowsize`` > 1), block
numbers that wrap 65535 -> 0 (so files over 32 MiB at blksize 512 work; tftpd-hpa and EDK2 wrap the
same way), the final short block - empty when the size is a multiple of the block size (RFC 1350 §6) -
and retransmission on timeout only, never on a duplicate ACK (the Sorcerer's Apprentice bug, RFC 1123
§4.2.3.1). The caller (bootsvc/tftp/service.py) sends what the methods return.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from bootsvc.tftp.packet import OP_ACK, OP_DATA, OP_ERROR
from bootsvc.tftp.paths import Content

log = logging.getLogger("bootsvc.tftp")

_OP_NUM = struct.Struct("!HH")  # opcode and block number: the head of every DATA/ACK
_NOTHING: tuple[bytes, ...] = ()


class Transfer:
    """The state of one read. ``acked_wait`` is the absolute number of the block whose ACK ends the
    current window (0: the OACK); with ``windowsize`` 1 that is the one block in flight."""

    __slots__ = (
        "acked_wait",
        "blksize",
        "complete",
        "content",
        "done",
        "first_wait",
        "last",
        "last_sent",
        "name",
        "nblocks",
        "packets",
        "peer",
        "resent",
        "retries",
        "started",
        "timeout",
        "una",
        "window",
    )

    def __init__(self, peer: tuple[str, int], content: Content, blksize: int, name: str, *,
                 oack: bytes | None, now: float, timeout: float, window: int = 1,
                 packets: list[bytes] | None = None) -> None:
        self.peer, self.content, self.blksize, self.name = peer, content, blksize, name
        self.packets = packets  # prebuilt DATA packets (block n is packets[n - 1]), or None
        self.nblocks = content.size // blksize + 1  # a final short (maybe empty) block ends the transfer
        self.window = window
        self.timeout = timeout
        self.retries = 0
        self.resent = 0
        self.done = False
        self.complete = False  # the client ACKed the final block
        self.started = self.last_sent = now
        if oack is not None:
            self.acked_wait, self.una, self.last = 0, 0, oack
        else:  # RFC 1350: no options accepted, the answer is DATA 1 (lock-step: no window without OACK)
            self.window = 1
            self.acked_wait, self.una = 1, 1
            self.last = self._block(1)
        self.first_wait = self.acked_wait

    @property
    def established(self) -> bool:
        """The client has ACKed at least once: it is really there (a spoofed source never ACKs)."""
        return self.acked_wait != self.first_wait or self.done

    def first(self) -> bytes:
        """The OACK or DATA 1 that opens the transfer."""
        return self.last

    def acked_bytes(self) -> int:
        if self.complete:
            return self.content.size
        acked = self.acked_wait - 1 if self.window == 1 else self.una - 1  # lock-step keeps no una
        return min(self.content.size, max(0, acked) * self.blksize)

    def _block(self, n: int) -> bytes:
        if self.packets is not None:
            return self.packets[n - 1]
        return _OP_NUM.pack(OP_DATA, n & 0xFFFF) + self.content.block((n - 1) * self.blksize, self.blksize)

    def on_packet(self, buf: bytes, now: float) -> bytes | list[bytes] | None:
        """A datagram from the client's TID; returns what to send now: one DATA (lock-step), the DATA
        of a window (RFC 7440), or None. The lock-step branch is the per-block hot path (bench/tftp):
        no call, no container."""
        if len(buf) < 4:
            return None
        op, num = _OP_NUM.unpack_from(buf)
        if op == OP_ACK:
            if self.window != 1:
                return self._on_window_ack(num, now)
            if num != self.acked_wait & 0xFFFF:
                return None  # duplicate/old ACK: never resend on it (Sorcerer's Apprentice)
            if self.acked_wait >= self.nblocks:
                self.done = self.complete = True
                return None
            n = self.acked_wait = self.acked_wait + 1
            packets = self.packets
            last = self.last = packets[n - 1] if packets is not None else self._block(n)
            self.last_sent = now
            self.retries = 0
            return last
        if op == OP_ERROR:
            # EDK2 aborts its first (tsize-probing) RRQ this way; RFC 2347 §2: a client refusing the
            # OACK sends ERROR 8. Either ends the transfer, and is not an error of ours.
            self.done = True
        return None  # DATA/RRQ/unknown on a read transfer's TID: ignored (RFC 1350 §4)

    def _on_window_ack(self, num: int, now: float) -> list[bytes] | None:
        """RFC 7440 §4: the client ACKs the last block of each window, or - on a gap or timeout - the
        last block it got in order; the server then sends the next window starting after that block.
        An ACK for a block not in flight (older, duplicate) is ignored."""
        k = self.una + ((num - self.una) & 0xFFFF)  # the absolute block this 16-bit number names
        if k > self.acked_wait:
            return None
        if k >= self.nblocks:
            self.una = self.nblocks + 1
            self.done = self.complete = True
            return None
        self.una = k + 1
        return self._send_window(now)

    def _send_window(self, now: float) -> list[bytes]:
        end = min(self.una + self.window - 1, self.nblocks)
        out = [self._block(n) for n in range(self.una, end + 1)]
        self.acked_wait = end
        self.last = out[-1]
        self.last_sent = now
        self.retries = 0
        return out

    def on_timeout(self, now: float, max_retries: int) -> Sequence[bytes]:
        """What to resend when the client has been silent for ``timeout`` (all of the window in
        flight, RFC 7440 §4), or nothing; gives up (``done``) after ``max_retries`` resends."""
        if now - self.last_sent < self.timeout:
            return _NOTHING
        if self.retries >= max_retries:
            log.info("tftp: %s to %s:%d timed out at block %d", self.name, *self.peer, self.acked_wait)
            self.done = True
            return _NOTHING
        self.retries += 1
        self.last_sent = now
        if self.window == 1 or self.acked_wait == 0:
            self.resent += 1
            return (self.last,)
        out = [self._block(n) for n in range(self.una, self.acked_wait + 1)]
        self.resent += len(out)
        return out

    def close(self) -> None:
        self.content.close()
