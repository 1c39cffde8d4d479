"""Trap-and-emulate: a native image, every sensitive instruction an exit.

A real trap-and-emulate hypervisor runs the guest kernel deprivileged
(ring 1 or 3), so each privileged instruction faults into it.  Unicorn
cannot deprivilege the guest: its vCPU runs the guest at CPL 0 and would
simply execute `cli` or `mov cr3`.  So the static sweep (`pvimage.sweep`,
the code `pvtool check` runs) picks the addresses, and each one gets a
Unicorn code hook with begin = end = that address.  The hook is the trap:
the hypervisor decodes the instruction (capstone, once, at set-up),
emulates it on the virtual CPU state and skips it by writing RIP (found by
experiment: writing RIP in a code hook skips the instruction).  A sensitive
instruction a linear sweep cannot see (hidden inside another instruction's
bytes) would run unhooked: that is the limit of static hooking, and the
guest-physical protection in memory.py bounds what such code can reach.

Instructions whose whole effect is on state Unicorn's vCPU models exactly
(segment loads, swapgs, far transfers, ...) are "emulated" by letting the
vCPU run them once the exit is counted.  An instruction with no emulation
is a fault.  The ones that change IF (cli, sti, popf, iretq) are emulated
on the virtual CPU, so an interrupt waiting for IF is delivered right after
the instruction that sets it (by the check after every exit; the one-
instruction shadow of a real `sti` is not modelled).  `hlt` idles: the
virtual clock skips to the next deadline that can wake the guest.

Page tables are shadowed the classic way: the live tables are
write-protected (memory.py), a store to one traps, and the store is
decoded, validated by the MMU and performed, then skipped.  Only plain
`mov` stores of up to 8 bytes inside one entry are emulated.  A refused
update, CR3 load or any other refused operation stops the guest with a
fault report.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import capstone
from capstone import x86_const as C
from unicorn import UC_HOOK_CODE
from unicorn import x86_const as U

from .devices.msr import FS_BASE, GS_BASE, TSC_AUX
from .errors import GuestFault, Refused
from .memory import PAGE, page_of
from .vcpu import CODE, DESCRIPTOR, RFLAGS_IF

if TYPE_CHECKING:
    from .hypervisor import Machine

MASK64 = (1 << 64) - 1
# RFLAGS bits popf may change at CPL 0 (not TF: single-stepping is not emulated)
POPF_MASK = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x200 | 0x400 | 0x800 | 0x3000 | 0x4000 | 0x40000 | 0x200000
PUSHF_MASK = ~((1 << 16) | (1 << 17)) & MASK64   # RF and VM read as 0
PASS_THROUGH = {"swapgs", "iret", "iretd", "ljmp", "lcall", "retf", "retfq", "lar", "lsl",
                "verr", "verw", "sldt", "str", "smsw", "lldt", "ltr", "clts", "lmsw", "xsetbv",
                "rdpmc", "sysretq", "sysret", "sysexit", "push", "pop", "mov", "lss", "lfs", "lgs",
                "wrfsbase", "wrgsbase", "stac", "clac"}
_STORES = {"mov", "movabs", "movq", "movnti"}       # the page-table writes trap mode emulates
_SEGMENT_OR_DEBUG = {"cs", "ds", "es", "fs", "gs", "ss"} | {f"dr{n}" for n in range(16)}


def _disassembler() -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


_MD = _disassembler()


# -- registers ------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _uc_reg(name: str) -> int:
    return getattr(U, f"UC_X86_REG_{name.upper()}")


_REG32 = {f"e{r}": f"r{r}" for r in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")}
_REG32.update({f"r{n}d": f"r{n}" for n in range(8, 16)})


def get_reg(vm: Machine, insn, reg: int) -> int:
    return vm.uc.reg_read(_uc_reg(insn.reg_name(reg)))


def set_reg(vm: Machine, insn, reg: int, value: int) -> None:
    """Write a general register as the CPU would: a 32-bit write zero-extends."""
    name = insn.reg_name(reg)
    if name in _REG32:
        vm.uc.reg_write(_uc_reg(_REG32[name]), value & 0xFFFFFFFF)
    else:
        vm.uc.reg_write(_uc_reg(name), value)


def set_edx_eax(vm: Machine, value: int) -> None:
    vm.uc.reg_write(U.UC_X86_REG_RAX, value & 0xFFFFFFFF)
    vm.uc.reg_write(U.UC_X86_REG_RDX, (value >> 32) & 0xFFFFFFFF)


def address_of(vm: Machine, insn, op) -> int:
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
        addr += vm.uc.msr_read(FS_BASE if m.segment == C.X86_REG_FS else GS_BASE)
    return addr & MASK64


def control_register(insn, op) -> int | None:
    if op.type != C.X86_OP_REG:
        return None
    name = insn.reg_name(op.reg)
    return int(name[2:]) if name.startswith("cr") else None


# -- emulation, one function per instruction ----------------------------------------------

def _rflags(vm: Machine) -> int:
    return vm.uc.reg_read(U.UC_X86_REG_RFLAGS)


def cli(vm: Machine, insn) -> None:
    vm.uc.reg_write(U.UC_X86_REG_RFLAGS, _rflags(vm) & ~RFLAGS_IF)


def sti(vm: Machine, insn) -> None:
    vm.uc.reg_write(U.UC_X86_REG_RFLAGS, _rflags(vm) | RFLAGS_IF)


def hlt(vm: Machine, insn) -> None:
    vm.vcpu.halt(interrupts_enabled=bool(_rflags(vm) & RFLAGS_IF))


def iretq(vm: Machine, insn) -> None:
    vm.vcpu.iret()


def pushf(vm: Machine, insn) -> None:
    rsp = (vm.uc.reg_read(U.UC_X86_REG_RSP) - 8) & MASK64
    vm.mmu.write_virt(rsp, struct.pack("<Q", _rflags(vm) & PUSHF_MASK))
    vm.uc.reg_write(U.UC_X86_REG_RSP, rsp)


def popf(vm: Machine, insn) -> None:
    rsp = vm.uc.reg_read(U.UC_X86_REG_RSP)
    value, = struct.unpack("<Q", vm.mmu.read_virt(rsp, 8))
    vm.uc.reg_write(U.UC_X86_REG_RFLAGS, (_rflags(vm) & ~POPF_MASK) | (value & POPF_MASK) | 2)
    vm.uc.reg_write(U.UC_X86_REG_RSP, (rsp + 8) & MASK64)


def _port(vm: Machine, insn, op) -> int:
    return op.imm & 0xFF if op.type == C.X86_OP_IMM else get_reg(vm, insn, op.reg) & 0xFFFF


def port_in(vm: Machine, insn) -> None:
    dst, src = insn.operands
    set_reg(vm, insn, dst.reg, vm.bus.read(_port(vm, insn, src), dst.size))


def port_out(vm: Machine, insn) -> None:
    dst, src = insn.operands
    vm.bus.write(_port(vm, insn, dst), src.size, get_reg(vm, insn, src.reg))


def mov_cr(vm: Machine, insn) -> None:
    dst, src = insn.operands
    n = control_register(insn, dst)
    if n is None:                                  # mov reg, crN
        set_reg(vm, insn, dst.reg, vm.vcpu.read_cr(control_register(insn, src)))
    elif n == 3:
        vm.mmu.load_root(get_reg(vm, insn, src.reg))
    else:
        vm.vcpu.write_cr(n, get_reg(vm, insn, src.reg))


def invlpg(vm: Machine, insn) -> None:
    vm.mmu.flush()


def _load_table(which: str) -> Callable:
    def emulate(vm: Machine, insn) -> None:
        vm.vcpu.load_descriptor(which, address_of(vm, insn, insn.operands[0]))
    return emulate


def _store_table(which: str) -> Callable:
    def emulate(vm: Machine, insn) -> None:
        vm.mmu.write_virt(address_of(vm, insn, insn.operands[0]), DESCRIPTOR.pack(*vm.vcpu.read_table(which)))
    return emulate


def rdmsr(vm: Machine, insn) -> None:
    set_edx_eax(vm, vm.msrs.read(vm.uc.reg_read(U.UC_X86_REG_ECX)))


def wrmsr(vm: Machine, insn) -> None:
    eax, edx, ecx = (vm.uc.reg_read(r) for r in (U.UC_X86_REG_EAX, U.UC_X86_REG_EDX, U.UC_X86_REG_ECX))
    vm.msrs.write(ecx, (edx << 32) | eax)


def cpuid(vm: Machine, insn) -> None:
    vm.cpuid.execute(vm.uc)


def rdtsc(vm: Machine, insn) -> None:
    set_edx_eax(vm, vm.clock.read_tsc())


def rdtscp(vm: Machine, insn) -> None:
    rdtsc(vm, insn)
    vm.uc.reg_write(U.UC_X86_REG_RCX, vm.msrs.read(TSC_AUX) & 0xFFFFFFFF)


def nothing(vm: Machine, insn) -> None:
    """wbinvd/invd: the emulated machine has no caches to flush."""


EMULATE: dict[str, Callable] = {
    "cli": cli, "sti": sti, "hlt": hlt, "iretq": iretq, "pushfq": pushf, "pushf": pushf, "popfq": popf, "popf": popf,
    "in": port_in, "out": port_out, "invlpg": invlpg,
    "lgdt": _load_table("gdt"), "lidt": _load_table("idt"),
    "sgdt": _store_table("gdt"), "sidt": _store_table("idt"),
    "rdmsr": rdmsr, "wrmsr": wrmsr, "cpuid": cpuid, "rdtsc": rdtsc, "rdtscp": rdtscp,
    "wbinvd": nothing, "invd": nothing,
}


def emulator_for(insn) -> tuple[Callable | None, bool]:
    """(emulate function or None, skip afterwards); None with skip False means let the vCPU run it."""
    if insn.mnemonic == "mov" and any(control_register(insn, op) is not None for op in insn.operands):
        return mov_cr, True
    if insn.mnemonic in EMULATE:
        return EMULATE[insn.mnemonic], True
    if insn.mnemonic in PASS_THROUGH and not any(
            op.type == C.X86_OP_REG and insn.reg_name(op.reg).startswith("dr") for op in insn.operands):
        return None, False
    return _cannot, True


def _cannot(vm: Machine, insn) -> None:
    raise GuestFault(f"trap: cannot emulate '{_text(insn)}'")


def _text(insn) -> str:
    return f"{insn.mnemonic} {insn.op_str}".strip()


# -- installation -------------------------------------------------------------------------

def install(vm: Machine) -> int:
    """Hook every sensitive instruction the sweep found; returns how many."""
    for finding in vm.image.sensitive:
        code = vm.image.info.read(finding.address, finding.size)
        insn = next(_MD.disasm(code, finding.address), None)
        if insn is None:
            continue
        emulate, skip = emulator_for(insn)
        vm.uc.hook_add(UC_HOOK_CODE, vm.vcpu.guard(_trap(vm, insn, emulate, skip), CODE), None,
                       finding.address, finding.address)
    decoded: dict[int, object] = {}          # page-table-writing instructions by guest-physical address
    vm.vcpu.on_write_protect = lambda pa, size, value: page_table_write(vm, decoded, pa, size, value)
    return len(vm.image.sensitive)


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


def _trap(vm: Machine, insn, emulate: Callable | None, skip: bool) -> Callable:
    reason = exit_reason(insn)

    def on_trap(address: int, size: int) -> None:
        vm.vcpu.count(reason)
        if skip:                # first: an emulation may send the guest elsewhere (iretq)
            vm.uc.reg_write(U.UC_X86_REG_RIP, address + insn.size)
        if emulate is not None:
            try:
                emulate(vm, insn)
            except Refused as e:
                raise GuestFault(f"{_text(insn)} refused: {e.why}", address) from None
            except GuestFault as e:
                raise GuestFault(e.what, address if e.rip is None else e.rip) from None
    return on_trap


def page_table_write(vm: Machine, decoded: dict, pa: int, size: int, value: int) -> bool:
    """A store hit a write-protected page: emulate it if it is a live page-table entry."""
    if vm.mmu.release(pa, size, value):
        vm.vcpu.count("table page released")
        return True
    if page_of(pa) not in vm.mmu.tables:
        return False
    vm.vcpu.count("page-table write")
    rip = vm.vcpu.rip
    insn = _decode_at(vm, decoded, rip)
    entry = pa & ~7
    if insn is None or insn.mnemonic not in _STORES or size > 8 or pa + size > entry + 8:
        what = f"'{_text(insn)}'" if insn else "an undecodable instruction"
        raise GuestFault(f"page-table write by {what} cannot be emulated (only plain mov stores)")
    shift = 8 * (pa - entry)
    mask = ((1 << 8 * size) - 1) << shift
    new = (vm.mem.read_u64(entry) & ~mask) | (value << shift)
    try:
        vm.mmu.write_entry(entry, new)
    except Refused as e:
        raise GuestFault(f"page-table write refused: {e.why}") from None
    vm.uc.reg_write(U.UC_X86_REG_RIP, rip + insn.size)
    return True


def _decode_at(vm: Machine, decoded: dict, rip: int):
    """The instruction at `rip`, cached by guest-physical address (text never changes)."""
    try:
        key = vm.mmu.translate(rip)
    except Refused:
        return None
    if key not in decoded:
        decoded[key] = _decode(vm, rip)
    return decoded[key]


def _decode(vm: Machine, rip: int):
    code = b""
    for va, n in ((rip, PAGE - (rip & (PAGE - 1))), (page_of(rip) + PAGE, PAGE)):
        try:
            code += vm.mmu.read_virt(va, min(n, 15 - len(code)))
        except Refused:
            break
        if len(code) >= 15:
            break
    return next(_MD.disasm(code, rip), None)
