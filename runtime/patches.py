"""Instructions made to exit: the hypervisor writes `int3` over them, as a debugger does.

Unicorn cannot deprivilege a guest, so a sensitive instruction does not
trap by itself.  The runtime makes it trap: it writes the breakpoint byte
0xCC over the instruction's first byte, and when the CPU reaches it the
exception hook sees vector 3 just after that byte (`lookup`).  The exit's
handler then emulates the instruction it stands for and sends the guest on
past it.

Why not a Unicorn code hook per address: while the guest runs in
instruction-counted slices (a timer is armed), Unicorn walks every code
hook at every instruction, so each hook costs a large fraction of guest
speed (measured: 10 hooks, 2.4 times slower; 100 hooks, 23 times).  A patch
costs nothing until it is reached.

The bytes under a patch are kept; `original` gives them back to anyone who
reads guest memory on the hypervisor's side (a debugger, a fault report).
A guest that reads its own code sees the breakpoint byte, as it would
under a debugger: trap mode's one visible difference.

A debugger's breakpoints (debugger.py) are int3 bytes too, kept apart
from the runtime's patches: either may come and go while the other stays
at the same address, and the original byte returns when neither is left.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .memory import GuestMemory

INT3 = b"\xcc"


@dataclass
class Patch:
    address: int
    size: int                  # the instruction's length
    insn: object               # its capstone decoding
    reason: str                # the exit's name in the statistics, e.g. "trap cli"
    emulate: Callable          # (vm, insn) -> None; the instruction's effect
    privileged: bool = False   # faults (#GP) in user mode instead
    msr: bool = False          # rdmsr/wrmsr: the mode's MSR bitmap may let it through without an exit

    next: int = field(init=False)   # where the guest goes on after it

    def __post_init__(self) -> None:
        self.next = self.address + self.size


class Patches:
    def __init__(self, mem: GuestMemory):
        self.mem = mem
        self.live: dict[int, Patch] = {}
        self.breakpoints: set[int] = set()       # the debugger's
        self._saved: dict[int, bytes] = {}       # the original byte under every int3 written

    def arm(self, patch: Patch) -> None:
        if patch.address in self.live:
            return
        self.live[patch.address] = patch
        self._cover(patch.address)

    def disarm(self, address: int) -> None:
        if self.live.pop(address, None) is not None:
            self._uncover(address)

    def add_breakpoint(self, address: int) -> None:
        self.breakpoints.add(address)
        self._cover(address)

    def remove_breakpoint(self, address: int) -> None:
        self.breakpoints.discard(address)
        self._uncover(address)

    def _cover(self, address: int) -> None:
        if address not in self._saved:
            self._saved[address] = self.mem.read(address, 1)
            self._write(address, INT3)

    def _uncover(self, address: int) -> None:
        if address not in self.live and address not in self.breakpoints and address in self._saved:
            self._write(address, self._saved.pop(address))

    def _write(self, address: int, byte: bytes) -> None:
        self.mem.write(address, byte)
        # Unicorn 2.1.4 may go on running code translated before the write (measured: a block
        # translated during a one-instruction step, an int3 written back; tests/test_gdb.py)
        self.mem.uc.ctl_remove_cache(address, address + 1)

    def original(self, address: int, data: bytes) -> bytes:
        """`data` read from guest memory at `address`, with the patched bytes put back."""
        if not self._saved:
            return data
        out = bytearray(data)
        for at, byte in self._saved.items():
            if address <= at < address + len(data):
                out[at - address] = byte[0]
        return bytes(out)
