"""Sensitive instructions that exit, and their emulation: one function per instruction.

A real trap-and-emulate hypervisor runs the guest kernel deprivileged, so
each privileged instruction faults into it.  Unicorn runs the guest at CPL
0 and cannot; so the static sweep (`pvimage.sweep`, what `pvtool check`
runs) finds the sensitive instructions, and each one is patched with a
breakpoint (patches.py): reaching it is the trap.  The handler emulates the
instruction on the virtual CPU and sends the guest on past it.

Which instructions exit depends on the mode:

- `trap`: every sensitive instruction, for as long as the guest runs;
- `bare`: only while an interrupt waits for the guest's IF (the *interrupt
  window*): the instructions that can set IF (sti, popf, iretq) exit, so
  the interrupt is taken right after the one that sets it, and after one
  more instruction for sti (its interrupt shadow), as on the real CPU.

Instructions whose whole effect is on state Unicorn's vCPU models exactly
(segment loads, swapgs, far transfers, ...) are not emulated: the run loop
lets the vCPU execute the original instruction once, then re-arms the
breakpoint (`STEP_NATIVELY`).  A sensitive instruction hidden inside
another one's bytes (no linear sweep sees it) would run unpatched: that is
the limit of static patching, for native images; PV images are validated
so that none can exist.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import capstone
from capstone import x86_const as C

from .. import delivery
from ..cpu import DESCRIPTOR, RFLAGS_IF
from ..devices.msr import FS_BASE, GS_BASE, TSC_AUX
from ..engine import HF_CPL_MASK, RIP_INDEX
from ..errors import GuestException, GuestFault, Refused
from ..memory import PAGE
from ..patches import Patch
from pvimage.sweep import PRIVILEGED

if TYPE_CHECKING:
    from ..machine import Vm

MASK64 = (1 << 64) - 1
# RFLAGS bits popf may change at CPL 0 (not TF: single-stepping is not emulated)
POPF_MASK = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x200 | 0x400 | 0x800 | 0x3000 | 0x4000 | 0x40000 | 0x200000
PUSHF_MASK = ~((1 << 16) | (1 << 17)) & MASK64   # RF and VM read as 0
IOPL = 0x3000
WINDOW = ("sti", "popf", "popfq", "iretq", "iret")  # what can set IF: the interrupt window's exits
_SEGMENT_OR_DEBUG = {"cs", "ds", "es", "fs", "gs", "ss"} | {f"dr{n}" for n in range(16)}

_MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_MD.detail = True


# -- registers, as capstone names them -----------------------------------------------------

@lru_cache(maxsize=None)
def _register(name: str) -> tuple[str, int, int]:
    """(64-bit register, size in bytes, bit shift) for a capstone register name."""
    legacy = {"a": "rax", "b": "rbx", "c": "rcx", "d": "rdx"}
    index = {"si": "rsi", "di": "rdi", "bp": "rbp", "sp": "rsp"}
    if name.startswith("r") and name[1:].rstrip("dwb").isdigit():
        full, suffix = "r" + name[1:].rstrip("dwb"), name[len(name.rstrip("dwb")):]
        return full, {"": 8, "d": 4, "w": 2, "b": 1}[suffix], 0
    if name[0] in "re" and name[1:] in index:
        return index[name[1:]], 8 if name[0] == "r" else 4, 0
    if name in index:
        return index[name], 2, 0
    if name[:-1] in index and name[-1] == "l":
        return index[name[:-1]], 1, 0
    if name[0] in "re" and name[2:] == "x" and name[1] in legacy:
        return legacy[name[1]], 8 if name[0] == "r" else 4, 0
    if len(name) == 2 and name[0] in legacy:
        return legacy[name[0]], {"x": 2, "l": 1, "h": 1}[name[1]], 8 if name[1] == "h" else 0
    raise GuestFault(f"trap: no register named {name}")


def get_reg(vm: Vm, insn, reg: int) -> int:
    full, size, shift = _register(insn.reg_name(reg))
    return (vm.cpu.regs[full] >> shift) & ((1 << 8 * size) - 1)


def set_reg(vm: Vm, insn, reg: int, value: int) -> None:
    """Write a general register as the CPU would: a 32-bit write zero-extends, narrower ones merge."""
    full, size, shift = _register(insn.reg_name(reg))
    if size >= 4:
        vm.cpu.regs[full] = value & ((1 << 8 * size) - 1)
        return
    mask = ((1 << 8 * size) - 1) << shift
    vm.cpu.regs[full] = vm.cpu.regs[full] & ~mask | (value << shift) & mask


def set_edx_eax(vm: Vm, value: int) -> None:
    vm.cpu.regs["rax"] = value & 0xFFFFFFFF
    vm.cpu.regs["rdx"] = (value >> 32) & 0xFFFFFFFF


def address_of(vm: Vm, insn, op) -> int:
    """The effective (guest-virtual) address of a memory operand."""
    m = op.mem
    addr = m.disp
    if m.base == C.X86_REG_RIP:
        addr += insn.address + insn.size
    elif m.base:
        addr += get_reg(vm, insn, m.base)
    if m.index:
        addr += get_reg(vm, insn, m.index) * m.scale
    if m.segment in (C.X86_REG_FS, C.X86_REG_GS):
        addr += vm.cpu.regs.msr(FS_BASE if m.segment == C.X86_REG_FS else GS_BASE)
    return addr & MASK64


def control_register(insn, op) -> int | None:
    if op.type != C.X86_OP_REG:
        return None
    name = insn.reg_name(op.reg)
    return int(name[2:]) if name.startswith("cr") else None


# -- emulation, one function per instruction ----------------------------------------------

def cli(vm: Vm, insn) -> None:
    word = vm.cpu.regs.eflags_word            # a raw field: current inside an exit (engine.py)
    word.value &= ~RFLAGS_IF


def sti(vm: Vm, insn) -> None:
    if not vm.cpu.interrupt_flag:
        vm.cpu.set_interrupt_flag(True)
        vm.run.shadow()                       # nothing is taken before the next instruction


def hlt(vm: Vm, insn) -> None:
    vm.run.halt(interrupts_enabled=vm.cpu.interrupt_flag)


def iretq(vm: Vm, insn) -> None:
    delivery.iret(vm)


def pushf(vm: Vm, insn) -> None:
    rsp = (vm.cpu.regs["rsp"] - 8) & MASK64
    vm.mmu.write_virt(rsp, struct.pack("<Q", vm.cpu.rflags() & PUSHF_MASK))
    vm.cpu.regs["rsp"] = rsp


def popf(vm: Vm, insn) -> None:
    rsp = vm.cpu.regs["rsp"]
    value, = struct.unpack("<Q", vm.mmu.read_virt(rsp, 8))
    vm.cpu.regs["rsp"] = (rsp + 8) & MASK64
    mask = POPF_MASK if vm.cpu.cpl == 0 else POPF_MASK & ~(RFLAGS_IF | IOPL)   # user mode: silently kept
    vm.cpu.set_rflags((vm.cpu.rflags() & ~mask) | (value & mask) | 2)


def _port(vm: Vm, insn, op) -> int:
    return op.imm & 0xFF if op.type == C.X86_OP_IMM else get_reg(vm, insn, op.reg) & 0xFFFF


def port_in(vm: Vm, insn) -> None:
    dst, src = insn.operands
    set_reg(vm, insn, dst.reg, vm.bus.read(_port(vm, insn, src), dst.size))


def port_out(vm: Vm, insn) -> None:
    dst, src = insn.operands
    vm.bus.write(_port(vm, insn, dst), src.size, get_reg(vm, insn, src.reg))


def mov_cr(vm: Vm, insn) -> None:
    dst, src = insn.operands
    n = control_register(insn, dst)
    if n is None:                                  # mov reg, crN
        set_reg(vm, insn, dst.reg, vm.cpu.read_cr(control_register(insn, src)))
    elif n == 3:
        vm.mmu.load_root(get_reg(vm, insn, src.reg))
    else:
        vm.cpu.write_cr(n, get_reg(vm, insn, src.reg))


def invlpg(vm: Vm, insn) -> None:
    vm.mmu.flush(address_of(vm, insn, insn.operands[0]))


def _load_table(which: str) -> Callable:
    def emulate(vm: Vm, insn) -> None:
        limit, base = DESCRIPTOR.unpack(vm.mmu.read_virt(address_of(vm, insn, insn.operands[0]), DESCRIPTOR.size))
        vm.cpu.load_table(which, limit, base, vm.mmu.read_virt)
    return emulate


def _store_table(which: str) -> Callable:
    def emulate(vm: Vm, insn) -> None:
        vm.mmu.write_virt(address_of(vm, insn, insn.operands[0]), DESCRIPTOR.pack(*vm.cpu.read_table(which)))
    return emulate


def rdmsr(vm: Vm, insn) -> None:
    set_edx_eax(vm, vm.msrs.read(vm.cpu.regs["rcx"] & 0xFFFFFFFF))


def wrmsr(vm: Vm, insn) -> None:
    rax, rdx, rcx = vm.cpu.regs.read("rax", "rdx", "rcx")
    vm.cpu.regs.store()
    vm.msrs.write(rcx & 0xFFFFFFFF, (rdx & 0xFFFFFFFF) << 32 | rax & 0xFFFFFFFF)
    vm.cpu.regs.invalidate()
    vm.cpu.remember_control_state()


def cpuid(vm: Vm, insn) -> None:
    regs = vm.cpu.regs
    result = vm.cpuid.query(regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF)
    for name, value in zip(("rax", "rbx", "rcx", "rdx"), result):
        regs[name] = value


def rdtsc(vm: Vm, insn) -> None:
    set_edx_eax(vm, vm.clock.read_tsc())


def rdtscp(vm: Vm, insn) -> None:
    rdtsc(vm, insn)
    vm.cpu.regs["rcx"] = vm.msrs.read(TSC_AUX) & 0xFFFFFFFF


def nothing(vm: Vm, insn) -> None:
    """wbinvd/invd: the emulated machine has no caches to flush."""


def step_natively(vm: Vm, insn) -> None:
    """Let the vCPU run the original instruction once (the run loop does it, outside the hook)."""
    vm.cpu.jump(insn.address)
    vm.run.step_original(insn.address)


EMULATE: dict[str, Callable] = {
    "cli": cli, "sti": sti, "hlt": hlt, "iretq": iretq, "pushfq": pushf, "pushf": pushf, "popfq": popf, "popf": popf,
    "in": port_in, "out": port_out, "invlpg": invlpg,
    "lgdt": _load_table("gdt"), "lidt": _load_table("idt"),
    "sgdt": _store_table("gdt"), "sidt": _store_table("idt"),
    "rdmsr": rdmsr, "wrmsr": wrmsr, "cpuid": cpuid, "rdtsc": rdtsc, "rdtscp": rdtscp,
    "wbinvd": nothing, "invd": nothing,
}
# What Unicorn's vCPU does exactly right by itself (not debug registers: those are refused).
NATIVE = {"swapgs", "iret", "iretd", "ljmp", "lcall", "retf", "retfq", "lar", "lsl", "verr", "verw", "sldt",
          "str", "smsw", "lldt", "ltr", "clts", "lmsw", "xsetbv", "rdpmc", "sysretq", "sysret", "sysexit",
          "push", "pop", "mov", "lss", "lfs", "lgs", "wrfsbase", "wrgsbase", "stac", "clac"}


def emulator_for(insn) -> Callable:
    if insn.mnemonic == "mov" and any(control_register(insn, op) is not None for op in insn.operands):
        return mov_cr
    if insn.mnemonic in EMULATE:
        return EMULATE[insn.mnemonic]
    if insn.mnemonic in NATIVE and not any(
            op.type == C.X86_OP_REG and insn.reg_name(op.reg).startswith("dr") for op in insn.operands):
        return step_natively
    return cannot


def _passed_through(vm: Vm, patch: Patch) -> bool:
    """An MSR access the mode's MSR bitmap lets through: emulated, but no exit (hvm: the FS/GS bases)."""
    return patch.msr and vm.cpu.regs["rcx"] & 0xFFFFFFFF in vm.mode.passthrough_msrs


def cannot(vm: Vm, insn) -> None:
    raise GuestFault(f"trap: cannot emulate '{text(insn)}'")


def text(insn) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


def exit_reason(insn) -> str:
    """`trap cli`; a mov names its special register: `trap mov to cr3`, `trap mov from cr0`, `trap mov ds`."""
    if insn.mnemonic != "mov":
        return f"trap {insn.mnemonic}"
    dst, src = insn.operands
    if control_register(insn, dst) is not None:
        return f"trap mov to {insn.reg_name(dst.reg)}"
    if control_register(insn, src) is not None:
        return f"trap mov from {insn.reg_name(src.reg)}"
    special = next((insn.reg_name(op.reg) for op in insn.operands
                    if op.type == C.X86_OP_REG and insn.reg_name(op.reg) in _SEGMENT_OR_DEBUG), "")
    return f"trap mov {special}".rstrip()


# -- decoding ----------------------------------------------------------------------------------

def decode(vm: Vm, address: int, size: int):
    """The image's instruction at `address` (as the file holds it: no patch in the way)."""
    return _decode(vm.image.info.read(address, size), address)


def decode_at(vm: Vm, rip: int):
    """The instruction the guest is executing at virtual `rip`, read through its page tables."""
    code = b""
    for va, n in ((rip, PAGE - (rip & (PAGE - 1))), ((rip & ~(PAGE - 1)) + PAGE, PAGE)):
        try:
            code += vm.mmu.read_virt(va, min(n, 15 - len(code)))
        except Refused:
            break
        if len(code) >= 15:
            break
    return _decode(vm.patches.original(rip, code), rip)


@lru_cache(maxsize=4096)
def _decode(code: bytes, address: int):
    return next(_MD.disasm(code, address), None)


# -- which instructions exit ------------------------------------------------------------------


def patches_for(vm: Vm, reason_of: Callable) -> list[Patch]:
    """Patches for the image's sensitive instructions that `reason_of(insn)` names an exit for."""
    out = []
    for finding in vm.image.sensitive:
        insn = decode(vm, finding.address, finding.size)
        reason = reason_of(insn) if insn is not None else None
        if reason is not None:
            out.append(Patch(insn.address, insn.size, insn, reason, emulator_for(insn),
                             finding.category == PRIVILEGED, insn.mnemonic in ("rdmsr", "wrmsr")))
    return out


def install(vm: Vm) -> int:
    """The instructions that exit in this mode for the whole run (trap: all of them); returns how many."""
    patches = patches_for(vm, vm.mode.exiting)
    for patch in patches:
        vm.patches.arm(patch)
    return len(patches)


def open_window(vm: Vm) -> None:
    """An interrupt waits for IF: the instructions that can set it exit until it is taken."""
    if vm.run.window is None:
        vm.run.window = [p for p in patches_for(vm, lambda insn: "interrupt window" if insn.mnemonic in WINDOW
                                                 else None) if p.address not in vm.patches.live]
        for patch in vm.run.window:
            vm.patches.arm(patch)


def close_window(vm: Vm) -> None:
    if vm.run.window is not None:
        for patch in vm.run.window:
            vm.patches.disarm(patch.address)
        vm.run.window = None


def on_patch(vm: Vm, patch: Patch) -> None:
    """The CPU reached a patched instruction: the exit.  RIP is past the breakpoint byte."""
    regs = vm.cpu.regs
    if patch.privileged and regs.hflags_word.value & HF_CPL_MASK == 3:   # what the real instruction
        raise GuestException(13, 0, patch.address)    # does in user mode: the #GP is the exit
    if not patch.msr or not _passed_through(vm, patch):
        vm.run.count(patch.reason, patch.address)
    regs.gprs[RIP_INDEX] = patch.next             # first: an emulation may send the guest elsewhere
    try:
        patch.emulate(vm, patch.insn)
    except Refused as e:
        raise GuestFault(f"{text(patch.insn)} refused: {e.why}", patch.address) from None
    except GuestFault as e:
        raise GuestFault(e.what, patch.address if e.rip is None else e.rip) from None
