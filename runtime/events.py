"""PV events: the shared page's virtual interrupt flag, and when an upcall must wait.

A PV guest's IF is the shared page's `upcall_mask` (docs/abi.md sections 5
and 7): the guest flips it with plain stores, so the hypervisor reads it
afresh whenever it considers an upcall.  `upcall_pending` tells a guest
that unmasks whether to make the `event_check` hypercall: the vCPU sets it
while an interrupt waits behind the mask and clears it when nothing is
left.

An upcall is also held back while the guest is appending to its multicall
queue: between reading the queue's count and storing the new count, an
upcall (whose handler queues and flushes entries of its own) would leave
the guest writing a stale slot.  The compiler records those stretches in
`.pv.sites` (records of kind SITE_BATCHED); an interrupt arriving inside one
waits for the next exit or slice end, as Xen fixes up an event that hits
a critical region.  Otherwise the hypervisor runs a non-empty queue itself
before the upcall, so a handler never sees half-applied updates.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Callable

from pvimage import abi

from .errors import GuestFault, Refused
from .memory import GuestMemory

MASK = abi.SHARED_PAGE + abi.SH_UPCALL_MASK
PENDING = abi.SHARED_PAGE + abi.SH_UPCALL_PENDING
MC_COUNT = abi.SHARED_PAGE + abi.SH_MC_COUNT


class PvEvents:
    def __init__(self, mem: GuestMemory, hypercall_page: int, sites: list[abi.Site],
                 run_queue: Callable[[], object]):
        self.mem = mem
        self.hypercall_page = hypercall_page
        self.run_queue = run_queue
        spans = sorted((s.address, s.address + s.length) for s in sites if s.batched)
        self._starts = [a for a, _ in spans]
        self._ends = [b for _, b in spans]

    def masked(self) -> bool:
        return self.mem.read(MASK, 1) != b"\0"

    def set_mask(self, masked: bool) -> None:
        self.mem.write(MASK, b"\1" if masked else b"\0")

    def set_pending(self, pending: bool) -> None:
        if pending or self.mem.read(PENDING, 1) != b"\0":
            self.mem.write(PENDING, b"\1" if pending else b"\0")

    def in_hypercall_page(self, rip: int) -> bool:
        return self.hypercall_page <= rip < self.hypercall_page + abi.PAGE_SIZE

    def in_batched_site(self, pc: int) -> bool:
        k = bisect_right(self._starts, pc) - 1
        return k >= 0 and pc < self._ends[k]

    def flush_queue(self) -> None:
        """Run the guest's multicall queue if it holds anything."""
        if int.from_bytes(self.mem.read(MC_COUNT, 4), "little"):
            try:
                self.run_queue()
            except Refused as e:
                raise GuestFault(f"the multicall queue cannot run before an upcall: {e.why}") from None
