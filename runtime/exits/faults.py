"""Exceptions the guest raised, system calls in native images, and how Unicorn's own stops are reported.

Unicorn does not deliver exceptions through the guest's IDT: it calls the
exception hook.  The runtime acts as the CPU: an exception for which the
guest has a usable gate is delivered to it (delivery.entering: from user
mode on the kernel stack), with its error code (read from Unicorn's saved
context, where it is not a register) and, for a page fault, CR2 in the
shared page too (pv); Unicorn's record of the exception in flight is
cleared, or the next page fault would arrive as a double fault.  An
exception the guest has no gate for ends the run as a fault named after
the vector (#PF with its address), as before a kernel installs handlers.
In trap and pv mode every exception the guest takes is an exit
("exception N": trap-and-emulate's monitor, Xen's bounce), and so is a
system call from user mode; in hvm-shadow a page fault is; elsewhere the
runtime only plays the CPU, which stats.events counts apart.

`syscall` in a native image (bare, trap) is also the runtime's to
perform: Unicorn only calls the hook.  It does what the CPU does: RCX =
the next RIP, R11 = RFLAGS, RFLAGS masked by SFMASK, ring 0 with the ABI's
kernel selectors (STAR), RIP = LSTAR.

The breakpoints the runtime patches in never get here (run.py sends them
to trapped.py first).
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from unicorn import (UC_MEM_FETCH_PROT, UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_PROT, UC_MEM_READ_UNMAPPED,
                     UC_MEM_WRITE_PROT, UC_MEM_WRITE_UNMAPPED)

from pvimage import abi

from .. import delivery
from ..devices.msr import EFER_SCE, LSTAR, SFMASK
from ..engine import RIP_INDEX
from ..errors import GuestException, GuestFault

if TYPE_CHECKING:
    from ..machine import Vm

SYSCALL_SIZE = 2
RFLAGS_RF = 1 << 16

EXCEPTIONS = {0: "divide error (#DE)", 1: "debug trap (#DB)", 3: "breakpoint (#BP, int3)",
              4: "overflow (#OF)", 5: "bound range exceeded (#BR)", 6: "invalid opcode (#UD)",
              7: "device not available (#NM)", 8: "double fault (#DF)", 10: "invalid TSS (#TS)",
              11: "segment not present (#NP)", 12: "stack-segment fault (#SS)",
              13: "general protection fault (#GP)", 14: "page fault (#PF)",
              16: "x87 floating-point error (#MF)", 17: "alignment check (#AC)",
              18: "machine check (#MC)", 19: "SIMD floating-point error (#XM)"}
EXCEPTION_REASON = [f"exception {vector}" for vector in range(256)]   # the exit's name, made once
FROM_CPU = object()                    # exception_exit: the error code is Unicorn's (none, for most vectors)
CR2_SHARED = abi.SHARED_PAGE + abi.SH_CR2
_U64 = struct.Struct("<Q")
_ACCESS = {UC_MEM_READ_UNMAPPED: "read of", UC_MEM_WRITE_UNMAPPED: "write to",
           UC_MEM_FETCH_UNMAPPED: "execution of", UC_MEM_READ_PROT: "read of unreadable",
           UC_MEM_WRITE_PROT: "write to read-only", UC_MEM_FETCH_PROT: "execution of non-executable"}


def exception_exit(vm: Vm) -> Callable[..., None]:
    """The exception hook's handler, `deliver(vm, vector)`: Unicorn reports exception `vector` at
    the current RIP, its error code is taken and its record cleared (else QEMU turns the next page
    fault into a #DF), and the guest takes it, or the run ends.  `deliver(vm, vector, error_code)`
    is an exception the runtime raises itself (`take`).  What each one reads is bound once: a page
    fault's bounce is most of a user process's cost in pv, and every call and lookup shows."""
    regs, mode, mmu, shared, count = vm.cpu.regs, vm.mode, vm.mmu, vm.mem.view, vm.run.count
    gprs, raw, events, enter = regs.gprs, regs.entry, vm.stats.events, delivery.entering(vm)
    cr2_shared = mode.virtual_if           # pv: a page fault's address goes in the shared page too

    def deliver(vm: Vm, vector: int, error_code: int | None = FROM_CPU) -> None:
        if error_code is FROM_CPU:
            error_code = raw.error_code.value if vector in delivery.HAS_ERROR_CODE else None
            raw.in_flight.value = -1
        try:                               # read once: whether the kernel handles it, and where
            gate = delivery.read_gate(mmu, raw.idt_limit.value, raw.idt_base.value, vector)
        except delivery.NoGate:
            raise GuestFault(_unhandled(vm, vector)) from None
        except GuestFault:                 # a gate the CPU cannot use: enter says why
            gate = None
        # _exit_or_event, inline with what it reads bound: every exception passes here
        if mode.exception_exits is None or vector in mode.exception_exits:
            count(EXCEPTION_REASON[vector], gprs[RIP_INDEX])
        else:
            events[EXCEPTION_REASON[vector]] += 1
        if vector == 14 and cr2_shared:
            _U64.pack_into(shared, CR2_SHARED, raw.cr2.value)
        enter(vector, "exception", error_code, gate)
    return deliver


def take(vm: Vm, exc: GuestException) -> None:
    """The guest takes exception `exc` at exc.rip (the current RIP if None), if it has a gate for it."""
    if exc.rip is not None:
        vm.cpu.jump(exc.rip)
    exception_exit(vm)(vm, exc.vector, exc.error_code)


def _unhandled(vm: Vm, vector: int) -> str:
    """What the run ends with when the guest has no gate for `vector`."""
    what = EXCEPTIONS.get(vector, f"software interrupt {vector:#x}")
    if vector == 14:
        what += f" accessing {vm.cpu.read_cr(2):#x}"
    return what


def _exit_or_event(vm: Vm, exits: bool, what: str) -> None:
    """An exit in modes where the hypervisor takes it first; else the CPU's own work (stats.events)."""
    if exits:
        vm.run.count(what, vm.cpu.regs.gprs[RIP_INDEX])
    else:
        vm.stats.events[what] += 1


def system_call(vm: Vm) -> None:
    """`syscall` in a native image: what the CPU does (the hook is the only thing Unicorn does)."""
    _exit_or_event(vm, vm.mode.syscall_exits, "syscall")
    cpu = vm.cpu
    if not cpu.regs.efer & EFER_SCE:
        raise GuestException(6)                                 # #UD: system calls are off
    entry, mask = cpu.regs.msr(LSTAR), cpu.regs.msr(SFMASK)
    rflags = cpu.rflags()
    cpu.regs["rcx"] = cpu.rip + SYSCALL_SIZE
    cpu.regs["r11"] = rflags
    cpu.enter_ring(0)
    cpu.set_rflags(rflags & ~mask & ~RFLAGS_RF | 2)
    cpu.jump(entry)


def describe_access(vm: Vm, access: int, address: int, size: int) -> str:
    return f"{_ACCESS.get(access, 'access to')} guest-physical {vm.mem.describe(address)}"
