"""How an interrupt or exception enters the guest through its IDT (or trap table), and how iret leaves it.

`enter` (made per VM by `entering`) is what the CPU does when it takes a
vector: read the gate; if the guest was in user mode, switch to the kernel
stack (TSS.rsp0 natively, the `stack_switch` stack in pv:
`Mode.kernel_stack`) and to ring 0; push the
interrupt frame (and the error code, for the vectors that have one); mask
interrupts for an interrupt gate; jump to the handler.  `iret` pops the
frame, back to ring 3 if the frame says so.  In pv mode the guest's IF is
the shared page's mask (`Mode.virtual_if`): the frame carries the virtual
IF and the real one stays clear.

Gates: a 64-bit IDT holds 16-byte gates (offset bits 0-15, selector, IST,
type/DPL/present, offset bits 16-31, offset bits 32-63, reserved).  The
runtime takes a present interrupt (0xE) or trap (0xF) gate inside the IDT
limit, on the kernel code segment, with no IST stack; anything else stops
the guest with a fault that names the vector and what is wrong, as a real
CPU would escalate to a double fault.

Frames: the 64-bit interrupt frame, lowest address first: [error code],
RIP, CS, RFLAGS, RSP, SS.  The CPU aligns the stack down to 16 bytes before
pushing it (always, in 64-bit mode); `iretq` pops it and loads RSP from it.
Frames are read and written through the guest's page tables with the
guest's own permissions, so a frame on an unmapped or read-only page is a
fault, never a host crash.  The segments are the ABI's: kernel 0x08/0x10,
user 0x23/0x1b (pvimage/abi.py).
"""
from __future__ import annotations

import struct
from functools import partial
from typing import TYPE_CHECKING, Callable

from unicorn import x86_const as U

from pvimage import abi

from .cpu import RFLAGS_IF, SYSCALL, SYSCALL_SIZE
from .devices.msr import CANONICAL_TOPS, canonical
from .engine import GPR_INDEX, HF_CPL_MASK, RIP_INDEX
from .errors import GuestFault, Refused
from .mmu import Mmu

if TYPE_CHECKING:
    from .machine import Vm

MASK64 = (1 << 64) - 1
GATE = struct.Struct("<HHBBHII")
FRAME = struct.Struct("<5Q")
FRAME_WITH_ERROR = struct.Struct("<6Q")
HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF
# RFLAGS bits an iretq at CPL 0 restores: CF PF AF ZF SF IF DF OF IOPL NT AC ID (not TF: no single-stepping)
RESTORABLE = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x200 | 0x400 | 0x800 | 0x3000 | 0x4000 | 0x40000 | 0x200000
CLEARED_ON_ENTRY = (1 << 8) | (1 << 14) | (1 << 16)       # TF NT RF
IOPL = 0x3000
RSP = GPR_INDEX["rsp"]


Frame = tuple[int, int, int, int, int]   # RIP, CS, RFLAGS, RSP, SS: a plain tuple, built at every entry and return


class NoGate(GuestFault):
    """The IDT has no present gate for the vector (beyond its limit, unreadable, or not present):
    no kernel handler for it, as opposed to a gate that is there but wrong."""


def read_gate(mmu: Mmu, limit: int, base: int, vector: int, cs: int = abi.KERNEL_CS) -> tuple[int, bool]:
    """(handler, trap) of the gate for `vector` in the IDT at `base` with `limit`; a trap gate
    leaves IF as it was.  GuestFault if it cannot be used (NoGate if there is none)."""
    if vector * 16 + 15 > limit:
        raise NoGate(f"vector {vector} lies beyond the IDT limit {limit:#x}"
                     + (" (no IDT loaded)" if limit == 0 and base == 0 else ""))
    try:
        low, selector, ist, kind, mid, high, _ = GATE.unpack(mmu.read_virt(base + vector * 16, 16))
    except Refused as e:
        raise NoGate(f"cannot read gate {vector} of the IDT at {base:#x}: {e.why}") from None
    handler = low | mid << 16 | high << 32
    # present, an interrupt (0xE) or trap (0xF) gate, no IST, the kernel's code, canonical: one test
    if kind & 0x8E == 0x8E and not ist & 7 and selector == cs and handler >> 47 in CANONICAL_TOPS:
        return handler, kind & 0xF == TRAP_GATE
    if not kind & 0x80:
        raise NoGate(f"gate {vector} of the IDT at {base:#x} is not present")
    if kind & 0xF not in (INTERRUPT_GATE, TRAP_GATE):
        raise GuestFault(f"gate {vector} has type {kind & 0xF:#x}, not a 64-bit interrupt or trap gate")
    if ist & 7:
        raise GuestFault(f"gate {vector} asks for IST stack {ist & 7}, which the runtime does not provide")
    if selector != cs:
        raise GuestFault(f"gate {vector} selector {selector:#x} is not the kernel code segment {cs:#x}")
    raise GuestFault(f"gate {vector} handler {handler:#x} is not canonical")


def push_frame(mmu: Mmu, frame: Frame, stack: int, error_code: int | None = None) -> int:
    """Push `frame` (and an error code below it) at `stack` aligned down to 16; returns the new RSP."""
    data = FRAME.pack(*frame) if error_code is None else FRAME_WITH_ERROR.pack(error_code, *frame)
    rsp = (stack & ~0xF) - len(data) & MASK64
    try:
        mmu.write_virt(rsp, data)
    except Refused as e:
        raise GuestFault(f"cannot push the interrupt frame at {rsp:#x}: {e.why}") from None
    return rsp


def pop_frame(mmu: Mmu, rsp: int, cs: int, ss: int) -> Frame:
    """Read and check the iretq frame at `rsp`: to the current ring (CS, SS) or, from the kernel, to user mode."""
    try:
        frame = FRAME.unpack(mmu.read_virt(rsp, FRAME.size))
    except Refused as e:
        raise GuestFault(f"iret: cannot read the frame at rsp {rsp:#x}: {e.why}") from None
    return check_frame(frame, rsp, cs, ss)


def check_frame(frame: Frame, rsp: int, cs: int, ss: int) -> Frame:
    """The checks of `pop_frame` on a frame already read from `rsp`."""
    rip, frame_cs, _, frame_rsp, frame_ss = frame
    to_user = frame_cs == abi.USER_CS and frame_ss == abi.USER_DS and cs == abi.KERNEL_CS
    # the usual frame passes one test; one that fails it is taken apart for the message
    if (frame_cs == cs and frame_ss in (0, ss) or to_user) and rip >> 47 in CANONICAL_TOPS \
            and frame_rsp >> 47 in CANONICAL_TOPS:
        return frame
    if frame_cs != cs and not to_user:
        raise GuestFault(f"iret: bad frame at {rsp:#x}: CS {frame_cs:#x} is neither the code segment {cs:#x} "
                         f"nor, from the kernel, the user code segment {abi.USER_CS:#x}")
    if frame_ss not in (0, ss) and not to_user:
        raise GuestFault(f"iret: bad frame at {rsp:#x}: SS {frame_ss:#x} is not the stack segment {ss:#x}")
    what, value = ("RIP", rip) if not canonical(rip) else ("RSP", frame_rsp)
    raise GuestFault(f"iret: bad frame at {rsp:#x}: {what} {value:#x} is not canonical")


def entering(vm: Vm) -> Callable[..., None]:
    """`enter(vector, kind, error_code=None, gate=None)` for this VM: take `vector` as the hardware
    does, through its gate, on an interrupt frame.

    `kind` names it in the statistics ("interrupt 32", "upcall 32",
    "exception 14"); `error_code` is pushed below the frame when given;
    `gate` is the vector's gate if the caller has just read it.  Every
    exception and interrupt comes here, so what it reads is bound once, the
    registers are the raw fields, and the common case makes few calls."""
    cpu, mode, regs, mmu, stats = vm.cpu, vm.mode, vm.cpu.regs, vm.mmu, vm.stats
    gprs, hflags, raw = regs.gprs, regs.hflags_word, regs.entry
    read_rflags = partial(regs.api_read, U.UC_X86_REG_RFLAGS)   # the arithmetic flags are only computed there
    enter_ring, clear_rflags, checked = regs.enter_ring, regs.clear_rflags, mode.checked_entries
    virtual_if = mode.virtual_if

    def enter(vector: int, kind: str, error_code: int | None = None, gate: tuple[int, bool] | None = None) -> None:
        rip, rsp = gprs[RIP_INDEX], gprs[RSP]
        if cpu.exit_kind == SYSCALL:       # Unicorn adds the syscall's length after the hook
            rip += SYSCALL_SIZE
        cs, ss = raw.cs.value, raw.ss.value
        rflags = read_rflags()
        from_user = hflags.value & HF_CPL_MASK == 3
        try:
            handler, trap = gate or read_gate(mmu, raw.idt_limit.value, raw.idt_base.value, vector)
            if virtual_if:                 # the frame's IF is the virtual one; an interrupt gate masks it
                rflags = rflags & ~RFLAGS_IF | (RFLAGS_IF if mode.mask_virtual_if(vm, not trap) else 0)
            if checked is not None and handler not in checked:
                mode.check_entry_point(vm, handler, f"gate {vector}")
            stack = mode.kernel_stack(vm) if from_user else rsp
            new_rsp = push_frame(mmu, (rip, cs, rflags, rsp, ss), stack, error_code)
        except GuestFault as e:
            raise GuestFault(f"{kind} {vector}: {e.what}") from None
        if from_user:
            enter_ring(0)
        gprs[RSP] = new_rsp
        # the real IF is cleared by an interrupt gate, and always in pv (the virtual IF is the mask)
        clear_rflags(CLEARED_ON_ENTRY if trap and not virtual_if else CLEARED_ON_ENTRY | RFLAGS_IF)
        if kind != "exception":             # faults.py counted it: an exit where the mode has one, else an event
            stats.account(f"{kind} {vector}", rip)
        cpu.jump(handler)
    return enter


def iret(vm: Vm) -> None:
    """Return from an interrupt: pop the frame at RSP (iretq, or the iret hypercall), to user mode if it says so."""
    regs = vm.cpu.regs
    raw = regs.entry
    resume(vm, pop_frame(vm.mmu, regs.gprs[RSP], raw.cs.value, raw.ss.value))


def resume(vm: Vm, frame: Frame) -> None:
    """Go on where a checked iret frame says: its RIP, RSP and RFLAGS, and ring 3 if it leaves the kernel."""
    cpu, mode, regs = vm.cpu, vm.mode, vm.cpu.regs
    rip, cs, frame_rflags, rsp, _ = frame
    if mode.checked_entries is not None and rip not in mode.checked_entries:
        mode.check_entry_point(vm, rip, "iret")
    # the bits kept are none of the arithmetic flags, so the stored RFLAGS does (no API round trip)
    rflags = regs.eflags_word.value & ~RESTORABLE | frame_rflags & RESTORABLE | 2
    to_user = cs == abi.USER_CS and not regs.hflags_word.value & HF_CPL_MASK
    if to_user:
        rflags &= ~IOPL                     # user mode never gets the I/O ports
    if mode.virtual_if:                # the virtual IF is the mask; the real one stays clear
        mode.set_virtual_if(vm, bool(frame_rflags & RFLAGS_IF))
        rflags &= ~RFLAGS_IF
    regs.api_write(U.UC_X86_REG_RFLAGS, rflags)
    if to_user:
        regs.enter_ring(3)
    regs.gprs[RSP] = rsp
    cpu.jump(rip)
