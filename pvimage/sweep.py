"""The sensitive-instruction sweep: which instructions a deprivileged guest must not run.

`sweep_elf` disassembles every executable PT_LOAD segment linearly with
capstone (skipping the hypercall page a PV image declares: the hypervisor
writes it) and reports each sensitive instruction with its function and
source line.  What counts as sensitive is decided here, in one table,
`SENSITIVE`, plus the operand rules in `classify` for the instructions that
are sensitive only with some operands (`mov` to a control register, `push`
of a segment register, far `call`/`jmp`).  `pvtool check` and the
runtime's loader sweep native images with it (trap mode hooks what it
finds); PV images are held to the code rules instead (validate.py, which
classifies with the same table).

Two categories, after Popek and Goldberg: *privileged* instructions fault
outside ring 0 (so trap-and-emulate can catch them); *sensitive-unprivileged*
ones run in any ring but read or change state the hypervisor virtualizes,
silently doing the wrong thing in a deprivileged guest (Robin and Irvine's
list for x86, plus cpuid and rdtsc, which reveal the real machine).
"""
from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86_const as X

from . import abi
from .elfread import ElfInfo, ImageError, load

PRIVILEGED = "privileged"
UNPRIVILEGED = "sensitive-unprivileged"

SweepError = ImageError


def _ids(*names: str) -> tuple[int, ...]:
    return tuple(getattr(X, f"X86_INS_{n}") for n in names)


# capstone instruction ids -> (category, why).  One place for the whole list.
_TABLE: list[tuple[tuple[int, ...], str, str]] = [
    (_ids("CLI", "STI"), PRIVILEGED, "changes IF; faults when IOPL < CPL"),
    (_ids("HLT"), PRIVILEGED, "halts the CPU"),
    (_ids("IN", "INSB", "INSW", "INSD", "OUT", "OUTSB", "OUTSW", "OUTSD"),
     PRIVILEGED, "port I/O; faults when IOPL < CPL"),
    (_ids("LGDT", "LIDT", "LLDT", "LTR"), PRIVILEGED, "loads a descriptor table or task register"),
    (_ids("INVLPG", "INVLPGA", "INVPCID"), PRIVILEGED, "flushes TLB entries"),
    (_ids("INVD", "WBINVD", "WBNOINVD"), PRIVILEGED, "flushes the caches"),
    (_ids("RDMSR", "WRMSR"), PRIVILEGED, "model-specific register access"),
    (_ids("CLTS", "LMSW"), PRIVILEGED, "writes CR0"),
    (_ids("IRET", "IRETD", "IRETQ"), PRIVILEGED, "pops RFLAGS (IF, IOPL) and CS/SS from an interrupt frame"),
    (_ids("SYSRET", "SYSRETQ", "SYSEXIT", "SYSEXITQ"), PRIVILEGED, "returns to user mode; ring 0 only"),
    (_ids("RSM"), PRIVILEGED, "leaves system management mode"),
    (_ids("SWAPGS"), PRIVILEGED, "swaps the kernel GS base; ring 0 only"),
    (_ids("RDPMC"), PRIVILEGED, "reads performance counters (faults unless CR4.PCE)"),
    (_ids("XSETBV", "XSAVES", "XRSTORS"), PRIVILEGED, "supervisor extended state; ring 0 only"),
    (_ids("MONITOR", "MWAIT"), PRIVILEGED, "waits on the CPU (faults outside ring 0 by default)"),
    (_ids("CLAC", "STAC"), PRIVILEGED, "changes RFLAGS.AC for SMAP; ring 0 only"),
    (_ids("VMXON", "VMXOFF", "VMLAUNCH", "VMRESUME", "VMPTRLD", "VMPTRST", "VMCLEAR",
          "VMREAD", "VMWRITE", "INVEPT", "INVVPID", "VMRUN", "VMLOAD", "VMSAVE",
          "STGI", "CLGI", "SKINIT"),
     PRIVILEGED, "hardware virtualization control"),
    (_ids("PUSHF", "PUSHFD", "PUSHFQ"), UNPRIVILEGED, "reveals the real IF and IOPL"),
    (_ids("POPF", "POPFD", "POPFQ"), UNPRIVILEGED, "silently ignores IF and IOPL when deprivileged"),
    (_ids("SGDT", "SIDT", "SLDT", "STR"), UNPRIVILEGED, "reveals the real descriptor tables"),
    (_ids("SMSW"), UNPRIVILEGED, "reveals the real CR0"),
    (_ids("LAR", "LSL", "VERR", "VERW"), UNPRIVILEGED, "checks a selector against the real CPL"),
    (_ids("LSS", "LFS", "LGS"), UNPRIVILEGED, "loads a segment register"),
    (_ids("WRFSBASE", "WRGSBASE"), UNPRIVILEGED, "writes a segment base the hypervisor tracks"),
    (_ids("LCALL", "LJMP", "RETF", "RETFQ"), UNPRIVILEGED, "far transfer: checks CS against the real CPL"),
    (_ids("CPUID"), UNPRIVILEGED, "reveals the real CPU"),
    (_ids("RDTSC", "RDTSCP"), UNPRIVILEGED, "reveals real time"),
]

SENSITIVE: dict[int, tuple[str, str]] = {i: (cat, why) for ids, cat, why in _TABLE for i in ids}

_CONTROL = {getattr(X, f"X86_REG_CR{n}") for n in range(16)}
_DEBUG = {getattr(X, f"X86_REG_DR{n}") for n in range(16)}
_SEGMENT = {X.X86_REG_CS, X.X86_REG_DS, X.X86_REG_ES, X.X86_REG_FS, X.X86_REG_GS, X.X86_REG_SS}
# A guest's ways to call its hypervisor: capstone groups them as privileged, but they are not sensitive.
_GUEST_CALLS = set(_ids("VMCALL", "VMMCALL", "VMFUNC"))
_FAR_MODRM = {X.X86_INS_CALL: 3, X.X86_INS_JMP: 5}   # ff /3 is call far, ff /5 jmp far


@dataclass
class Finding:
    address: int
    size: int
    mnemonic: str
    op_str: str
    category: str
    function: str | None = None
    file: str | None = None
    line: int | None = None
    why: str = ""

    @property
    def asm(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


def classify(insn) -> tuple[str, str] | None:
    """(category, why) if a capstone instruction (decoded with detail) is sensitive."""
    hit = SENSITIVE.get(insn.id)
    if hit:
        return hit
    regs = {op.reg for op in insn.operands if op.type == X.X86_OP_REG}
    if insn.id == X.X86_INS_MOV:
        if regs & _CONTROL:
            return PRIVILEGED, "moves to or from a control register"
        if regs & _DEBUG:
            return PRIVILEGED, "moves to or from a debug register"
        if regs & _SEGMENT:
            return UNPRIVILEGED, "moves to or from a segment register"
    if insn.id in (X.X86_INS_PUSH, X.X86_INS_POP) and regs & _SEGMENT:
        return UNPRIVILEGED, "pushes or pops a segment register"
    if insn.id in _FAR_MODRM and insn.opcode[0] == 0xFF and (insn.modrm >> 3) & 7 == _FAR_MODRM[insn.id]:
        return UNPRIVILEGED, "far transfer: checks CS against the real CPL"
    if X.X86_GRP_PRIVILEGE in insn.groups and insn.id not in _GUEST_CALLS:
        return PRIVILEGED, "ring 0 only"   # capstone may know ring-0 instructions the table does not
    return None


_DISASSEMBLERS: dict[int, capstone.Cs] = {}


def _disassembler(bits: int) -> capstone.Cs:
    if bits not in _DISASSEMBLERS:
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32)
        md.detail = True
        md.skipdata = True     # data in text: skip a byte and go on decoding
        _DISASSEMBLERS[bits] = md
    return _DISASSEMBLERS[bits]


def decode(code: bytes, address: int, bits: int = 64):
    """Linear sweep of `code` at `address`: capstone instructions (with detail), undecodable bytes skipped."""
    for insn in _disassembler(bits).disasm(code, address):
        if insn.id != 0:   # 0: a skipped data byte
            yield insn


def sweep_bytes(code: bytes, address: int, bits: int = 64) -> list[Finding]:
    """Every sensitive instruction in `code` loaded at `address`."""
    found = []
    for insn in decode(code, address, bits):
        hit = classify(insn)
        if hit:
            found.append(Finding(insn.address, insn.size, insn.mnemonic, insn.op_str, hit[0], why=hit[1]))
    return found


def _cut(ranges: list[tuple[int, bytes]], lo: int, hi: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """Split byte ranges into the parts outside and inside [lo, hi)."""
    outside, inside = [], []
    for addr, data in ranges:
        end = addr + len(data)
        a, b = max(lo, addr), min(hi, end)
        if a >= b:
            outside.append((addr, data))
            continue
        outside += [(addr, data[:a - addr]), (b, data[b - addr:])]
        inside.append((a, data[a - addr:b - addr]))
    return [(a, d) for a, d in outside if d], inside


def code_ranges(info: ElfInfo) -> list[tuple[int, bytes, int]]:
    """(address, bytes, bits) to check: the executable segments less the hypercall page,
    with the PVH entry routine decoded as 32-bit code."""
    ranges = [(s.address, s.data) for s in info.executable]
    hp = info.hypercall_page
    if hp is not None:
        ranges, _ = _cut(ranges, hp, hp + abi.PAGE_SIZE)
    code32: list[tuple[int, bytes]] = []
    if info.code32:
        ranges, code32 = _cut(ranges, *info.code32)
    out = [(a, d, 64) for a, d in ranges] + [(a, d, 32) for a, d in code32]
    return sorted(out)


def sweep_image(info: ElfInfo) -> list[Finding]:
    """Sweep a loaded image; findings carry function and source line where known."""
    found = []
    for address, code, bits in code_ranges(info):
        for f in sweep_bytes(code, address, bits):
            hit = info.function_at(f.address)
            f.function = hit[0].name if hit else None
            src = info.line_at(f.address)
            if src:
                f.file, f.line = src
            found.append(f)
    return found


def sweep_elf(data: bytes) -> list[Finding]:
    """Sweep the bytes of an ELF64 x86-64 image; raises SweepError (an ImageError) if unreadable."""
    return sweep_image(load(data))
