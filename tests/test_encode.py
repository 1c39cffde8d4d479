"""Round-trip every instruction form of pvtool.x86.encode through capstone.

Each public method of `Asm` has a case generator in CASES; a method
without one fails `test_every_method_has_round_trip_cases`.  A case says
what was asked (method and operands) and the text capstone must print;
the expected text is built here from our own register tables, not the
encoder's, so the two are checked against each other.
"""
from __future__ import annotations

import inspect
import re
import struct
from dataclasses import dataclass, field

import capstone
import pytest

from pvtool import obj
from pvtool.x86 import encode as E
from pvtool.x86.encode import Asm, EncodeError, Mem, Reg

NAMES = {
    8: "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split(),
    4: "eax ecx edx ebx esp ebp esi edi r8d r9d r10d r11d r12d r13d r14d r15d".split(),
    2: "ax cx dx bx sp bp si di r8w r9w r10w r11w r12w r13w r14w r15w".split(),
    1: "al cl dl bl spl bpl sil dil r8b r9b r10b r11b r12b r13b r14b r15b".split(),
}
PTR = {1: "byte ptr ", 2: "word ptr ", 4: "dword ptr ", 8: "qword ptr "}
REGS = [Reg(n) for n in range(16)]
FEW = [Reg(0), Reg(4), Reg(5), Reg(7), Reg(8), Reg(12), Reg(13), Reg(15)]
SIZES = (1, 2, 4, 8)
DISPS = (0, 1, -1, 9, 10, 127, -128, 128, -129, 0x7fffffff, -0x80000000)
MEMS = ([Mem(r, d) for r in REGS for d in DISPS]
        + [Mem(None, d) for d in (0, 5, 0x1000, -16, 0x7fffffff, -0x80000000)]
        + [Mem(symbol="sym", disp=d) for d in (0, 8, -8)])
FEW_MEMS = [Mem(Reg(0)), Mem(Reg(4), 8), Mem(Reg(5)), Mem(Reg(12), -200), Mem(Reg(13), 0x1000),
            Mem(None, 0x2000), Mem(symbol="sym")]
BOUNDARY = (0, 1, -1, 9, 10, 0x7f, 0x80, -0x80, -0x81, 0xff, 0x7fff, 0x8000, -0x8000, 0xffff,
            0x7fffffff, 0x80000000, -0x80000000, -0x80000001, 0xffffffff, 0x100000000,
            (1 << 63) - 1, -(1 << 63), (1 << 64) - 1)
CCS = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")


def num(v: int) -> str:
    return str(v) if 0 <= v < 10 else hex(v)


def R(r: Reg, size: int = 8) -> str:
    return NAMES[size][r.n]


def M(m: Mem, size: int | None = None) -> str:
    """Capstone's text for a memory operand (the rip-relative disp32 is still 0)."""
    prefix = PTR[size] if size else ""
    if m.symbol is not None:
        return prefix + "[rip]"
    if m.base is None:
        return prefix + f"[{num(m.disp % (1 << 64))}]"
    if m.disp == 0:
        return prefix + f"[{R(m.base)}]"
    sign = "+" if m.disp > 0 else "-"
    return prefix + f"[{R(m.base)} {sign} {num(abs(m.disp))}]"


def fits(v: int, size: int) -> bool:
    return -(1 << (size * 8 - 1)) <= v < (1 << (size * 8))


def s32(v: int) -> bool:
    return -(1 << 31) <= v < (1 << 31)


@dataclass
class Case:
    method: str
    args: tuple
    text: str
    kwargs: dict = field(default_factory=dict)
    bits: int = 64        # immediates are compared modulo 2**bits
    before: int = 0       # padding before: label 'back' sits at offset 0
    after: int = 0        # padding after: label 'fwd' sits at the end


def C(method, *args, text, bits=64, before=0, after=0, **kwargs) -> Case:
    return Case(method, args, text, kwargs, bits, before, after)


_IMM = re.compile(r"^-?(0x[0-9a-f]+|\d+)$")


def normalize(text: str, bits: int) -> str:
    """Rewrite each immediate operand as hex modulo 2**bits (capstone prints
    sign-extended immediates sometimes signed, sometimes not)."""
    mnemonic, _, ops = text.partition(" ")
    out = []
    for op in ops.split(", ") if ops else []:
        if _IMM.match(op):
            op = hex(int(op, 0) % (1 << bits))
        out.append(op)
    return (mnemonic + " " + ", ".join(out)).strip()


_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def run(case: Case) -> str | None:
    """Assemble the case; return a description of the mismatch, or None."""
    a = Asm()
    a.label("back")
    a.code += b"\x90" * case.before
    start = a.offset
    getattr(a, case.method)(*case.args, **case.kwargs)
    end = a.offset
    a.code += b"\x90" * case.after
    a.label("fwd")
    code = a.finish()
    insns = list(_CS.disasm(code[start:end], start))
    got = "; ".join(" ".join(f"{i.mnemonic} {i.op_str}".split()) for i in insns)
    if sum(i.size for i in insns) != end - start:
        got += f" (decoded {sum(i.size for i in insns)} of {end - start} bytes)"
    want = "; ".join(normalize(t, case.bits) for t in case.text.split("; "))
    if "; ".join(normalize(t, case.bits) for t in got.split("; ")) != want:
        return f"{case.method}{case.args}{case.kwargs}: {code[start:end].hex()} -> {got!r}, want {case.text!r}"
    return None


# -- case generators, one per public method -----------------------------------

def mov_cases():
    for size in SIZES:
        for d in REGS:
            for s in REGS:
                yield C("mov", d, s, size=size, text=f"mov {R(d, size)}, {R(s, size)}")
        for r in FEW:
            for m in MEMS:
                yield C("mov", r, m, size=size, text=f"mov {R(r, size)}, {M(m, size)}")
                yield C("mov", m, r, size=size, text=f"mov {M(m, size)}, {R(r, size)}")
        for v in BOUNDARY:
            if not fits(v, size):
                continue
            for r in REGS:
                mn = "movabs" if size == 8 and not s32(v) else "mov"
                yield C("mov", r, v, size=size, bits=size * 8, text=f"{mn} {R(r, size)}, {v}")
            if size < 8 or s32(v):
                for m in FEW_MEMS:
                    yield C("mov", m, v, size=size, bits=size * 8, text=f"mov {M(m, size)}, {v}")


def extend_cases(method, src_sizes, dst_sizes):
    for src_size in src_sizes:
        for size in dst_sizes:
            if size <= src_size:
                continue
            for d in REGS:
                for s in REGS:
                    yield C(method, d, s, src_size, size=size,
                            text=f"{method} {R(d, size)}, {R(s, src_size)}")
            for m in MEMS:
                yield C(method, Reg(9), m, src_size, size=size,
                        text=f"{method} {R(Reg(9), size)}, {M(m, src_size)}")


def movsxd_cases():
    for d in REGS:
        for s in REGS:
            yield C("movsxd", d, s, text=f"movsxd {R(d)}, {R(s, 4)}")
    for m in MEMS:
        yield C("movsxd", Reg(3), m, text=f"movsxd rbx, {M(m, 4)}")


def lea_cases():
    for size in (4, 8):
        for r in REGS:
            for m in MEMS:
                yield C("lea", r, m, size=size, text=f"lea {R(r, size)}, {M(m)}")


def push_pop_cases(method):
    for r in REGS:
        yield C(method, r, text=f"{method} {R(r)}")


def alu_cases(method, name):
    for size in SIZES:
        for d in REGS:
            for s in REGS:
                yield C(method, d, s, size=size, text=f"{name} {R(d, size)}, {R(s, size)}")
        for m in MEMS:
            yield C(method, Reg(10), m, size=size, text=f"{name} {R(Reg(10), size)}, {M(m, size)}")
            yield C(method, m, Reg(6), size=size, text=f"{name} {M(m, size)}, {R(Reg(6), size)}")
        for v in BOUNDARY:
            if not fits(v, size) or (size == 8 and not s32(v)):
                continue
            for r in REGS:
                yield C(method, r, v, size=size, bits=size * 8, text=f"{name} {R(r, size)}, {v}")
            for m in FEW_MEMS:
                yield C(method, m, v, size=size, bits=size * 8, text=f"{name} {M(m, size)}, {v}")


def tst_cases():
    for size in SIZES:
        for d in REGS:
            for s in REGS:
                yield C("test", d, s, size=size, text=f"test {R(d, size)}, {R(s, size)}")
        for m in FEW_MEMS:
            yield C("test", m, Reg(2), size=size, text=f"test {M(m, size)}, {R(Reg(2), size)}")
        for v in BOUNDARY:
            if fits(v, size) and (size < 8 or s32(v)):
                for r in FEW:
                    yield C("test", r, v, size=size, bits=size * 8, text=f"test {R(r, size)}, {v}")
                yield C("test", FEW_MEMS[3], v, size=size, bits=size * 8, text=f"test {M(FEW_MEMS[3], size)}, {v}")


def imul_cases():
    for size in (2, 4, 8):
        for d in REGS:
            for s in REGS:
                yield C("imul", d, s, size=size, text=f"imul {R(d, size)}, {R(s, size)}")
        for m in MEMS:
            yield C("imul", Reg(14), m, size=size, text=f"imul {R(Reg(14), size)}, {M(m, size)}")
        for v in BOUNDARY:
            if fits(v, size) and (size < 8 or s32(v)):
                for d, s in ((Reg(0), Reg(0)), (Reg(3), Reg(12)), (Reg(13), Reg(5))):
                    yield C("imul", d, s, v, size=size, bits=size * 8,
                            text=f"imul {R(d, size)}, {R(s, size)}, {v}")
                yield C("imul", Reg(1), FEW_MEMS[4], v, size=size, bits=size * 8,
                        text=f"imul {R(Reg(1), size)}, {M(FEW_MEMS[4], size)}, {v}")


def unary_cases(method, name):
    for size in SIZES:
        for r in REGS:
            yield C(method, r, size=size, text=f"{name} {R(r, size)}")
        for m in MEMS:
            yield C(method, m, size=size, text=f"{name} {M(m, size)}")


def shift_cases(method):
    for size in SIZES:
        for r in REGS:
            yield C(method, r, E.RCX, size=size, text=f"{method} {R(r, size)}, cl")
            for n in (0, 1, 5, 31, 63, 255):
                yield C(method, r, n, size=size, bits=8, text=f"{method} {R(r, size)}, {n}")
        for m in FEW_MEMS:
            yield C(method, m, E.RCX, size=size, text=f"{method} {M(m, size)}, cl")
            yield C(method, m, 7, size=size, bits=8, text=f"{method} {M(m, size)}, 7")


def setcc_cases():
    for cc in CCS:
        for r in REGS:
            yield C("setcc", cc, r, text=f"set{cc} {R(r, 1)}")
        for m in FEW_MEMS:
            yield C("setcc", cc, m, text=f"set{cc} {M(m, 1)}")


def jump_cases(method, mnemonic, args=()):
    # backward short, backward near, forward (always near)
    yield C(method, *args, "back", before=100, text=f"{mnemonic} 0")
    yield C(method, *args, "back", before=300, text=f"{mnemonic} 0")
    near = 5 if method == "jmp" else 6
    yield C(method, *args, "fwd", after=3, text=f"{mnemonic} {num(near + 3)}")
    yield C(method, *args, "fwd", before=7, after=1000, text=f"{mnemonic} {num(7 + near + 1000)}")


def jcc_cases():
    for cc in CCS:
        yield from jump_cases("jcc", f"j{cc}", (cc,))


def rel32_sym_cases(method, mnemonic):
    for addend in (0, 32, 18 * 32):
        yield C(method, "target", addend, before=20, text=f"{mnemonic} {num(20 + 5)}")


def call_reg_cases():
    for r in REGS:
        yield C("call_reg", r, text=f"call {R(r)}")


def masked_cases(method, mnemonic):
    for r in REGS:
        yield C(method, r, text=f"and {R(r)}, 0xffffffffffffffe0; {mnemonic} {R(r)}")


def masked_ret_cases():
    for r in (E.R11, E.RCX, E.RAX):
        yield C("masked_ret", r, text=f"pop {R(r)}; and {R(r)}, 0xffffffffffffffe0; jmp {R(r)}")


def cr_cases(method):
    for cr in (0, 2, 3, 4):
        for r in REGS:
            if method == "mov_from_cr":
                yield C(method, r, cr, text=f"mov {R(r)}, cr{cr}")
            else:
                yield C(method, cr, r, text=f"mov cr{cr}, {R(r)}")


def group7_cases(method, ptr=""):
    for m in MEMS:
        yield C(method, m, text=f"{method} {ptr}{M(m)}")


def io_cases(method):
    acc = {1: "al", 2: "ax", 4: "eax"}
    for size in (1, 2, 4):
        text = f"in {acc[size]}, dx" if method == "in_" else f"out dx, {acc[size]}"
        yield C(method, size, text=text)


def plain(method, text=None):
    return lambda: iter([C(method, text=text or method)])


CASES = {
    "mov": mov_cases,
    "movzx": lambda: extend_cases("movzx", (1, 2), (2, 4, 8)),
    "movsx": lambda: extend_cases("movsx", (1, 2), (2, 4, 8)),
    "movsxd": movsxd_cases,
    "lea": lea_cases,
    "push": lambda: push_pop_cases("push"),
    "pop": lambda: push_pop_cases("pop"),
    "add": lambda: alu_cases("add", "add"),
    "sub": lambda: alu_cases("sub", "sub"),
    "and_": lambda: alu_cases("and_", "and"),
    "or_": lambda: alu_cases("or_", "or"),
    "xor": lambda: alu_cases("xor", "xor"),
    "cmp": lambda: alu_cases("cmp", "cmp"),
    "test": tst_cases,
    "imul": imul_cases,
    "neg": lambda: unary_cases("neg", "neg"),
    "not_": lambda: unary_cases("not_", "not"),
    "div": lambda: unary_cases("div", "div"),
    "idiv": lambda: unary_cases("idiv", "idiv"),
    "cqo": plain("cqo"),
    "shl": lambda: shift_cases("shl"),
    "shr": lambda: shift_cases("shr"),
    "sar": lambda: shift_cases("sar"),
    "setcc": setcc_cases,
    "jmp": lambda: jump_cases("jmp", "jmp"),
    "jcc": jcc_cases,
    "call": lambda: rel32_sym_cases("call", "call"),
    "jmp_symbol": lambda: rel32_sym_cases("jmp_symbol", "jmp"),
    "call_reg": call_reg_cases,
    "ret": plain("ret"),
    "masked_jmp": lambda: masked_cases("masked_jmp", "jmp"),
    "masked_call": lambda: masked_cases("masked_call", "call"),
    "masked_ret": masked_ret_cases,
    "cli": plain("cli"),
    "sti": plain("sti"),
    "hlt": plain("hlt"),
    "pushfq": plain("pushfq"),
    "popfq": plain("popfq"),
    "in_": lambda: io_cases("in_"),
    "out": lambda: io_cases("out"),
    "mov_from_cr": lambda: cr_cases("mov_from_cr"),
    "mov_to_cr": lambda: cr_cases("mov_to_cr"),
    "invlpg": lambda: group7_cases("invlpg", "byte ptr "),
    "lgdt": lambda: group7_cases("lgdt"),
    "lidt": lambda: group7_cases("lidt"),
    "sgdt": lambda: group7_cases("sgdt"),
    "sidt": lambda: group7_cases("sidt"),
    "rdmsr": plain("rdmsr"),
    "wrmsr": plain("wrmsr"),
    "cpuid": plain("cpuid"),
    "rdtsc": plain("rdtsc"),
    "wbinvd": plain("wbinvd"),
    "pause": plain("pause"),
    "iretq": plain("iretq"),
    "syscall": plain("syscall"),
    "push_imm": lambda: iter([C("push_imm", v, text=f"push {v}") for v in (0, 0x1B, -1, 0x80, -0x81, 0x7FFFFFFF)]),
    "push_mem": lambda: (C("push_mem", m, text=f"push {M(m, 8)}") for m in FEW_MEMS),
    "lea_here": lambda: (C("lea_here", r, text=f"lea {R(r)}, [rip]") for r in REGS),
    "ltr": lambda: (C("ltr", r, text=f"ltr {R(r, 2)}") for r in REGS),
    "cld": plain("cld"),
    "rep_stosb": plain("rep_stosb", "rep stosb byte ptr [rdi], al"),
}

NOT_INSTRUCTIONS = {"label", "finish", "offset", "anchor", "at", "span"}


def test_every_method_has_round_trip_cases():
    methods = {name for name, _ in inspect.getmembers(Asm) if not name.startswith("_")}
    missing = methods - NOT_INSTRUCTIONS - set(CASES)
    assert not missing, f"encoder methods without round-trip cases: {sorted(missing)}"
    assert not set(CASES) - methods, "cases for methods that no longer exist"


@pytest.mark.parametrize("method", sorted(CASES))
def test_round_trip(method):
    cases = list(CASES[method]())
    assert cases
    failures = [f for f in map(run, cases) if f]
    assert not failures, f"{len(failures)} of {len(cases)} failed, e.g.\n" + "\n".join(failures[:8])


def test_prefixable_instructions_have_room_for_every_prefix(monkeypatch):
    """Bundled padding gives each PREFIXABLE instruction MAX_PREFIXES without looking at its
    size: that keeps it within x86's 15 bytes only if none is longer than 15 - MAX_PREFIXES."""
    sizes = []
    put = Asm._put_prefixable

    def recording(self, ins):
        sizes.append(len(ins))
        return put(self, ins)
    monkeypatch.setattr(Asm, "_put_prefixable", recording)
    for method in CASES:
        for case in CASES[method]():
            run(case)
    assert sizes and max(sizes) <= 15 - E.MAX_PREFIXES
    assert max(sizes) == 10                    # movabs: the test reaches the longest form


# -- relocations and fixups -----------------------------------------------------

def apply_pc32(code: bytes, reloc: obj.Reloc, base: int, symbol_addr: int) -> int:
    """The rel32 value a linker would write (S + A - P), checked to be 32-bit."""
    value = symbol_addr + reloc.addend - (base + reloc.offset)
    assert s32(value)
    return value


@pytest.mark.parametrize("trail_size,emit", [
    (0, lambda a, m: a.mov(E.RAX, m)),
    (0, lambda a, m: a.lea(E.R13, m)),
    (1, lambda a, m: a.cmp(m, 5, size=1)),
    (1, lambda a, m: a.add(m, 5)),
    (2, lambda a, m: a.mov(m, 0x1234, size=2)),
    (4, lambda a, m: a.mov(m, 0x12345678, size=4)),
    (4, lambda a, m: a.test(m, 0x12345678)),
    (1, lambda a, m: a.shl(m, 3)),
])
def test_rip_relative_reloc_points_at_symbol_plus_disp(trail_size, emit):
    a = Asm()
    a.code += b"\x90" * 3
    emit(a, Mem(symbol="glob", disp=24))
    code = bytearray(a.finish())
    (reloc,) = a.relocs
    assert reloc.kind == obj.PC32 and reloc.symbol == "glob"
    base, glob = 0x100000, 0x200040
    struct.pack_into("<i", code, reloc.offset, apply_pc32(code, reloc, base, glob))
    # the CPU adds disp32 to the address of the next instruction
    next_ip = base + reloc.offset + 4 + trail_size
    assert reloc.offset + 4 + trail_size == len(code)
    assert next_ip + struct.unpack_from("<i", code, reloc.offset)[0] == glob + 24


def test_call_reloc_is_pc32_with_addend_minus_4():
    a = Asm()
    a.push(E.RBP)
    a.call("callee")
    a.call("__hypercall_page", 3 * 32)
    a.jmp_symbol("__hypercall_page", 18 * 32)
    assert [(r.offset, r.kind, r.symbol, r.addend) for r in a.relocs] == [
        (2, obj.PC32, "callee", -4), (7, obj.PC32, "__hypercall_page", 92),
        (12, obj.PC32, "__hypercall_page", 572)]


def test_forward_and_backward_jumps_are_patched():
    a = Asm()
    a.label("top")
    a.jcc("e", "out")
    a.code += b"\x90" * 200
    a.jmp("top")
    a.label("out")
    code = a.finish()
    insns = list(_CS.disasm(code, 0))
    assert insns[0].mnemonic == "je" and int(insns[0].op_str, 0) == a.labels["out"]
    assert insns[-1].mnemonic == "jmp" and int(insns[-1].op_str, 0) == 0
    assert insns[-1].size == 5            # 200 bytes back is out of short reach


def test_short_backward_jump():
    a = Asm()
    a.label("top")
    a.cli()
    a.jmp("top")
    assert a.finish() == b"\xfa\xeb\xfd"


@pytest.mark.parametrize("bad", [
    lambda a: a.mov(Mem(E.RAX), Mem(E.RBX)),
    lambda a: a.add(Mem(E.RAX), Mem(E.RBX)),
    lambda a: a.mov(Mem(E.RAX), 1 << 40),
    lambda a: a.add(E.RAX, 0x80000000),
    lambda a: a.mov(E.RAX, 0x100, size=1),
    lambda a: a.mov(E.RAX, Mem(E.RBX, 1 << 33)),
    lambda a: a.mov(E.RAX, Mem(None, 0x80000000)),
    lambda a: a.shl(E.RAX, E.RDX),
    lambda a: a.mov_to_cr(8, E.RAX),
    lambda a: a.movzx(E.RAX, E.RBX, 4),
    lambda a: a.imul(E.RAX, E.RBX, size=1),
    lambda a: a.lea(E.RAX, E.RBX),
    lambda a: a.invlpg(E.RAX),
    lambda a: a.in_(8),
    lambda a: a.mov(Mem(E.RBX, symbol="x"), E.RAX),
])
def test_unencodable_forms_raise(bad):
    with pytest.raises(EncodeError):
        bad(Asm())


def test_undefined_and_duplicate_labels_raise():
    a = Asm()
    a.jmp("nowhere")
    with pytest.raises(EncodeError, match="nowhere"):
        a.finish()
    a.label("x")
    with pytest.raises(EncodeError):
        a.label("x")


# -- bundled code ----------------------------------------------------------------

def bundle_text(code: bytes) -> list[tuple[int, int, str]]:
    """Decode bundle by bundle; fails if an instruction crosses a bundle end."""
    out = []
    for b in range(0, len(code), E.BUNDLE):
        chunk = code[b:b + E.BUNDLE]
        insns = list(_CS.disasm(chunk, b))
        assert sum(i.size for i in insns) == len(chunk), f"bundle at {b:#x} does not decode whole"
        out += [(i.address, i.size, " ".join(f"{i.mnemonic} {i.op_str}".split())) for i in insns]
    return out


# One instruction of every length class, as (method, args); jumps go to labels 'l0'..'l3'.
EMITTERS = [
    ("mov", (E.RAX, 0x123456789ABC)), ("mov", (Mem(E.R12, 0x1000), 7)), ("add", (E.RBX, 1)),
    ("lea", (E.R13, Mem(symbol="sym", disp=8))), ("push", (E.R15,)), ("cqo", ()), ("nop_free_cli", ()),
    ("imul", (E.RCX, Mem(E.RSP, 200), 0x12345)), ("movzx", (E.RAX, Mem(E.R13), 2)),
    ("call", ("callee",)), ("jmp_symbol", ("__hypercall_page", 18 * 32)), ("masked_call", (E.RAX,)),
    ("masked_jmp", (E.R11,)), ("masked_ret", (E.R11,)), ("jcc", ("ne", "l0")), ("jmp", ("l1",)),
    ("jcc", ("e", "l2")), ("jmp", ("l3",)),
]


def emit_program(a: Asm, picks: list[int], label_at: dict[int, str]) -> None:
    for k, pick in enumerate(picks):
        if k in label_at:
            a.label(label_at[k])
        method, args = EMITTERS[pick]
        if method == "nop_free_cli":
            a.cli()
        else:
            getattr(a, method)(*args)
    for name in ("l0", "l1", "l2", "l3"):
        if name not in a.labels:
            a.label(name)


def test_bundled_code_never_crosses_a_bundle_and_keeps_its_instructions():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(0, len(EMITTERS) - 1), min_size=4, max_size=60), st.data())
    def check(picks, data):
        places = data.draw(st.lists(st.integers(0, len(picks) - 1), min_size=4, max_size=4, unique=True))
        label_at = {k: f"l{n}" for n, k in enumerate(places)}
        plain, bundled = Asm(), Asm(bundled=True)
        emit_program(plain, picks, label_at)
        emit_program(bundled, picks, label_at)
        code = bundled.finish()
        insns = bundle_text(code)
        starts = {addr for addr, _, _ in insns}
        padding = {addr for addr, _, text in insns if text.startswith("nop")}
        # every label is an instruction start that is not padding; every call ends a bundle
        assert all(at in starts - padding or at == len(code) for at in bundled.labels.values())
        for addr, size, text in insns:
            if text.startswith("call"):
                assert (addr + size) % E.BUNDLE == 0, f"{text} at {addr:#x}"
        for k, (addr, size, text) in enumerate(insns):
            if text.startswith(("jmp r", "call r")):
                prev = insns[k - 1]
                assert prev[2] == f"and {text.split()[1]}, 0xffffffffffffffe0" and prev[0] // 32 == addr // 32
        # padding aside, the same instructions in the same order, and each branch to a
        # label lands on the same instruction as in the plain code
        plain_code = plain.finish()
        plain_insns = _insns(plain_code)
        real = [i for i in insns if i[0] not in padding]

        def shape(t):                 # prefix padding shows as "cs:" on lea
            mnemonic, _, operand = t.replace("cs:", "").partition(" ")
            return mnemonic if operand[:1].isdigit() else f"{mnemonic} {operand}"
        assert [shape(t) for _, _, t in real] == [shape(t) for _, _, t in plain_insns]

        def targets(listing, code, asm):
            index = {addr: k for k, (addr, _, _) in enumerate(listing)} | {len(code): len(listing)}
            relocated = {r.offset for r in asm.relocs}
            return [index.get(int(t.split()[1], 0)) for addr, size, t in listing
                    if t.split()[0] in ("jmp", "jne", "je") and t.split()[1][:1].isdigit()
                    and addr + size - 4 not in relocated]
        assert targets(real, code, bundled) == targets(plain_insns, plain_code, plain)
    check()


def _insns(code: bytes) -> list[tuple[int, int, str]]:
    return [(i.address, i.size, " ".join(f"{i.mnemonic} {i.op_str}".split())) for i in _CS.disasm(code, 0)]


def test_padding_is_the_fewest_nops():
    for n in range(1, 64):
        pad = E.nops(n)
        insns = _insns(pad)
        assert len(pad) == n and sum(s for _, s, _ in insns) == n
        assert all(t.startswith("nop") for _, _, t in insns)
        assert len(insns) == -(-n // E.NOP_MAX)


def test_bundled_calls_end_on_a_bundle_end_and_padding_prefers_prefixes():
    a = Asm(bundled=True)
    a.push(E.RBP)                              # 1 byte, grows by 5 prefixes
    a.call("f")                                # then 21 bytes of NOPs: the call ends at 32
    a.label("top")
    a.mov(E.RAX, 0x1122334455667788)           # 10 bytes at 32
    a.add(E.RAX, 1)                            # 4 bytes: 42..46
    a.mov(E.RBX, 0x1122334455667788)           # 46..56
    here = a.anchor()
    a.mov(E.RBX, 0x1122334455667788)           # would cross 64: the two before grow by 5 and 3
    a.masked_call(E.RAX)                       # 5 prefixes on the mov before, NOPs, ends at 96
    a.jmp("top")
    code = a.finish()
    insns = bundle_text(code)
    assert code[:6] == b"\x2e" * 5 + b"\x55" and insns[0][2] == "push rbp"
    call = next(i for i in insns if i[2].startswith("call 0x"))
    assert call[0] + call[1] == 32 and a.relocs[0].offset == 28
    assert a.labels["top"] == 32 and a.at(here) == 64
    assert [t for addr, _, t in insns if 32 <= addr < 64] == [
        "movabs rax, 0x1122334455667788", "add rax, 1", "movabs rbx, 0x1122334455667788"]
    (mcall,) = [i for i in insns if i[2] == "call rax"]
    assert mcall[0] + mcall[1] == 96
    assert insns[-1][2] == "jmp 0x20" and insns[-1][1] == 2


def test_prefix_padding_moves_what_follows_and_leaves_branches_alone():
    a = Asm(bundled=True)
    a.lea(E.RAX, Mem(symbol="sym"))            # 7 bytes, grows; its rip-relative field moves along
    a.label("mid")
    a.mov(E.RCX, E.RDX)                        # 3 bytes, grows
    a.jcc("ne", "mid")                         # a branch: nothing before it grows afterwards
    a.mov(E.RCX, E.RDX)                        # 3 bytes at 12, grows
    start = a.anchor()
    a.mov(E.RDX, 0x1122334455667788)           # 10 bytes at 15
    a.mov(E.RSI, 0x1122334455667788)           # needs 7 bytes of room: 5 + 2 from the two movs after the branch
    end = a.anchor()
    code = a.finish()
    insns = bundle_text(code)
    assert [t for _, _, t in insns][:3] == ["lea rax, [rip]", "mov rcx, rdx", "jne 7"]
    assert a.relocs[0].offset == 3 and a.labels["mid"] == 7
    assert a.span(start, end) == (12 + 3 + 2, 5 + 10 + 10)      # movabs rdx: 2 prefixes before, 5 its own
    assert [i[0] for i in insns if i[2].startswith("movabs rsi")] == [32]


def test_bundled_code_refuses_unmasked_returns_and_calls():
    for bad in (lambda a: a.ret(), lambda a: a.call_reg(E.RAX)):
        with pytest.raises(EncodeError, match="masked"):
            bad(Asm(bundled=True))
