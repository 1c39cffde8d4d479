"""An independent check of the PV code rules (codespec.md) on what the compiler emits.

Written from the rules, not from the compiler: capstone decodes every 32-byte
bundle of the executable code on its own (the loader's view: each executable
segment zero-filled to its page end, the hypercall page left out), and each
finding names the rule and the address.  Besides the validator's rules
(R1-R7) it checks the back end's own obligation that every call ends on a
bundle end, so that return addresses survive the masking.

`image_findings(elf_bytes)` checks a linked image; `code_findings(code)`
checks one function's bytes before linking (branches that leave the
function are relocations and are not followed).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import capstone
from elftools.elf.elffile import ELFFile

from pvimage import abi

BUNDLE = 32
PAGE = 0x1000
REG64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
DIRECT = {"jmp", "call", "loop", "loope", "loopne", "jrcxz", "jecxz"}
# R4 beyond the sensitive instructions (the sweep's table, checked by test_zz_no_sensitive.py):
# returns, and xbegin, whose abort address is a control transfer the rules do not track.
FORBIDDEN = {"ret", "retf", "retfq", "xbegin"}
_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    operand: str
    raw: bytes

    @property
    def end(self) -> int:
        return self.address + self.size

    def target(self) -> int | None:
        """The target of a direct branch, else None."""
        if self.mnemonic in DIRECT or (self.mnemonic.startswith("j") and self.mnemonic != "jmp"):
            try:
                return int(self.operand, 0)
            except ValueError:
                return None
        return None


def mask_of(r: int) -> bytes:
    """and r64, -32: REX.W 83 /4 ib with imm8 0xe0."""
    return bytes((0x48 | r >> 3, 0x83, 0xE0 | r & 7, 0xE0))


def decode(base: int, code: bytes, findings: list[str]) -> list[Insn]:
    """Every bundle on its own; a bundle that does not decode whole is an R3 finding."""
    insns = []
    for at in range(0, len(code), BUNDLE):
        chunk = code[at:at + BUNDLE]
        got = 0
        for address, size, mnemonic, operand in _CS.disasm_lite(chunk, base + at):
            insns.append(Insn(address, size, mnemonic, operand, chunk[got:got + size]))
            got += size
        if got != len(chunk):
            findings.append(f"R3: bundle {base + at:#x} does not decode into whole instructions "
                            f"(stops at {base + at + got:#x})")
    return insns


def branch_findings(insns: list[Insn], starts: set[int], inside, hypercall_page: int | None) -> list[str]:
    """R4 (forbidden control transfers), R5, R6 and the calls-end-on-a-bundle-end obligation."""
    findings = []
    paired = set()                        # the jmp/call of each masked pair
    for prev, ins in zip([None] + insns[:-1], insns):
        text = f"{ins.mnemonic} {ins.operand}".strip()
        where = f"'{text}' at {ins.address:#x}"
        if ins.mnemonic in FORBIDDEN:
            findings.append(f"R4: {where}")
        if ins.mnemonic in ("jmp", "call") and ins.operand in REG64:
            r = REG64.index(ins.operand)
            if prev is None or prev.raw != mask_of(r) or prev.address // BUNDLE != ins.address // BUNDLE:
                findings.append(f"R6: {where} is not preceded by 'and {ins.operand}, -32' in its bundle")
            paired.add(ins.address)
        elif ins.mnemonic in ("jmp", "call") and ins.target() is None:
            findings.append(f"R4: {where} (memory-indirect)")
        if ins.mnemonic == "call" and ins.end % BUNDLE:
            findings.append(f"call rule: {where} does not end on a bundle end")
    for ins in insns:
        target = ins.target()
        if target is None or not inside(target):
            continue
        hc = hypercall_page is not None and 0 <= target - hypercall_page < PAGE
        if hc and ((target - hypercall_page) % abi.HYPERCALL_STRIDE
                   or (target - hypercall_page) // abi.HYPERCALL_STRIDE >= abi.HC_COUNT):
            findings.append(f"R5: '{ins.mnemonic}' at {ins.address:#x} enters the hypercall page "
                            f"at {target:#x}, not a hypercall entry")
        elif not hc and target not in starts:
            findings.append(f"R5: '{ins.mnemonic}' at {ins.address:#x} targets {target:#x}, "
                            f"not an instruction start")
        elif target in paired:
            findings.append(f"R5/R6: '{ins.mnemonic}' at {ins.address:#x} targets the second "
                            f"instruction of a masked pair at {target:#x}")
    return findings


def code_findings(code: bytes) -> list[str]:
    """The rules on one function's unlinked bytes (it starts a bundle)."""
    findings: list[str] = []
    insns = decode(0, code, findings)
    starts = {i.address for i in insns}
    return findings + branch_findings(insns, starts, lambda t: 0 <= t < len(code), None)


def _notes(elf: ELFFile) -> dict[int, bytes]:
    out = {}
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_NOTE":
            continue
        blob, at = seg.data(), 0
        while at + 12 <= len(blob):
            namesz, descsz, kind = struct.unpack_from("<III", blob, at)
            name = blob[at + 12:at + 12 + namesz].rstrip(b"\0")
            desc_at = at + 12 + (namesz + 3) // 4 * 4
            if name == abi.NOTE_OWNER.encode():
                out[kind] = blob[desc_at:desc_at + descsz]
            at = desc_at + (descsz + 3) // 4 * 4
    return out


def image_findings(image: bytes) -> list[str]:
    """R1-R7 and the call rule on a linked PV image."""
    elf = ELFFile(io.BytesIO(image))
    findings: list[str] = []
    hc_note = _notes(elf).get(abi.NOTE_HYPERCALL_PAGE)
    hypercall_page = struct.unpack("<Q", hc_note)[0] if hc_note else None
    chunks = []
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD" or not seg["p_flags"] & 1:
            continue
        base = seg["p_vaddr"]
        if base % PAGE:
            findings.append(f"R1: executable segment at {base:#x} is not page-aligned")
        size = (seg["p_memsz"] + PAGE - 1) // PAGE * PAGE
        code = seg.data() + bytes(size - seg["p_filesz"])
        chunks.append((base, code))
    if hypercall_page is not None and (hypercall_page % PAGE or not any(
            b <= hypercall_page < b + len(c) for b, c in chunks)):
        findings.append(f"R2: hypercall page {hypercall_page:#x} is not an aligned page of text")
    insns: list[Insn] = []
    for base, code in chunks:
        if hypercall_page is not None and base <= hypercall_page < base + len(code):
            cut = hypercall_page - base
            insns += decode(base, code[:cut], findings)
            insns += decode(hypercall_page + PAGE, code[cut + PAGE:], findings)
        else:
            insns += decode(base, code, findings)
    starts = {i.address for i in insns}
    inside = lambda t: True                      # noqa: E731  (every target must be accounted for)
    findings += branch_findings(insns, starts, inside, hypercall_page)
    entry = elf["e_entry"]
    if entry % BUNDLE or entry not in starts:
        findings.append(f"R7: e_entry {entry:#x} is not a bundle start")
    symtab = elf.get_section_by_name(".symtab")
    for sym in symtab.iter_symbols() if symtab else ():
        if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"] % BUNDLE:
            findings.append(f"function {sym.name} at {sym['st_value']:#x} does not start a bundle")
    return findings
