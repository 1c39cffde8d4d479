"""The x86-64 encoder: exactly the instruction forms the back end emits.

`Asm` is a tiny one-pass assembler.  Each method appends one instruction
to `code`; jumps to local labels are patched by `finish()`, references to
symbols become `obj.Reloc`s.  Operands are `Reg` (a general register; the
operand size comes from the `size` argument), `Mem` (`[base + disp]`,
absolute `[disp32]`, or `[rip + symbol + disp]`) and plain ints
(immediates).  Every method checks its operands and raises `EncodeError`
for a form it cannot encode, so a back-end bug never becomes wrong bytes.

Bundled code (`Asm(bundled=True)`, the PV code rules of ABI version 2, see
codespec.md): code is cut into 32-byte bundles and no instruction crosses a
bundle end.  Every instruction's size is known when it is emitted (forward
jumps are always near), so `_put` pads before one that would cross: first
by growing earlier instructions of the bundle with redundant prefixes (no
extra instruction to execute), then with multi-byte NOPs.  Calls end exactly
on a bundle end, so return addresses are bundle starts; returns and
indirect branches are masked (`and r, -32` and the branch in one bundle);
plain `ret` and `call r64` are refused.  A label is bound where the next
instruction starts, after any NOPs, so a branch to it skips them.  Offsets
that others keep (line and site rows) are anchors that move with the
padding.

tests/test_encode.py round-trips every public method through capstone and
fails when a method has no round-trip test.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..obj import PC32, Reloc


class EncodeError(Exception):
    pass


class Reg:
    """A general register by hardware number 0-15.  There is one object per
    register, so equality is identity and hashing is cheap."""
    __slots__ = ("n",)
    _each: dict[int, Reg] = {}

    def __new__(cls, n: int) -> Reg:
        r = cls._each.get(n)
        if r is None:
            if not 0 <= n < 16:
                raise EncodeError(f"no general register {n}")
            r = cls._each[n] = object.__new__(cls)
            object.__setattr__(r, "n", n)
        return r

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("registers are immutable")

    def __reduce__(self):
        return Reg, (self.n,)

    def __repr__(self) -> str:
        return REG_NAMES[8][self.n]


REG_NAMES = {
    8: ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"),
    4: ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi",
        "r8d", "r9d", "r10d", "r11d", "r12d", "r13d", "r14d", "r15d"),
    2: ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di",
        "r8w", "r9w", "r10w", "r11w", "r12w", "r13w", "r14w", "r15w"),
    1: ("al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil",
        "r8b", "r9b", "r10b", "r11b", "r12b", "r13b", "r14b", "r15b"),
}

REGS = tuple(Reg(n) for n in range(16))
(RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI,
 R8, R9, R10, R11, R12, R13, R14, R15) = REGS


@dataclass(unsafe_hash=True, slots=True)
class Mem:
    """[base + disp]; with no base, absolute [disp32]; with `symbol`, [rip + symbol + disp].
    Never changed once made, so hashable; not frozen only because a frozen dataclass
    takes three times as long to make (as ir.VReg)."""
    base: Reg | None = None
    disp: int = 0
    symbol: str | None = None


# Condition codes, named as in the jcc/setcc mnemonics.
CC = {"o": 0, "no": 1, "b": 2, "ae": 3, "e": 4, "ne": 5, "be": 6, "a": 7,
      "s": 8, "ns": 9, "p": 10, "np": 11, "l": 12, "ge": 13, "le": 14, "g": 15}

ALU = {"add": 0, "or": 1, "and": 4, "sub": 5, "xor": 6, "cmp": 7}
SHIFT = {"shl": 4, "shr": 5, "sar": 7}
CONTROL_REGS = (0, 2, 3, 4)
SIZES = (1, 2, 4, 8)


def fits_s8(v: int) -> bool:
    return -0x80 <= v < 0x80


def fits_s32(v: int) -> bool:
    return -0x8000_0000 <= v < 0x8000_0000


def imm_bytes(v: int, size: int) -> bytes:
    """`v` as a `size`-byte immediate; accepts the signed or the unsigned reading."""
    bits = size * 8
    if not -(1 << (bits - 1)) <= v < (1 << bits):
        raise EncodeError(f"immediate {v:#x} does not fit in {size} bytes")
    return (v & ((1 << bits) - 1)).to_bytes(size, "little")


def _check_size(size: int, allowed: tuple[int, ...] = SIZES) -> None:
    if size not in allowed:
        raise EncodeError(f"operand size {size} not in {allowed}")


BUNDLE = 32
MASK = -BUNDLE                 # `and r64, MASK` rounds a branch target down to a bundle start
# The multi-byte NOPs (0f 1f /0 with growing ModRM/SIB/disp forms, then 66 prefixes).
_NOP_FORMS = {1: "90", 2: "66 90", 3: "0f 1f 00", 4: "0f 1f 40 00", 5: "0f 1f 44 00 00",
              6: "66 0f 1f 44 00 00", 7: "0f 1f 80 00 00 00 00", 8: "0f 1f 84 00 00 00 00 00",
              9: "66 0f 1f 84 00 00 00 00 00", 10: "66 66 0f 1f 84 00 00 00 00 00",
              11: "66 66 66 0f 1f 84 00 00 00 00 00"}
NOP_MAX = max(_NOP_FORMS)


def nops(n: int) -> bytes:
    """`n` bytes of padding as the fewest NOP instructions."""
    out = bytearray()
    while n > 0:
        k = min(n, NOP_MAX)
        out += bytes.fromhex(_NOP_FORMS[k])
        n -= k
    return bytes(out)


def padding(at: int, n: int) -> bytes:
    """`n` bytes of NOPs placed at offset `at`, none crossing a bundle end."""
    first = min(n, BUNDLE - at % BUNDLE)
    return nops(first) + nops(n - first)


# padding(at, n) for every position in a bundle and every length a pad can have
_PADDING = [[padding(at, n) for n in range(BUNDLE)] for at in range(BUNDLE)]


def _modrm(out: bytearray, reg: int, rm: Reg | Mem) -> int:
    """Append ModRM (and SIB, displacement) for `reg` and `rm` to `out`; return
    the offset of a rip-relative disp32 field in `out` (the linker patches it), or 0."""
    if type(rm) is Reg:
        out.append(0xC0 | reg << 3 | rm.n & 7)
        return 0
    if rm.symbol is not None:                  # [rip + disp32], patched by the linker
        if rm.base is not None:
            raise EncodeError("a rip-relative operand has no base register")
        out.append(0x05 | reg << 3)
        out += b"\0\0\0\0"
        return len(out) - 4
    disp = rm.disp
    if not -0x8000_0000 <= disp < 0x8000_0000:
        raise EncodeError(f"displacement {disp:#x} does not fit in 32 bits")
    if rm.base is None:                        # absolute: SIB with no base, no index
        out += bytes((0x04 | reg << 3, 0x25)) + struct.pack("<i", disp)
        return 0
    low = rm.base.n & 7
    if disp == 0 and low != 5:                 # rbp/r13 have no disp-less form
        out.append(reg << 3 | low)
        if low == 4:                           # rsp/r12 as base need a SIB byte
            out.append(0x24)
    elif -0x80 <= disp < 0x80:
        out.append(0x40 | reg << 3 | low)
        if low == 4:
            out.append(0x24)
        out.append(disp & 0xFF)
    else:
        out.append(0x80 | reg << 3 | low)
        if low == 4:
            out.append(0x24)
        out += struct.pack("<i", disp)
    return 0


# How an instruction may be laid out in bundled code (`_put`, `_put_prefixable`):
# FIXED as encoded; PREFIXABLE may grow by redundant CS prefixes (register-only
# instructions and lea: no memory access the prefix could touch, nothing
# sensitive).  A backward jump's displacement is fixed at emission, so nothing
# between its target and itself may grow afterwards.  (Forward jumps are
# patched by finish() and relocations by the linker: both move along.)
FIXED, PREFIXABLE = 0, 1
PREFIX = 0x2E                  # CS override: ignored in 64-bit mode
MAX_PREFIXES = 5               # added to one instruction, as gas's prefix padding (never beyond 15 bytes)
_PREFIXES = [bytes((PREFIX,)) * k for k in range(MAX_PREFIXES + 1)]
# Asm.limit of native code: beyond any function, and still a one-digit int (CPython
# compares those fastest; a native function past it only goes through `_place`).
UNBOUNDED = (1 << 30) - 1


# Of each register pair (ModRM's reg field and r/m register), at reg << 4 | rm:
# its REX.R and REX.B bits, and the low six bits of its ModRM.
_PAIR_PARTS = [(reg >> 3 << 1 | rm >> 3, (reg & 7) << 3 | rm & 7) for reg in range(16) for rm in range(16)]


def _register_pairs(opcode: int, w: bool) -> tuple[bytes, ...]:
    """`opcode /r` on two registers, at index reg << 4 | rm: REX (.W if `w`)
    where needed, the opcode, ModRM.  Made from 4 prefixes and 64 opcode-ModRM
    pairs, so the tables below cost little at import."""
    rex = [bytes((0x40 | w << 3 | rb >> 1 << 2 | rb & 1,)) if w or rb else b"" for rb in range(4)]
    modrm = [bytes((opcode, 0xC0 | low)) for low in range(64)]
    return tuple([rex[rb] + modrm[low] for rb, low in _PAIR_PARTS])


# The register forms the emitters use most, made once: an instruction on
# registers is then a lookup (and its immediate appended), not an encoding.
# Two registers, at reg << 4 | rm:
_MOV_RR = {size: _register_pairs(0x89, size == 8) for size in (4, 8)}                  # mov r/m, r
_ALU_RR = {size: {ext: _register_pairs(ext * 8 + 1, size == 8) for ext in ALU.values()}  # add ... cmp r/m, r
           for size in (4, 8)}
_TEST_RR = _register_pairs(0x85, True)                                                 # test r/m64, r64
_MOVSXD_RR = _register_pairs(0x63, True)                                               # movsxd r64, r/m32
_IMUL_RRI8 = _register_pairs(0x6B, True)                                               # imul r64, r/m64, imm8
# An opcode extension and a register, at ext << 4 | rm:
_ALU_RI8 = {size: _register_pairs(0x83, size == 8) for size in (4, 8)}                 # add ... cmp r/m, imm8
_SHIFT_RI8 = _register_pairs(0xC1, True)                                               # shl/shr/sar r/m64, imm8
_GROUP3_R = _register_pairs(0xF7, True)                                                # not/neg/div/idiv r/m64
# A register in the opcode:
_MOV_R32I = tuple((b"\x41" if n >= 8 else b"") + bytes((0xB8 + (n & 7),)) for n in range(16))  # mov r32, imm32
_BYTE = tuple(bytes((b,)) for b in range(256))                                         # an imm8


class Asm:
    """Machine code for one function: bytes, relocations, local labels."""

    def __init__(self, bundled: bool = False) -> None:
        self.code = bytearray()
        self.relocs: list[Reloc] = []
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []   # (offset of rel32 field, label)
        self.anchors: list[int] = []              # offsets others hold on to (line and site rows)
        self.bundled = bundled
        self.pads: dict[int, int] = {}            # bundled: where NOP padding starts -> where it ends
        # bundled: the current bundle, the starts of its PREFIXABLE instructions since
        # its last backward jump, and the labels bound in it (or at its start)
        self.bundle = 0
        self.run: list[int] = []
        self.recent: list[str] = []
        # Where the code may grow to without `_place` looking: the current bundle's end,
        # never reached in native code.
        self.limit = BUNDLE if bundled else UNBOUNDED

    @property
    def offset(self) -> int:
        return len(self.code)

    def anchor(self) -> int:
        """Remember the current offset; `at(anchor)` is where it ends up once later
        padding has grown the instructions before it."""
        self.anchors.append(len(self.code))
        return len(self.anchors) - 1

    def at(self, anchor: int) -> int:
        return self.anchors[anchor]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """(offset, length) of the code between two anchors, without padding at its start."""
        first = self.anchors[start]
        first = self.pads.get(first, first)
        return first, self.anchors[end] - first

    # -- labels -------------------------------------------------------------

    def label(self, name: str) -> None:
        """Bind `name` here; in bundled code `_place` moves it past any NOPs that
        come before the next instruction."""
        if name in self.labels:
            raise EncodeError(f"label {name!r} defined twice")
        self.labels[name] = len(self.code)
        if self.bundled:
            self.recent.append(name)

    def finish(self) -> bytes:
        """Patch the forward jumps and return the code."""
        for at, name in self.fixups:
            if name not in self.labels:
                raise EncodeError(f"undefined label {name!r}")
            struct.pack_into("<i", self.code, at, self.labels[name] - (at + 4))
        self.fixups.clear()
        return bytes(self.code)

    # -- placement ----------------------------------------------------------

    def _start_for(self, size: int, end_on_bundle: bool = False) -> int:
        """Where an instruction of `size` bytes emitted now will start."""
        at = len(self.code)
        if not self.bundled:
            return at
        if end_on_bundle:
            return at + (-(at + size) % BUNDLE)
        return at if at % BUNDLE + size <= BUNDLE else at - at % BUNDLE + BUNDLE

    def _put(self, ins: bytes | bytearray) -> int:
        """Append one FIXED instruction (or an inseparable group, e.g. a masked pair),
        padding first in bundled code; return where it starts."""
        code = self.code
        at = len(code)
        if at + len(ins) > self.limit:         # bundled: past the bundle's end
            at = self._place(len(ins))
        code += ins
        return at

    def _put_prefixable(self, ins: bytes | bytearray) -> int:
        """`_put` for a PREFIXABLE instruction, which later padding may grow."""
        code = self.code
        at = len(code)
        if at + len(ins) > self.limit:
            at = self._place(len(ins))
        code += ins
        self.run.append(at)
        return at

    def _put_ending_bundle(self, ins: bytes | bytearray) -> int:
        """`_put` for a FIXED instruction that ends on a bundle end in bundled code."""
        at = self._place(len(ins), True) if self.bundled else len(self.code)
        self.code += ins
        return at

    def _place(self, size: int, end_on_bundle: bool = False) -> int:
        """Bundled: make the code end where the next `size` bytes may start --
        prefixes on earlier instructions first, then NOPs, which the labels bound
        at the end skip."""
        code = self.code
        at = len(code)
        if not self.bundled:                   # a native function of UNBOUNDED bytes
            return at
        if at // BUNDLE != self.bundle:
            self._enter_bundle(at)
        if end_on_bundle:                      # (`_start_for`, inline)
            start = at + (-(at + size) % BUNDLE)
        else:
            start = at if at % BUNDLE + size <= BUNDLE else at - at % BUNDLE + BUNDLE
        if start != at:
            at = self._grow(min(start, at - at % BUNDLE + BUNDLE) - at)
            if start != at:
                code += _PADDING[at % BUNDLE][start - at]
                self.pads[at] = start
                labels = self.labels
                for name in self.recent:
                    if labels[name] == at:
                        labels[name] = start
            if start // BUNDLE != self.bundle:
                self._enter_bundle(start)
        self.limit = self.bundle * BUNDLE + BUNDLE
        return start

    def _enter_bundle(self, at: int) -> None:
        """Nothing before a new bundle grows any more; labels bound at its start may
        still move past NOPs (before a call that ends the bundle)."""
        recent = self.recent
        if recent and self.labels[recent[-1]] == at:
            labels = self.labels
            keep = len(recent) - 1
            while keep and labels[recent[keep - 1]] == at:
                keep -= 1
            recent = recent[keep:]
        else:
            recent = []
        self.bundle, self.run, self.recent = at // BUNDLE, [], recent

    def _grow(self, need: int) -> int:
        """Pad by adding up to `need` prefixes to this bundle's PREFIXABLE instructions
        since its last backward jump, the latest first (no NOP to execute); return the new end.
        Each takes MAX_PREFIXES: none is longer than 15 - MAX_PREFIXES bytes (tests/test_encode.py),
        and none has grown before (a bundle is padded once: the next instruction starts
        a new one)."""
        for at in reversed(self.run):
            k = MAX_PREFIXES if MAX_PREFIXES < need else need
            self._insert(at, k)
            need -= k
            if not need:
                break
        return len(self.code)

    def _insert(self, at: int, k: int) -> None:
        """k prefixes in front of the instruction at `at`; everything after it moves
        (the run's later instructions too, but `_grow` is done with them).  What moves
        is in the current bundle: the lists are walked from their ends."""
        self.code[at:at] = _PREFIXES[k]
        relocs = self.relocs
        if relocs and relocs[-1].offset > at:
            for r in reversed(relocs):
                if r.offset <= at:
                    break
                r.offset += k
        fixups = self.fixups
        i = len(fixups) - 1
        while i >= 0 and fixups[i][0] > at:
            fixups[i] = (fixups[i][0] + k, fixups[i][1])
            i -= 1
        labels = self.labels
        for name in self.recent:
            if labels[name] > at:
                labels[name] += k
        anchors = self.anchors
        i = len(anchors) - 1
        while i >= 0 and anchors[i] > at:
            anchors[i] += k
            i -= 1

    def _reloc(self, at: int, symbol: str, addend: int) -> None:
        self.relocs.append(Reloc(at, PC32, symbol, addend))

    # -- the core: prefixes, REX, ModRM, SIB, displacement ------------------

    def _emit(self, opcode: bytes, reg: int, rm: Reg | Mem, size: int, *,
              imm: bytes = b"", byte_regs: tuple[int, ...] = (), rex_w: bool | None = None,
              kind: int | None = None) -> None:
        """One instruction with a ModRM byte.  `reg` is a register number or
        an opcode extension; `byte_regs` are the register numbers used as
        8-bit registers (spl..dil need an empty REX).  By default a
        register-only form is PREFIXABLE and a memory form FIXED."""
        w = size == 8 if rex_w is None else rex_w
        out = bytearray(b"\x66") if size == 2 else bytearray()
        if type(rm) is Reg:                    # the common case, inline
            n = rm.n
            rex = 0x40 | w << 3 | (reg >> 3) << 2 | n >> 3
            if rex != 0x40 or (byte_regs and any(4 <= r < 8 for r in byte_regs)):
                out.append(rex)
            out += opcode
            out.append(0xC0 | (reg & 7) << 3 | n & 7)
            out += imm
            if kind == FIXED:
                self._put(out)
            else:
                self._put_prefixable(out)
            return
        rex = 0x40 | w << 3 | (reg >> 3) << 2 | (rm.base.n >> 3 if rm.base is not None else 0)
        if rex != 0x40 or (byte_regs and any(4 <= r < 8 for r in byte_regs)):
            out.append(rex)
        out += opcode
        rip = _modrm(out, reg & 7, rm)
        out += imm
        at = self._put_prefixable(out) if kind == PREFIXABLE else self._put(out)
        if rip:
            self._reloc(at + rip, rm.symbol, rm.disp - 4 - len(imm))

    def _plain(self, *opcode: int) -> None:
        self._put(bytes(opcode))

    def _rel32(self, opcode: bytes, symbol: str, addend: int, end_on_bundle: bool = False) -> None:
        ins = opcode + b"\0\0\0\0"
        at = self._put_ending_bundle(ins) if end_on_bundle else self._put(ins)
        self._reloc(at + len(opcode), symbol, addend - 4)

    @staticmethod
    def _byte_regs(size: int, *ops: object) -> tuple[int, ...]:
        return tuple(o.n for o in ops if isinstance(o, Reg)) if size == 1 else ()

    # -- data movement ------------------------------------------------------

    def mov(self, dst: Reg | Mem, src: Reg | Mem | int, size: int = 8) -> None:
        """mov; a 64-bit immediate that does not fit in imm32 becomes movabs."""
        if type(src) is Reg:                   # the common cases first
            if type(dst) is Reg and size in _MOV_RR:
                self._put_prefixable(_MOV_RR[size][src.n << 4 | dst.n])
                return
            if size == 8:
                self._emit(b"\x89", src.n, dst, 8)
                return
        elif type(src) is int and type(dst) is Reg and size == 4 and -0x8000_0000 <= src < 0x1_0000_0000:
            self._put_prefixable(_MOV_R32I[dst.n] + (src & 0xFFFF_FFFF).to_bytes(4, "little"))
            return
        op8 = size == 1
        _check_size(size)
        if isinstance(src, int):
            if isinstance(dst, Reg) and size == 8 and not fits_s32(src):
                rex = 0x48 | dst.n >> 3
                self._put_prefixable(bytes((rex, 0xB8 + (dst.n & 7))) + imm_bytes(src, 8))
            elif isinstance(dst, Reg) and size < 8:
                self._emit_short_reg(0xB0 if op8 else 0xB8, dst, size, imm_bytes(src, size))
            else:
                if size == 8 and not fits_s32(src):
                    raise EncodeError(f"mov to memory of {src:#x} needs imm32")
                imm = imm_bytes(src, min(size, 4))
                self._emit(bytes((0xC6 if op8 else 0xC7,)), 0, dst, size, imm=imm,
                           byte_regs=self._byte_regs(size, dst))
        elif isinstance(src, Reg):
            self._emit(bytes((0x88 if op8 else 0x89,)), src.n, dst, size,
                       byte_regs=self._byte_regs(size, src, dst))
        elif isinstance(dst, Reg):
            self._emit(bytes((0x8A if op8 else 0x8B,)), dst.n, src, size,
                       byte_regs=self._byte_regs(size, dst))
        else:
            raise EncodeError("mov from memory to memory")

    def _emit_short_reg(self, base: int, r: Reg, size: int, imm: bytes) -> None:
        """The register-in-opcode forms (B0+r, B8+r)."""
        out = bytearray()
        if size == 2:
            out.append(0x66)
        if r.n >= 8 or (size == 1 and r.n >= 4):
            out.append(0x40 | r.n >> 3)
        out += bytes((base + (r.n & 7),)) + imm
        self._put_prefixable(out)

    def movzx(self, dst: Reg, src: Reg | Mem, src_size: int, size: int = 4) -> None:
        """Zero-extend an 8- or 16-bit source (a 32-bit one: use mov r32, r/m32)."""
        self._extend(0xB6, dst, src, src_size, size)

    def movsx(self, dst: Reg, src: Reg | Mem, src_size: int, size: int = 8) -> None:
        """Sign-extend an 8- or 16-bit source (a 32-bit one: movsxd)."""
        self._extend(0xBE, dst, src, src_size, size)

    def _extend(self, op: int, dst: Reg, src: Reg | Mem, src_size: int, size: int) -> None:
        _check_size(src_size, (1, 2))
        _check_size(size, (2, 4, 8) if src_size == 1 else (4, 8))
        self._emit(bytes((0x0F, op + (src_size == 2))), dst.n, src, size,
                   byte_regs=self._byte_regs(src_size, src))

    def movsxd(self, dst: Reg, src: Reg | Mem) -> None:
        """Sign-extend 32 to 64 bits."""
        if type(src) is Reg:
            self._put_prefixable(_MOVSXD_RR[dst.n << 4 | src.n])
        else:
            self._emit(b"\x63", dst.n, src, 8)

    def lea(self, dst: Reg, src: Mem, size: int = 8) -> None:
        _check_size(size, (4, 8))
        if not isinstance(src, Mem):
            raise EncodeError("lea takes a memory operand")
        self._emit(b"\x8D", dst.n, src, size, kind=PREFIXABLE)     # computes, touches no memory

    def push(self, r: Reg) -> None:
        self._short_op(0x50, r)

    def push_imm(self, v: int) -> None:
        """push imm8 / imm32, sign-extended to 64 bits."""
        if fits_s8(v):
            self._put(b"\x6A" + imm_bytes(v, 1))
        elif fits_s32(v):
            self._put(b"\x68" + imm_bytes(v, 4))
        else:
            raise EncodeError(f"push of {v:#x} needs a sign-extended imm32")

    def push_mem(self, m: Mem) -> None:
        """push qword [m]."""
        if not isinstance(m, Mem):
            raise EncodeError("push_mem takes a memory operand")
        self._emit(b"\xFF", 6, m, 4)

    def lea_here(self, dst: Reg) -> None:
        """lea dst, [rip]: the address of the next instruction."""
        self._put(bytes((0x48 | dst.n >> 3 << 2, 0x8D, 0x05 | (dst.n & 7) << 3)) + bytes(4))

    def pop(self, r: Reg) -> None:
        self._short_op(0x58, r)

    def _short_op(self, base: int, r: Reg) -> None:
        self._put_prefixable(bytes((0x41, base + (r.n & 7))) if r.n >= 8 else bytes((base + r.n,)))

    # -- arithmetic ---------------------------------------------------------

    def _alu(self, ext: int, dst: Reg | Mem, src: Reg | Mem | int, size: int) -> None:
        if type(dst) is Reg and size in _ALU_RR:                           # the common cases first
            if type(src) is Reg:
                self._put_prefixable(_ALU_RR[size][ext][src.n << 4 | dst.n])
                return
            if type(src) is int and -0x80 <= src < 0x80:
                self._put_prefixable(_ALU_RI8[size][ext << 4 | dst.n] + _BYTE[src & 0xFF])
                return
        _check_size(size)
        op8 = size == 1
        if isinstance(src, int):
            if op8:
                self._emit(b"\x80", ext, dst, 1, imm=imm_bytes(src, 1), byte_regs=self._byte_regs(1, dst))
            elif fits_s8(src):
                self._emit(b"\x83", ext, dst, size, imm=imm_bytes(src, 1))
            else:
                if size == 8 and not fits_s32(src):
                    raise EncodeError(f"immediate {src:#x} needs imm32")
                self._emit(b"\x81", ext, dst, size, imm=imm_bytes(src, min(size, 4)))
        elif isinstance(src, Reg):
            self._emit(bytes((ext * 8 + (0 if op8 else 1),)), src.n, dst, size,
                       byte_regs=self._byte_regs(size, src, dst))
        elif isinstance(dst, Reg):
            self._emit(bytes((ext * 8 + (2 if op8 else 3),)), dst.n, src, size,
                       byte_regs=self._byte_regs(size, dst))
        else:
            raise EncodeError("arithmetic from memory to memory")

    def add(self, dst: Reg | Mem, src: Reg | Mem | int, size: int = 8) -> None:
        self._alu(ALU["add"], dst, src, size)

    def sub(self, dst: Reg | Mem, src: Reg | Mem | int, size: int = 8) -> None:
        self._alu(ALU["sub"], dst, src, size)

    def and_(self, dst: Reg | Mem, src: Reg | Mem | int, size: int = 8) -> None:
        self._alu(ALU["and"], dst, src, size)

    def or_(self, dst: Reg | Mem, src: Reg | Mem | int, size: int = 8) -> None:
        self._alu(ALU["or"], dst, src, size)

    def xor(self, dst: Reg | Mem, src: Reg | Mem | int, size: int = 8) -> None:
        self._alu(ALU["xor"], dst, src, size)

    def cmp(self, dst: Reg | Mem, src: Reg | Mem | int, size: int = 8) -> None:
        self._alu(ALU["cmp"], dst, src, size)

    def test(self, dst: Reg | Mem, src: Reg | int, size: int = 8) -> None:
        if type(src) is Reg and type(dst) is Reg and size == 8:             # the common case first
            self._put_prefixable(_TEST_RR[src.n << 4 | dst.n])
            return
        _check_size(size)
        op8 = size == 1
        if isinstance(src, int):
            if size == 8 and not fits_s32(src):
                raise EncodeError(f"immediate {src:#x} needs imm32")
            self._emit(b"\xF6" if op8 else b"\xF7", 0, dst, size, imm=imm_bytes(src, min(size, 4)),
                       byte_regs=self._byte_regs(size, dst))
        elif isinstance(src, Reg):
            self._emit(b"\x84" if op8 else b"\x85", src.n, dst, size,
                       byte_regs=self._byte_regs(size, src, dst))
        else:
            raise EncodeError("test takes a register or an immediate as source")

    def imul(self, dst: Reg, src: Reg | Mem, imm: int | None = None, size: int = 8) -> None:
        """imul dst, src  or, with `imm`, imul dst, src, imm."""
        if type(src) is Reg and size == 8 and imm is not None and -0x80 <= imm < 0x80:   # the common case first
            self._put_prefixable(_IMUL_RRI8[dst.n << 4 | src.n] + _BYTE[imm & 0xFF])
            return
        _check_size(size, (2, 4, 8))
        if imm is None:
            self._emit(b"\x0F\xAF", dst.n, src, size)
        elif fits_s8(imm):
            self._emit(b"\x6B", dst.n, src, size, imm=imm_bytes(imm, 1))
        else:
            if size == 8 and not fits_s32(imm):
                raise EncodeError(f"immediate {imm:#x} needs imm32")
            self._emit(b"\x69", dst.n, src, size, imm=imm_bytes(imm, min(size, 4)))

    def _group3(self, ext: int, dst: Reg | Mem, size: int) -> None:
        if type(dst) is Reg and size == 8:                                  # the common case first
            self._put_prefixable(_GROUP3_R[ext << 4 | dst.n])
            return
        _check_size(size)
        self._emit(b"\xF6" if size == 1 else b"\xF7", ext, dst, size, byte_regs=self._byte_regs(size, dst))

    def not_(self, dst: Reg | Mem, size: int = 8) -> None:
        self._group3(2, dst, size)

    def neg(self, dst: Reg | Mem, size: int = 8) -> None:
        self._group3(3, dst, size)

    def div(self, src: Reg | Mem, size: int = 8) -> None:
        """Unsigned rdx:rax / src."""
        self._group3(6, src, size)

    def idiv(self, src: Reg | Mem, size: int = 8) -> None:
        """Signed rdx:rax / src."""
        self._group3(7, src, size)

    def cqo(self) -> None:
        self._plain(0x48, 0x99)

    def _shift(self, ext: int, dst: Reg | Mem, count: int | Reg, size: int) -> None:
        if type(dst) is Reg and type(count) is int and size == 8 and 0 <= count < 256:   # the common case first
            self._put_prefixable(_SHIFT_RI8[ext << 4 | dst.n] + _BYTE[count])
            return
        _check_size(size)
        op8 = size == 1
        byte_regs = self._byte_regs(size, dst)
        if isinstance(count, Reg):
            if count != RCX:
                raise EncodeError("a variable shift count must be in cl")
            self._emit(b"\xD2" if op8 else b"\xD3", ext, dst, size, byte_regs=byte_regs)
        else:
            if not 0 <= count < 256:
                raise EncodeError(f"shift count {count} out of range")
            self._emit(b"\xC0" if op8 else b"\xC1", ext, dst, size, imm=bytes((count,)), byte_regs=byte_regs)

    def shl(self, dst: Reg | Mem, count: int | Reg, size: int = 8) -> None:
        """Shift left by an immediate or by cl (pass RCX)."""
        self._shift(SHIFT["shl"], dst, count, size)

    def shr(self, dst: Reg | Mem, count: int | Reg, size: int = 8) -> None:
        self._shift(SHIFT["shr"], dst, count, size)

    def sar(self, dst: Reg | Mem, count: int | Reg, size: int = 8) -> None:
        self._shift(SHIFT["sar"], dst, count, size)

    def setcc(self, cc: str, dst: Reg | Mem) -> None:
        """setCC of an 8-bit register or byte in memory."""
        self._emit(bytes((0x0F, 0x90 + CC[cc])), 0, dst, 1, byte_regs=self._byte_regs(1, dst))

    # -- control flow -------------------------------------------------------

    def _jump(self, short: int, near: bytes, name: str) -> None:
        """Short form for a bound label in reach, else rel32 (patched later if forward).
        Padding only brings a backward target closer, so the size is chosen first."""
        target = self.labels.get(name)
        if target is None or (self.bundled and target == len(self.code)):   # bundled: NOPs may come between
            at = self._put(near + b"\0\0\0\0")
            self.fixups.append((at + len(near), name))
            return
        size = 2 if -0x80 <= target - (self._start_for(2) + 2) < 0x80 else len(near) + 4
        at = self._place(size) if self.bundled else len(self.code)
        rel = self.labels[name] - (at + size)
        self._put(bytes((short, rel & 0xFF)) if size == 2 else near + struct.pack("<i", rel))
        self.run = []                          # its displacement is fixed: nothing before it grows

    def jmp(self, name: str) -> None:
        """Jump to a local label."""
        self._jump(0xEB, b"\xE9", name)

    def jcc(self, cc: str, name: str) -> None:
        self._jump(0x70 + CC[cc], bytes((0x0F, 0x80 + CC[cc])), name)

    def call(self, symbol: str, addend: int = 0) -> None:
        """call rel32 to symbol+addend (PC32 relocation, addend-4); bundled, it ends on a bundle end."""
        self._rel32(b"\xE8", symbol, addend, end_on_bundle=True)

    def jmp_symbol(self, symbol: str, addend: int = 0) -> None:
        """jmp rel32 to symbol+addend (PC32 relocation, addend-4)."""
        self._rel32(b"\xE9", symbol, addend)

    def call_reg(self, r: Reg) -> None:
        """call r64 (not in bundled code: use masked_call)."""
        self._unmasked("call r64")
        self._emit(b"\xFF", 2, r, 4)

    def ret(self) -> None:
        """ret (not in bundled code: use masked_ret)."""
        self._unmasked("ret")
        self._plain(0xC3)

    def _unmasked(self, what: str) -> None:
        if self.bundled:
            raise EncodeError(f"{what} in bundled code: indirect branches must be masked")

    @staticmethod
    def _masked_pair(ext: int, r: Reg) -> bytes:
        """and r64, -32 (REX.W 83 /4 ib) then jmp r64 (ff /4) or call r64 (ff /2)."""
        low = r.n & 7
        pair = bytes((0x48 | r.n >> 3, 0x83, 0xE0 | low, MASK & 0xFF))
        return pair + (b"\x41" if r.n >= 8 else b"") + bytes((0xFF, 0xC0 | ext << 3 | low))

    def masked_jmp(self, r: Reg) -> None:
        """and r, -32; jmp r -- in one bundle."""
        self._put(self._masked_pair(4, r))

    def masked_call(self, r: Reg) -> None:
        """and r, -32; call r -- in one bundle, ending on its end when bundled."""
        self._put_ending_bundle(self._masked_pair(2, r))

    def masked_ret(self, scratch: Reg) -> None:
        """The return of bundled code: pop scratch; and scratch, -32; jmp scratch."""
        self.pop(scratch)
        self.masked_jmp(scratch)

    # -- machine operations -------------------------------------------------

    def cli(self) -> None:
        self._plain(0xFA)

    def sti(self) -> None:
        self._plain(0xFB)

    def hlt(self) -> None:
        self._plain(0xF4)

    def pushfq(self) -> None:
        self._plain(0x9C)

    def popfq(self) -> None:
        self._plain(0x9D)

    def in_(self, size: int) -> None:
        """in al/ax/eax, dx."""
        _check_size(size, (1, 2, 4))
        self._put((b"\x66" if size == 2 else b"") + (b"\xEC" if size == 1 else b"\xED"))

    def out(self, size: int) -> None:
        """out dx, al/ax/eax."""
        _check_size(size, (1, 2, 4))
        self._put((b"\x66" if size == 2 else b"") + (b"\xEE" if size == 1 else b"\xEF"))

    def mov_from_cr(self, dst: Reg, cr: int) -> None:
        """mov r64, crN."""
        if cr not in CONTROL_REGS:
            raise EncodeError(f"no control register cr{cr}")
        self._emit(b"\x0F\x20", cr, dst, 4, kind=FIXED)

    def mov_to_cr(self, cr: int, src: Reg) -> None:
        """mov crN, r64."""
        if cr not in CONTROL_REGS:
            raise EncodeError(f"no control register cr{cr}")
        self._emit(b"\x0F\x22", cr, src, 4, kind=FIXED)

    def _group7(self, ext: int, m: Mem) -> None:
        if not isinstance(m, Mem):
            raise EncodeError("takes a memory operand")
        self._emit(b"\x0F\x01", ext, m, 4)

    def sgdt(self, m: Mem) -> None:
        self._group7(0, m)

    def sidt(self, m: Mem) -> None:
        self._group7(1, m)

    def lgdt(self, m: Mem) -> None:
        self._group7(2, m)

    def lidt(self, m: Mem) -> None:
        self._group7(3, m)

    def invlpg(self, m: Mem) -> None:
        self._group7(7, m)

    def ltr(self, src: Reg) -> None:
        """ltr r16: load the task register."""
        self._emit(b"\x0F\x00", 3, src, 4, kind=FIXED)

    def syscall(self) -> None:
        self._plain(0x0F, 0x05)

    def rdmsr(self) -> None:
        self._plain(0x0F, 0x32)

    def wrmsr(self) -> None:
        self._plain(0x0F, 0x30)

    def cpuid(self) -> None:
        self._plain(0x0F, 0xA2)

    def rdtsc(self) -> None:
        self._plain(0x0F, 0x31)

    def wbinvd(self) -> None:
        self._plain(0x0F, 0x09)

    def pause(self) -> None:
        self._plain(0xF3, 0x90)

    # -- string operations (the start-up code) --------------------------------

    def cld(self) -> None:
        self._plain(0xFC)

    def rep_stosb(self) -> None:
        """rep stosb: rcx bytes of al to [rdi]."""
        self._plain(0xF3, 0xAA)

    def iretq(self) -> None:
        self._plain(0x48, 0xCF)
