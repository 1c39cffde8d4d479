"""The vCPU's registers as gdb numbers them, and the rules for a debugger that writes them.

One table, `REGISTERS`, gives each register its gdb number (its place in
the table), size, type and kind; it drives the `g`/`p` packets and the
target description (`target_xml`): gdb's i386 core and SSE features in
their usual order, the segment bases, and a feature of our own with the
control registers and EFER.

Reads show the machine as it is.  Writes are held to what the guest
could do itself at its privilege level, so a debugger cannot weaken the
guest's protections:

- general registers: anything;
- RIP: only where the guest may be sent (the debugger's `check_code`:
  in pv and trap mode an instruction start of the checked code);
- RFLAGS: the bits popf may change (no TF: single-stepping is the
  debugger's, not the guest's); not IF or IOPL in pv mode or outside
  ring 0;
- segment selectors: a present descriptor of the right kind in the guest's
  GDT, at the current privilege level, as a segment load checks;
- control registers and EFER: CR0/CR2/CR4 through the same checks as an
  emulated `mov crN`, CR3 through the MMU's validation where the
  hypervisor tracks page tables; in pv mode the guest changes them only
  by hypercall, so they are read-only here.  EFER is read-only.

A write that changes nothing always succeeds (gdb's `G` writes them all).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from unicorn import UcError
from unicorn import x86_const as U

from pvimage import abi

from .cpu import RFLAGS_IF
from .devices.msr import canonical
from .errors import Refused
from .exits.trapped import POPF_MASK

if TYPE_CHECKING:
    from .machine import Vm

EPERM, EFAULT, EINVAL = abi.EPERM, abi.EFAULT, abi.EINVAL
IOPL = 0x3000
CORE, SSE, SEGMENTS, CONTROL = ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                                "org.gnu.gdb.i386.segments", "org.pvtool.x86.control")


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str          # the target description's type
    feature: str
    kind: str          # how it is read and written: see `read` and `write`
    uc: int = 0        # Unicorn's id, for the registers read through its API
    group: str = ""


def _table() -> list[Reg]:
    gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{n}" for n in range(8, 16)]
    regs = [Reg(n, 64, {"rbp": "data_ptr", "rsp": "data_ptr"}.get(n, "int64"), CORE, "gpr") for n in gprs]
    regs += [Reg("rip", 64, "code_ptr", CORE, "rip"), Reg("eflags", 32, "eflags_bits", CORE, "eflags")]
    regs += [Reg(n, 32, "int32", CORE, "segment", getattr(U, f"UC_X86_REG_{n.upper()}"))
             for n in ("cs", "ss", "ds", "es", "fs", "gs")]
    regs += [Reg(f"st{k}", 80, "i387_ext", CORE, "x87", getattr(U, f"UC_X86_REG_FP{k}")) for k in range(8)]
    regs += [Reg("fctrl", 32, "int", CORE, "fpu", U.UC_X86_REG_FPCW, "float"),
             Reg("fstat", 32, "int", CORE, "fpu", U.UC_X86_REG_FPSW, "float"),
             Reg("ftag", 32, "int", CORE, "ftag", U.UC_X86_REG_FPTAG, "float")]
    regs += [Reg(n, 32, "int", CORE, "unmodelled", 0, "float")
             for n in ("fiseg", "fioff", "foseg", "fooff", "fop")]
    regs += [Reg(f"xmm{k}", 128, "uint128", SSE, "vector", getattr(U, f"UC_X86_REG_XMM{k}")) for k in range(16)]
    regs += [Reg("mxcsr", 32, "int", SSE, "mxcsr", U.UC_X86_REG_MXCSR, "vector")]
    regs += [Reg("fs_base", 64, "int", SEGMENTS, "base", U.UC_X86_REG_FS_BASE),
             Reg("gs_base", 64, "int", SEGMENTS, "base", U.UC_X86_REG_GS_BASE)]
    regs += [Reg(f"cr{n}", 64, "int", CONTROL, "control", n, "system") for n in (0, 2, 3, 4)]
    regs += [Reg("efer", 64, "int", CONTROL, "efer", 0, "system")]
    return regs


REGISTERS = _table()
NUMBER = {r.name: k for k, r in enumerate(REGISTERS)}
EXPEDITED = (NUMBER["rbp"], NUMBER["rsp"], NUMBER["rip"])    # sent with every stop reply
EFLAGS_BITS = {"CF": 0, "PF": 2, "AF": 4, "ZF": 6, "SF": 7, "TF": 8, "IF": 9, "DF": 10, "OF": 11,
               "NT": 14, "RF": 16, "VM": 17, "AC": 18, "VIF": 19, "VIP": 20, "ID": 21}


@lru_cache(maxsize=None)
def target_xml() -> str:
    """The target description gdb asks for with qXfer:features:read."""
    out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', '<target version="1.0">',
           "<architecture>i386:x86-64</architecture>"]
    feature = None
    for k, r in enumerate(REGISTERS):
        if r.feature != feature:
            if feature is not None:
                out.append("</feature>")
            feature = r.feature
            out.append(f'<feature name="{feature}">')
            if feature == CORE:
                out.append('<flags id="eflags_bits" size="4">')
                out += [f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in EFLAGS_BITS.items()]
                out.append("</flags>")
        group = f' group="{r.group}"' if r.group else ""
        out.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{k}"{group}/>')
    out += ["</feature>", "</target>"]
    return "\n".join(out) + "\n"


# -- reading -------------------------------------------------------------------------------

def read(vm: Vm, reg: Reg) -> int:
    cpu, uc = vm.cpu, vm.engine.uc
    match reg.kind:
        case "gpr":
            return cpu.regs[reg.name]
        case "rip":
            return cpu.rip
        case "eflags":
            return cpu.rflags()
        case "segment":
            return cpu.segment(reg.uc)
        case "x87":
            mantissa, exponent = _api(vm, reg.uc)
            return mantissa | exponent << 64
        case "fpu" | "vector" | "mxcsr" | "base":
            return _api(vm, reg.uc)
        case "ftag":
            return _ftag(_api(vm, reg.uc))
        case "unmodelled":
            return 0
        case "control":
            return cpu.read_cr(reg.uc)
        case "efer":
            return cpu.regs.efer
    raise AssertionError(f"register kind {reg.kind}")


def encode(reg: Reg, value: int) -> bytes:
    return (value & ((1 << reg.bits) - 1)).to_bytes(reg.bits // 8, "little")


def _api(vm: Vm, uc_id: int):
    vm.cpu.regs.store()
    return vm.engine.uc.reg_read(uc_id)


def _ftag(raw: int) -> int:
    """Unicorn reports one bit per x87 register at every other bit, 1 when empty (measured: a
    fresh CPU reads 0x5555); gdb wants the FSAVE tag word, two bits each, 3 when empty."""
    return sum(3 << 2 * k for k in range(8) if raw >> 2 * k & 1)


# -- writing -------------------------------------------------------------------------------

def write(vm: Vm, reg: Reg, value: int, check_code: Callable[[int, str], None]) -> None:
    """Change one register, or Refused if the guest could not have made that change itself
    (`check_code(address, what)` refuses an address the guest may not be sent to)."""
    value &= (1 << reg.bits) - 1
    if read(vm, reg) == value:
        return
    cpu = vm.cpu
    match reg.kind:
        case "gpr":
            cpu.regs[reg.name] = value
        case "rip":
            check_code(value, "RIP")
            cpu.regs.rip = value
        case "eflags":
            _write_rflags(vm, value)
        case "segment":
            _check_selector(vm, reg.name, value)
            _set_api(vm, reg.uc, value)
        case "x87":
            _set_api(vm, reg.uc, (value & ((1 << 64) - 1), value >> 64))
        case "fpu" | "vector":
            _set_api(vm, reg.uc, value)
        case "mxcsr":
            if value >> 16:
                raise Refused(EINVAL, f"MXCSR value {value:#x} sets reserved bits")
            _set_api(vm, reg.uc, value)
        case "base":
            if not canonical(value):
                raise Refused(EINVAL, f"{reg.name} {value:#x} is not canonical")
            _set_api(vm, reg.uc, value)
        case "control":
            _write_control(vm, reg.uc, value)
        case _:                                  # ftag, the unmodelled x87 pointers, EFER
            raise Refused(EPERM, f"{reg.name} cannot be changed from the debugger")


def _set_api(vm: Vm, uc_id: int, value) -> None:
    regs = vm.cpu.regs
    regs.store()
    try:
        vm.engine.uc.reg_write(uc_id, value)
    except UcError as e:
        raise Refused(EINVAL, f"unicorn refused the value: {e}") from None
    finally:
        regs.invalidate()


def _write_rflags(vm: Vm, value: int) -> None:
    allowed = POPF_MASK
    if vm.mode.virtual_if or vm.cpu.cpl:
        allowed &= ~(RFLAGS_IF | IOPL)         # the real IF and IOPL are the hypervisor's
    changed = (vm.cpu.rflags() ^ value) & ~0x2
    if changed & ~allowed:
        raise Refused(EPERM, f"RFLAGS bits {changed & ~allowed:#x} are not the guest's to change here")
    vm.cpu.set_rflags(value | 0x2)


def _write_control(vm: Vm, n: int, value: int) -> None:
    if vm.mode.name == "pv":
        raise Refused(EPERM, "a pv guest's control registers change only by hypercall")
    if n != 3:
        vm.cpu.write_cr(n, value)
    elif vm.mode.tracks_tables:
        vm.mmu.load_root(value)                  # validated and pinned, as a trapped mov to cr3
    else:
        vm.cpu.load_cr3(value)
        vm.mmu.flush()


# -- segment selectors ---------------------------------------------------------------------

def _check_selector(vm: Vm, name: str, selector: int) -> None:
    """A segment load's checks at the current privilege level (64-bit mode, GDT only)."""
    cpl = vm.cpu.cpl
    index, ldt, rpl = selector >> 3, selector & 4, selector & 3
    if selector >> 16:
        raise Refused(EINVAL, f"{selector:#x} is not a selector")
    if index == 0:
        if name in ("cs",) or name == "ss" and cpl:
            raise Refused(EPERM, f"{name} cannot hold the null selector at CPL {cpl}")
        return
    if ldt:
        raise Refused(EPERM, f"selector {selector:#x} names the LDT, which the runtime does not model")
    limit, base = vm.cpu.read_table("gdt")
    if index * 8 + 7 > limit:
        raise Refused(EINVAL, f"selector {selector:#x} lies beyond the GDT limit {limit:#x}")
    try:
        descriptor, = struct.unpack("<Q", vm.mmu.read_virt(base + index * 8, 8))
    except Refused as e:
        raise Refused(EFAULT, f"cannot read the GDT entry of {selector:#x}: {e.why}") from None
    access = descriptor >> 40 & 0xFF
    present, system, code, dpl = access & 0x80, not access & 0x10, access & 0x08, access >> 5 & 3
    if not present or system:
        raise Refused(EINVAL, f"selector {selector:#x} is not a present code or data segment")
    if name == "cs":
        ok = code and descriptor >> 53 & 1 and dpl == cpl and rpl == cpl    # 64-bit code, no ring change
    elif name == "ss":
        ok = not code and access & 0x02 and dpl == cpl and rpl == cpl       # writable data
    else:
        ok = (not code or access & 0x02) and dpl >= max(cpl, rpl)           # data, or readable code
    if not ok:
        raise Refused(EPERM, f"selector {selector:#x} cannot be loaded into {name} at CPL {cpl}")
