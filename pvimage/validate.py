"""The PV code rules R1-R7: the one validator behind `pvtool check` and the runtime's loader.

A PV image must provably contain no reachable sensitive instruction.  The
rules (docs/abi.md, "What the validator guarantees"; after Native Client):

- R1 the code is each executable segment, zero-filled to the end of its last
  page (elfread has refused unaligned or page-sharing text); it is not
  writable (W^X);
- R2 the hypercall page (the note's) is page-aligned inside the code, and is
  not validated: the hypervisor writes it;
- R3 the code decodes bundle by bundle (32 bytes, 32-aligned) into whole
  instructions; their addresses are the *instruction starts*;
- R4 no sensitive instruction (sweep.py's table), no `ret`, no jmp/call
  through memory, no `xbegin`;
- R5 every direct branch targets an instruction start that is not the
  jmp/call of a masked pair, or a hypercall entry;
- R6 every `jmp r64`/`call r64` directly follows `and r64, -32` on the same
  register in the same bundle;
- R7 the entry point is a bundle start.

`validate(info)` returns what the runtime needs to enforce R8 (a bitmap of the
instruction starts, the hypercall page's resume points) or raises the first
violation as a `RuleViolation`, an ImageError; `violations(info)` lists them all.
Decoding is capstone's light mode; only instructions whose mnemonic may be
sensitive are decoded again with detail for `sweep.classify`.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

import capstone

from . import abi
from .elfread import ElfInfo, ImageError, Segment
from .sweep import classify

BUNDLE = 32
_CHUNK = abi.PAGE_SIZE          # decoded in pieces; a multiple of BUNDLE
_MAX_INSN = 15

RULES = {
    "R1": "code extent", "R2": "hypercall page", "R3": "bundles", "R4": "forbidden instruction",
    "R5": "direct branch", "R6": "masked indirect branch", "R7": "entry",
}

_DIRECT = {"jmp", "call", "loop", "loope", "loopne", "jrcxz", "jecxz", "jcxz",
           "ja", "jae", "jb", "jbe", "je", "jne", "jg", "jge", "jl", "jle",
           "jo", "jno", "jp", "jnp", "js", "jns"}
# Mnemonics whose sensitivity depends on their operands; the others are classified once per mnemonic.
_BY_OPERANDS = {"mov", "push", "pop", "call", "jmp"}
_SPECIAL_REGISTER = re.compile(r"\b(cr\d+|dr\d+|[cdefgs]s)\b(?!:)")
_GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclass(frozen=True)
class Violation:
    rule: str                 # "R1" ... "R7"
    address: int | None
    text: str                 # the rest of the line, after "rule Rn (name): "

    def __str__(self) -> str:
        return f"rule {self.rule} ({RULES[self.rule]}): {self.text}"


class RuleViolation(ImageError):
    """A PV image breaks a code rule; str() is the first violation's line."""

    def __init__(self, violations: list[Violation]):
        super().__init__(str(violations[0]))
        self.violations = violations


class InstructionStarts:
    """The instruction starts of the validated code: one bit per byte of each code range."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, bytearray]] = []   # (start, end, bitmap), by start
        self._starts: list[int] = []                             # their starts, for bisect

    def add_range(self, start: int, end: int) -> bytearray:
        """A new, empty range; the validator sets its bits."""
        bits = bytearray((end - start + 7) // 8)
        at = bisect_right(self._starts, start)
        self._ranges.insert(at, (start, end, bits))
        self._starts.insert(at, start)
        return bits

    def __contains__(self, address: int) -> bool:
        at = bisect_right(self._starts, address) - 1    # the runtime asks at every entry it makes
        if at < 0:
            return False
        start, end, bits = self._ranges[at]
        if address >= end:
            return False
        off = address - start
        return bits[off >> 3] >> (off & 7) & 1 == 1

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """[start, end) of each validated code range."""
        return [(start, end) for start, end, _ in self._ranges]


@dataclass(frozen=True)
class ValidatedCode:
    """What a validated PV image's code is, for the runtime's checks (R8)."""
    starts: InstructionStarts
    hypercall_page: int
    resume_points: frozenset[int]     # in the hypercall page: the instruction after each stub's syscall

    def is_hypercall_entry(self, address: int) -> bool:
        return _hypercall_entry(self.hypercall_page, address)


def validate(info: ElfInfo) -> ValidatedCode:
    """Check R1-R7 on a PV image; raises RuleViolation (an ImageError) with the first violation."""
    code, found = _Validator(info).run()
    if found:
        raise RuleViolation(found)
    assert code is not None
    return code


def violations(info: ElfInfo) -> list[Violation]:
    """Every violation of R1-R7, in address order within each rule pass."""
    return _Validator(info).run()[1]


def _hypercall_entry(page: int, address: int) -> bool:
    off = address - page
    return 0 <= off < abi.HC_COUNT * abi.HYPERCALL_STRIDE and off % abi.HYPERCALL_STRIDE == 0


_LIGHT: capstone.Cs | None = None
_DETAIL: capstone.Cs | None = None


def _decoders() -> tuple[capstone.Cs, capstone.Cs]:
    global _LIGHT, _DETAIL
    if _LIGHT is None:
        _LIGHT = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        _DETAIL = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        _DETAIL.detail = True
    return _LIGHT, _DETAIL


class _Validator:
    def __init__(self, info: ElfInfo):
        self.info = info
        self.found: list[Violation] = []
        self.starts = InstructionStarts()
        self.branches: list[tuple[int, str, int]] = []   # (address, asm, target) of each direct branch
        self.pair_jumps: set[int] = set()                 # the jmp/call of each masked pair
        self.sensitive_by_mnemonic: dict[str, tuple[str, str] | None] = {}
        self.light, self.detail = _decoders()

    def fail(self, rule: str, address: int | None, text: str) -> None:
        self.found.append(Violation(rule, address, text))

    def where(self, address: int, asm: str) -> str:
        return f"'{asm}' at {self.info.describe(address)}"

    # -- the passes ------------------------------------------------------------------------
    def run(self) -> tuple[ValidatedCode | None, list[Violation]]:
        text = self.info.executable
        for seg in text:                 # before any decoding: a writable text proves nothing
            if seg.writable:
                self.fail("R1", seg.address, f"segment {seg.index} ({seg.address:#x}-{seg.end:#x}) is writable "
                                             f"and executable; PV images need W^X (text and data in separate segments)")
        page = self._hypercall_page(text)
        if self.found:
            return None, self.found
        assert page is not None
        for start, data in _code_ranges(text, page):
            self._decode_range(start, data)
        self._check_branches(page)
        self._check_entry()
        resume = frozenset(page + nr * abi.HYPERCALL_STRIDE + abi.hypercall_resume(nr)
                           for nr in range(abi.HC_COUNT) if nr != abi.HC_IRET)     # iret never resumes
        return ValidatedCode(self.starts, page, resume), self.found

    def _hypercall_page(self, text: list[Segment]) -> int | None:
        page = self.info.hypercall_page
        if page is None:
            self.fail("R2", None, "the image has no hypercall-page note")
        elif page % abi.PAGE_SIZE:
            self.fail("R2", page, f"the hypercall page {page:#x} is not page-aligned")
        elif not any(s.address <= page and page + abi.PAGE_SIZE <= s.page_end for s in text):
            self.fail("R2", page, f"the hypercall page {page:#x} is not inside an executable segment")
        return page

    def _decode_range(self, start: int, data: bytes) -> None:
        """R3/R4/R6 over one code range (32-aligned), bundle by bundle."""
        bits = self.starts.add_range(start, start + len(data))
        for chunk in range(0, len(data), _CHUNK):
            off, end = chunk, min(chunk + _CHUNK, len(data))
            while off < end:
                off = self._decode_run(start, data, bits, off, end)

    def _decode_run(self, base: int, data: bytes, bits: bytearray, off: int, end: int) -> int:
        """Decode from `off` (a bundle start) until `end` or a broken bundle; the offset to go on from."""
        prev: bytes | None = None          # the previous instruction in this bundle
        pos = off
        for address, size, mnemonic, operands in self.light.disasm_lite(data[off:end], base + off):
            at = address - base
            if at // BUNDLE != (at + size - 1) // BUNDLE:
                asm = f"{mnemonic} {operands}".strip()
                self.fail("R3", address, f"{self.where(address, asm)} crosses the bundle end "
                                         f"{base + (at // BUNDLE + 1) * BUNDLE:#x}")
                return (at // BUNDLE + 1) * BUNDLE
            if at % BUNDLE == 0:
                prev = None
            bits[at >> 3] |= 1 << (at & 7)
            raw = data[at:at + size]
            self._check_instruction(address, raw, mnemonic, operands, prev)
            prev = raw
            pos = at + size
        if pos < end:       # capstone stopped: an undecodable byte, or an instruction running past `end`
            self._stopped(base, data, pos)
            return (pos // BUNDLE + 1) * BUNDLE
        return end

    def _stopped(self, base: int, data: bytes, pos: int) -> None:
        address = base + pos
        insn = next(self.light.disasm_lite(data[pos:pos + _MAX_INSN], address), None)
        if insn is not None:
            asm = f"{insn[2]} {insn[3]}".strip()
            self.fail("R3", address, f"{self.where(address, asm)} crosses the bundle end "
                                     f"{base + (pos // BUNDLE + 1) * BUNDLE:#x}")
        else:
            self.fail("R3", address, f"undecodable byte {data[pos]:#04x} at {self.info.describe(address)}")

    def _check_instruction(self, address: int, raw: bytes, mnemonic: str, operands: str,
                           prev: bytes | None) -> None:
        name = mnemonic.rsplit(" ", 1)[-1]          # past rep/lock/bnd/notrack prefixes
        asm = f"{mnemonic} {operands}".strip()
        if name in _DIRECT and operands.startswith("0x"):
            self.branches.append((address, asm, int(operands, 16)))
            return
        if name == "ret":
            self.fail("R4", address, f"{self.where(address, asm)} is a return: returns must be masked jumps "
                                     f"(pop r11; and r11, -32; jmp r11)")
            return
        if name == "xbegin":
            self.fail("R4", address, f"{self.where(address, asm)}: its abort address is a control transfer "
                                     f"the rules do not track")
            return
        hit = self._sensitive(name, mnemonic, operands, raw, address)
        if hit:
            self.fail("R4", address, f"{self.where(address, asm)} is sensitive ({hit[0]}: {hit[1]})")
        elif name in ("jmp", "call"):
            self._check_indirect(address, raw, name, operands, asm, prev)

    def _sensitive(self, name: str, mnemonic: str, operands: str, raw: bytes, address: int) -> tuple[str, str] | None:
        if name in _BY_OPERANDS:
            # Only a special register (mov, push, pop) or memory (far call/jmp) can make them sensitive.
            special = operands not in _GPR64 if name in ("call", "jmp") else _SPECIAL_REGISTER.search(operands)
            return classify(next(self.detail.disasm(raw, address))) if special else None
        if mnemonic not in self.sensitive_by_mnemonic:
            self.sensitive_by_mnemonic[mnemonic] = classify(next(self.detail.disasm(raw, address)))
        return self.sensitive_by_mnemonic[mnemonic]

    def _check_indirect(self, address: int, raw: bytes, name: str, operands: str, asm: str,
                        prev: bytes | None) -> None:
        """R4 (no jmp/call through memory) and R6 (jmp/call r64 masked in its bundle)."""
        if operands not in _GPR64:
            self.fail("R4", address, f"{self.where(address, asm)} is an indirect {name} through memory")
            return
        reg = _GPR64.index(operands)
        if raw != _indirect_bytes(name, reg):
            self.fail("R6", address, f"{self.where(address, asm)} is not encoded as plain '{name} r64' "
                                     f"({_indirect_bytes(name, reg).hex(' ')})")
            return
        if prev != _mask_bytes(reg):
            self.fail("R6", address, f"{self.where(address, asm)} is not preceded by 'and {operands}, -32' "
                                     f"in its bundle")
            return
        self.pair_jumps.add(address)

    def _check_branches(self, page: int) -> None:
        """R5: direct branches land on instruction starts (not inside a masked pair) or hypercall entries."""
        for address, asm, target in self.branches:
            if _hypercall_entry(page, target):
                continue
            if page <= target < page + abi.PAGE_SIZE:
                why = f"the hypercall page, not a hypercall entry (page + 32 * nr, nr < {abi.HC_COUNT})"
            elif target in self.pair_jumps:
                why = "the jmp/call of a masked pair (it would skip the mask)"
            elif target not in self.starts:
                why = "not an instruction start"
            else:
                continue
            self.fail("R5", address, f"{self.where(address, asm)} targets {target:#x}: {why}")

    def _check_entry(self) -> None:
        entry = self.info.entry
        if entry % BUNDLE or entry not in self.starts:
            self.fail("R7", entry, f"the entry point {self.info.describe(entry)} is not a bundle start "
                                   f"of the validated code")


def _indirect_bytes(name: str, reg: int) -> bytes:
    """`jmp r64` (ff /4) or `call r64` (ff /2), with REX.B for r8-r15 and no other prefix."""
    modrm = (0xE0 if name == "jmp" else 0xD0) | (reg & 7)
    return (b"\x41" if reg >= 8 else b"") + bytes([0xFF, modrm])


def _mask_bytes(reg: int) -> bytes:
    """`and r64, -32`: REX.W (+B) 83 /4 ib 0xE0."""
    return bytes([0x49 if reg >= 8 else 0x48, 0x83, 0xE0 | (reg & 7), 0xE0])


def _code_ranges(text: list[Segment], page: int) -> list[tuple[int, bytes]]:
    """(address, bytes) of the validated code: each executable segment's mapped bytes less the hypercall page."""
    out = []
    for seg in text:
        code = seg.code
        lo, hi = page - seg.address, page + abi.PAGE_SIZE - seg.address
        if 0 <= lo < len(code):
            out += [(seg.address, code[:lo]), (page + abi.PAGE_SIZE, code[hi:])]
        else:
            out.append((seg.address, code))
    return [(a, d) for a, d in out if d]
