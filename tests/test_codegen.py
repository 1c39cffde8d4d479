"""The x86-64 code generator on hand-built IR, run on Unicorn and read back with capstone.

Most behaviour tests compile the same IR three times: with every register
allocatable, with none (every value lives in a spill slot) and with only
rcx and rdx (the registers shifts, division and port I/O fight over), so
both the register and the memory paths of each emitter are exercised.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import capstone
import pytest

from pvtool.expect import expectation
from unicorn import UcError

from pvimage import abi
from pvtool import ir, obj
from pvtool.intrinsics import INTRINSICS
from pvtool.x86 import codegen, isel
from pvtool.x86.codegen import CodegenError, FunctionGen
from pvtool.x86.encode import RCX, RDX
from unicorn_harness import GDT, HYPERCALL_PAGE, RAM, HarnessError, Machine

M64 = 1 << 64
REGISTER_SETS = {"all": None, "none": [], "rcx-rdx": [RCX, RDX]}
VALUES = (0, 1, 2, 7, 63, 64, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
          0x100000000, (1 << 63) - 1, 1 << 63, M64 - 1, M64 - 2, 0x123456789ABCDEF0)
IMMEDIATES = (1, 5, M64 - 1, 0x7FFFFFFF, 0x80000000, 1 << 63, 0x123456789)
LOC = ir.Loc("t.pvk", 1, 1)
_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def signed(x: int) -> int:
    x %= M64
    return x - M64 if x >= 1 << 63 else x


def tdiv(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


REF = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "udiv": lambda a, b: a // b,
    "urem": lambda a, b: a % b,
    "sdiv": lambda a, b: tdiv(signed(a), signed(b)),
    "srem": lambda a, b: signed(a) - signed(b) * tdiv(signed(a), signed(b)),
    "and": lambda a, b: a & b,
    "or": lambda a, b: a | b,
    "xor": lambda a, b: a ^ b,
    "shl": lambda a, b: a << (b % 64),
    "shr": lambda a, b: a >> (b % 64),
    "sar": lambda a, b: signed(a) >> (b % 64),
}
CMP_REF = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
    "ult": lambda a, b: a < b, "ule": lambda a, b: a <= b,
    "ugt": lambda a, b: a > b, "uge": lambda a, b: a >= b,
    "slt": lambda a, b: signed(a) < signed(b), "sle": lambda a, b: signed(a) <= signed(b),
    "sgt": lambda a, b: signed(a) > signed(b), "sge": lambda a, b: signed(a) >= signed(b),
}
assert set(REF) == set(ir.BINOPS) and set(CMP_REF) == set(ir.CMPOPS)


def defined(op: str, a: int, b: int) -> bool:
    """Python semantics apply; x86 faults on division by zero and INT_MIN / -1."""
    if op in ("udiv", "urem", "sdiv", "srem") and b == 0:
        return False
    return not (op in ("sdiv", "srem") and a == 1 << 63 and b == M64 - 1)


class FB:
    """A tiny IR function builder."""

    def __init__(self, name: str, nparams: int = 0, interrupt: bool = False) -> None:
        self.f = ir.Function(name, [], [], returns_value=not interrupt, interrupt=interrupt, loc=LOC)
        self.f.params = [self.f.new_vreg() for _ in range(nparams)]
        self.p = self.f.params
        self.block("entry")

    def block(self, label: str) -> None:
        self.cur = ir.Block(label, [])
        self.f.blocks.append(self.cur)

    def v(self) -> ir.VReg:
        return self.f.new_vreg()

    def __call__(self, ins: ir.Instr) -> ir.VReg | None:
        self.cur.instrs.append(ins)
        return getattr(ins, "dst", None)

    def op(self, op, a, b):
        return self(ir.BinOp(op, self.v(), a, b))

    def cmp(self, op, a, b):
        return self(ir.Cmp(op, self.v(), a, b))

    def copy(self, src):
        return self(ir.Copy(self.v(), src))

    def load(self, base, offset, size, signed=False):
        return self(ir.Load(self.v(), base, offset, size, signed))

    def store(self, base, offset, value, size):
        self(ir.Store(base, offset, value, size))

    def call(self, func, *args):
        return self(ir.Call(self.v(), func, list(args)))

    def mop(self, op, *args, result=True):
        return self(ir.MachineOp(op, self.v() if result else None, list(args), loc=LOC))

    def ret(self, v=None):
        self.cur.term = ir.Ret(v)

    def jump(self, target):
        self.cur.term = ir.Jump(target)

    def branch(self, cond, then, else_):
        self.cur.term = ir.Branch(cond, then, else_)


def build(fns, data=(), registers=None) -> obj.ObjectCode:
    return codegen.generate(ir.Module([f.f if isinstance(f, FB) else f for f in fns], list(data)), registers)


def machine(fns, data=(), registers=None) -> Machine:
    return Machine(build(fns, data, registers).functions, list(data))


def disasm(fc: obj.FunctionCode) -> list[tuple[int, int, str]]:
    return [(i.address, i.size, f"{i.mnemonic} {i.op_str}".strip()) for i in _CS.disasm(fc.code, 0)]


def texts(fc: obj.FunctionCode) -> list[str]:
    return [t for _, _, t in disasm(fc)]


def function(oc: obj.ObjectCode, name: str) -> obj.FunctionCode:
    return next(f for f in oc.functions if f.name == name)


# -- arithmetic -------------------------------------------------------------------

def binop_functions(op: str) -> list[FB]:
    fns = []
    b = FB(f"{op}_rr", 2)
    b.ret(b.op(op, b.p[0], b.p[1]))
    fns.append(b)
    for k, imm in enumerate(IMMEDIATES):
        b = FB(f"{op}_ri{k}", 1)
        b.ret(b.op(op, b.p[0], imm))
        fns.append(b)
        b = FB(f"{op}_ir{k}", 1)
        b.ret(b.op(op, imm, b.p[0]))
        fns.append(b)
    b = FB(f"{op}_same", 1)                    # x op x
    b.ret(b.op(op, b.p[0], b.p[0]))
    fns.append(b)
    b = FB(f"{op}_acc", 2)                     # x = x op y, as a loop body does
    x = b.copy(b.p[0])
    b(ir.BinOp(op, x, x, b.p[1]))
    b.ret(x)
    fns.append(b)
    b = FB(f"{op}_rev", 2)                     # x = y op x
    x = b.copy(b.p[0])
    b(ir.BinOp(op, x, b.p[1], x))
    b.ret(x)
    fns.append(b)
    return fns


@pytest.mark.parametrize("regs", REGISTER_SETS)
@pytest.mark.parametrize("op", ir.BINOPS)
def test_binop_matches_python(op, regs):
    m = machine(binop_functions(op), registers=REGISTER_SETS[regs])
    ref = REF[op]
    bad = []

    def check(name, args, a, b):
        if defined(op, a, b):
            got, want = m.call(name, *args), ref(a, b) % M64
            if got != want:
                bad.append(f"{name}{tuple(map(hex, args))} = {got:#x}, want {want:#x}")

    for a in VALUES:
        for b in VALUES:
            check(f"{op}_rr", (a, b), a, b)
            check(f"{op}_acc", (a, b), a, b)
            check(f"{op}_rev", (a, b), b, a)
        check(f"{op}_same", (a,), a, a)
        for k, imm in enumerate(IMMEDIATES):
            check(f"{op}_ri{k}", (a,), a, imm)
            check(f"{op}_ir{k}", (a,), imm, a)
    assert not bad, "\n".join(bad[:10])
    assert not m.misaligned


@pytest.mark.parametrize("op", ["udiv", "sdiv", "urem", "srem"])
def test_division_by_zero_faults(op):
    b = FB("f", 2)
    b.ret(b.op(op, b.p[0], b.p[1]))
    c = FB("g", 1)
    c.ret(c.op(op, c.p[0], 0))
    m = machine([b, c])
    assert m.call("f", 7, 2) == REF[op](7, 2)
    with pytest.raises(UcError):
        m.call("f", 7, 0)
    with pytest.raises(UcError):
        m.call("g", 7)


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_compare_as_value_and_as_branch(regs):
    fns = []
    for op in ir.CMPOPS:
        b = FB(f"{op}_v", 2)
        b.ret(b.cmp(op, b.p[0], b.p[1]))
        fns.append(b)
        b = FB(f"{op}_br", 2)                # then-block laid out next: inverted jcc
        b.branch(b.cmp(op, b.p[0], b.p[1]), "yes", "no")
        b.block("yes")
        b.ret(1)
        b.block("no")
        b.ret(0)
        fns.append(b)
        b = FB(f"{op}_br_inv", 2)            # else-block laid out next: jcc to then
        b.branch(b.cmp(op, b.p[0], b.p[1]), "yes", "no")
        b.block("no")
        b.ret(0)
        b.block("yes")
        b.ret(1)
        fns.append(b)
        for k, imm in enumerate(IMMEDIATES + (0,)):
            b = FB(f"{op}_ri{k}", 1)
            b.branch(b.cmp(op, b.p[0], imm), "yes", "no")
            b.block("yes")
            b.ret(1)
            b.block("no")
            b.ret(0)
            fns.append(b)
            b = FB(f"{op}_ir{k}", 1)
            b.ret(b.cmp(op, imm, b.p[0]))
            fns.append(b)
    m = machine(fns, registers=REGISTER_SETS[regs])
    bad = []
    for op in ir.CMPOPS:
        ref = CMP_REF[op]
        for a in VALUES:
            for bv in VALUES:
                for suffix in ("_v", "_br", "_br_inv"):
                    if m.call(op + suffix, a, bv) != ref(a, bv):
                        bad.append(f"{op}{suffix}({a:#x}, {bv:#x})")
            for k, imm in enumerate(IMMEDIATES + (0,)):
                if m.call(f"{op}_ri{k}", a) != ref(a, imm):
                    bad.append(f"{op}_ri({a:#x}, {imm:#x})")
                if m.call(f"{op}_ir{k}", a) != ref(imm, a):
                    bad.append(f"{op}_ir({imm:#x}, {a:#x})")
    assert not bad, bad[:10]


def test_compare_with_only_constants_and_constant_branch():
    b = FB("f")
    c = b.cmp("slt", M64 - 1, 3)             # -1 < 3
    b.branch(c, "yes", "no")
    b.block("yes")
    b.ret(b.cmp("ugt", M64 - 1, 3))
    b.block("no")
    b.ret(7)
    g = FB("g")
    g.branch(0, "yes", "no")
    g.block("yes")
    g.ret(1)
    g.block("no")
    g.ret(2)
    m = machine([b, g])
    assert m.call("f") == 1
    assert m.call("g") == 2


def test_compare_branch_is_fused_and_immediates_are_folded():
    b = FB("f", 2)
    s = b.op("add", b.p[0], 100)
    b.branch(b.cmp("ult", s, b.p[1]), "yes", "no")
    b.block("yes")
    b.ret(b.op("and", s, 0xFF))
    b.block("no")
    b.ret(0)
    t = texts(function(build([b]), "f"))
    assert not any(x.startswith("set") for x in t), t
    assert any(x.startswith("cmp") for x in t) and any(x.startswith("jae") or x.startswith("jb") for x in t)
    assert any(x.endswith(", 0x64") and x.split()[0] in ("add", "lea") or "+ 0x64]" in x for x in t), t
    assert any(x.startswith("and") and x.endswith(", 0xff") for x in t), t


def test_unused_compare_result_is_not_fused_when_used_twice():
    b = FB("f", 2)
    c = b.cmp("eq", b.p[0], b.p[1])
    b.branch(c, "yes", "no")
    b.block("yes")
    b.ret(c)
    b.block("no")
    b.ret(c)
    oc = build([b])
    assert any(x.startswith("sete") for x in texts(function(oc, "f")))
    m = Machine(oc.functions)
    assert (m.call("f", 3, 3), m.call("f", 3, 4)) == (1, 0)


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_unops_and_extensions(regs):
    fns = []
    for op in ir.UNOPS:
        b = FB(op, 1)
        b.ret(b(ir.UnOp(op, b.v(), b.p[0])))
        fns.append(b)
        b = FB(op + "_acc", 1)
        x = b.copy(b.p[0])
        b(ir.UnOp(op, x, x))
        b.ret(x)
        fns.append(b)
    for bits in (8, 16, 32):
        for sgn in (False, True):
            b = FB(f"ext{bits}{'s' if sgn else 'u'}", 1)
            b.ret(b(ir.Ext(b.v(), b.p[0], bits, sgn)))
            fns.append(b)
            b = FB(f"extc{bits}{'s' if sgn else 'u'}")
            b.ret(b(ir.Ext(b.v(), 0x1234_5678_9ABC_DEF0, bits, sgn)))
            fns.append(b)
    m = machine(fns, registers=REGISTER_SETS[regs])
    for a in VALUES:
        assert m.call("neg", a) == m.call("neg_acc", a) == -a % M64
        assert m.call("not", a) == m.call("not_acc", a) == ~a % M64
        for bits in (8, 16, 32):
            low = a % (1 << bits)
            assert m.call(f"ext{bits}u", a) == low
            want = low - (1 << bits) if low >> (bits - 1) else low
            assert m.call(f"ext{bits}s", a) == want % M64
    assert m.call("extc8u") == 0xF0 and m.call("extc8s") == M64 - 0x10
    assert m.call("extc16s") == M64 - 0x2110 and m.call("extc32u") == 0x9ABCDEF0


def test_copies_of_every_immediate_width():
    fns = []
    for k, v in enumerate(VALUES + (M64 - 0x80000000, M64 - 0x80000001)):
        b = FB(f"c{k}")
        b.ret(b.copy(v))
        fns.append(b)
    for regs in REGISTER_SETS.values():
        m = machine(fns, registers=regs)
        for k, v in enumerate(VALUES + (M64 - 0x80000000, M64 - 0x80000001)):
            assert m.call(f"c{k}") == v


# -- memory ----------------------------------------------------------------------------

@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_loads_and_stores_of_every_size_and_sign(regs):
    fns = []
    for size in (1, 2, 4, 8):
        for sgn in (False, True):
            b = FB(f"ld{size}{'s' if sgn else 'u'}", 2)      # (ptr, index) -> *(ptr + 8 + index)
            p = b.op("add", b.p[0], b.p[1])
            b.ret(b.load(p, 8, size, sgn))
            fns.append(b)
        b = FB(f"st{size}", 2)                               # (ptr, value): *(ptr - 16) = value
        b.store(b.p[0], -16, b.p[1], size)
        b.ret(0)
        fns.append(b)
        b = FB(f"sti{size}", 1)                              # an immediate value
        b.store(b.p[0], 0, 0x8877665544332211, size)
        b.ret(0)
        fns.append(b)
        b = FB(f"abs{size}")                                 # an absolute address
        b.store(RAM + 0x800, 0, 0xA5A5A5A5A5A5A5A5, size)
        b.ret(b.load(RAM, 0x800, size, True))
        fns.append(b)
    b = FB("farptr", 1)                                      # offset beyond disp32
    b.ret(b.load(b.p[0], 1 << 33, 8))
    fns.append(b)
    m = machine(fns, registers=REGISTER_SETS[regs])
    pattern = bytes(range(0x80, 0x100)) + bytes(range(0x80))
    for size in (1, 2, 4, 8):
        mask = (1 << (8 * size)) - 1
        m.write(RAM, pattern)
        for idx in (0, 3, 17):
            raw = int.from_bytes(pattern[8 + idx:8 + idx + size], "little")
            assert m.call(f"ld{size}u", RAM, idx) == raw
            want = raw - (1 << (8 * size)) if raw >> (8 * size - 1) else raw
            assert m.call(f"ld{size}s", RAM, idx) == want % M64
        m.write(RAM + 0x100, b"\xee" * 16)
        m.call(f"st{size}", RAM + 0x110, 0x0102030405060708)
        assert m.read(RAM + 0x100, 16) == (0x0102030405060708 & mask).to_bytes(size, "little") + b"\xee" * (16 - size)
        m.write(RAM + 0x200, b"\xee" * 16)
        m.call(f"sti{size}", RAM + 0x200)
        assert m.read(RAM + 0x200, 16) == (0x8877665544332211 & mask).to_bytes(size, "little") + b"\xee" * (16 - size)
        got = m.call(f"abs{size}")
        assert got == signed(0xA5A5A5A5A5A5A5A5 & mask | (-1 << (8 * size) if size < 8 else 0)) % M64
    m.write(RAM + 0x10, struct.pack("<Q", 0xFEEDFACE))
    assert m.call("farptr", RAM + 0x10 - (1 << 33)) == 0xFEEDFACE


def test_globals_through_addrof_and_rip_relative_accesses():
    data = [ir.Data("counter", "data", 8, 8, struct.pack("<Q", 41)),
            ir.Data("table", "rodata", 16, 8, struct.pack("<QQ", 0x1111, 0x2222)),
            ir.Data("ptr", "data", 8, 8, bytes(8), [ir.DataReloc(0, "table", 8)])]
    b = FB("bump")                                 # counter += 1 (fused: rip-relative)
    a = b(ir.AddrOf(b.v(), "counter"))
    x = b.load(a, 0, 8)
    y = b.op("add", x, 1)
    a2 = b(ir.AddrOf(b.v(), "counter"))
    b.store(a2, 0, y, 8)
    b.ret(y)
    c = FB("second")                               # table[1] via a kept address and via ptr
    t = c(ir.AddrOf(c.v(), "table", 8))
    p = c(ir.AddrOf(c.v(), "ptr"))
    q = c.load(p, 0, 8)
    c.ret(c.op("add", c.load(t, 0, 8), c.load(q, 0, 8)))
    d = FB("addr")
    d.ret(d(ir.AddrOf(d.v(), "table", 8)))
    oc = build([b, c, d], data)
    bump = texts(function(oc, "bump"))
    assert sum("[rip]" in x for x in bump) == 2 and not any(x.startswith("lea") for x in bump[2:]), bump
    m = Machine(oc.functions, data)
    assert m.call("bump") == 42 and m.call("bump") == 43
    assert m.read_u64(m.symbols["counter"]) == 43
    assert m.call("second") == 0x4444
    assert m.call("addr") == m.symbols["table"] + 8
    assert all(r.kind == obj.PC32 for r in function(oc, "second").relocs)


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_stack_slots(regs):
    b = FB("f", 1)
    f = b.f
    arr = f.new_slot(64, 8)
    small = f.new_slot(2, 2)
    wide = f.new_slot(16, 16)
    for i in range(8):                               # arr[i] = p0 * i, through a fused slot address
        s = b(ir.SlotAddr(b.v(), arr, 8 * i))
        b.store(s, 0, b.op("mul", b.p[0], i), 8)
    b.store(b(ir.SlotAddr(b.v(), small)), 0, 0xBEEF, 2)
    w = b(ir.SlotAddr(b.v(), wide))                 # an address that escapes into a register
    b.store(w, 8, 5, 8)
    base = b(ir.SlotAddr(b.v(), arr))
    acc = b.copy(0)
    for i in range(8):
        b(ir.BinOp("add", acc, acc, b.load(base, 8 * i, 8)))
    b(ir.BinOp("add", acc, acc, b.load(b(ir.SlotAddr(b.v(), small)), 0, 2)))
    b(ir.BinOp("add", acc, acc, b.load(w, 8, 8)))
    b(ir.BinOp("add", acc, acc, b.op("and", w, 15)))   # 16-byte aligned slot
    b.ret(acc)
    m = machine([b], registers=REGISTER_SETS[regs])
    assert m.call("f", 3) == 3 * 28 + 0xBEEF + 5


# -- calls, recursion, register pressure ---------------------------------------------------

def fib_function() -> FB:
    b = FB("fib", 1)
    n = b.p[0]
    b.branch(b.cmp("ult", n, 2), "base", "rec")
    b.block("base")
    b.ret(n)
    b.block("rec")
    r1 = b.call("fib", b.op("sub", n, 1))
    r2 = b.call("fib", b.op("sub", n, 2))
    b.ret(b.op("add", r1, r2))
    return b


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_recursion_fib(regs):
    m = machine([fib_function()], registers=REGISTER_SETS[regs])
    assert [m.call("fib", n) for n in range(12)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89]
    assert m.call("fib", 20) == 6765
    assert not m.misaligned


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_six_arguments_in_every_order(regs):
    callee = FB("weigh", 6)                 # sum of arg_i * (i+1) ... with distinct weights
    acc = callee.copy(0)
    for i, p in enumerate(callee.p):
        callee(ir.BinOp("add", acc, acc, callee.op("mul", p, 10 ** i)))
    callee.ret(acc)
    caller = FB("rotate", 6)                # calls weigh with rotated, repeated and constant args
    r1 = caller.call("weigh", *caller.p[1:], caller.p[0])
    r2 = caller.call("weigh", caller.p[5], caller.p[4], caller.p[3], caller.p[2], caller.p[1], caller.p[0])
    r3 = caller.call("weigh", caller.p[0], caller.p[0], 7, caller.p[3], 0x123456789, caller.p[2])
    caller.ret(caller.op("add", caller.op("add", r1, r2), r3))
    m = machine([callee, caller], registers=REGISTER_SETS[regs])

    def weigh(*a):
        return sum(v * 10 ** i for i, v in enumerate(a))
    args = (1, 2, 3, 4, 5, 6)
    want = weigh(2, 3, 4, 5, 6, 1) + weigh(6, 5, 4, 3, 2, 1) + weigh(1, 1, 7, 4, 0x123456789, 3)
    assert m.call("rotate", *args) == want % M64
    assert not m.misaligned


def test_indirect_call():
    callee = FB("twice", 1)
    callee.ret(callee.op("add", callee.p[0], callee.p[0]))
    b = FB("f", 1)
    fp = b(ir.AddrOf(b.v(), "twice"))
    r = b(ir.CallIndirect(b.v(), fp, [b.p[0]]))
    b.ret(b(ir.CallIndirect(b.v(), fp, [r])))
    m = machine([callee, b])
    assert m.call("f", 5) == 20


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_values_live_across_calls(regs):
    leaf = FB("clobber", 1)              # a callee that dirties every caller-saved register
    vs = [leaf.op("mul", leaf.p[0], k + 3) for k in range(12)]
    acc = leaf.copy(0)
    for v in vs:
        leaf(ir.BinOp("xor", acc, acc, v))
    leaf.ret(acc)
    b = FB("f", 1)
    live = [b.op("add", b.p[0], k) for k in range(10)]
    r = b.call("clobber", b.p[0])
    acc = b.copy(r)
    for k, v in enumerate(live):
        b(ir.BinOp("add", acc, acc, b.op("mul", v, k + 1)))
    b.ret(acc)
    m = machine([leaf, b], registers=REGISTER_SETS[regs])
    x = 1000
    cl = 0
    for k in range(12):
        cl ^= x * (k + 3)
    assert m.call("f", x) == (cl + sum((x + k) * (k + 1) for k in range(10))) % M64


def pressure_function(n: int = 30) -> FB:
    """n values live at once, combined at the end."""
    b = FB("pressure", 2)
    vs = [b.op("mul", b.op("add", b.p[0], k), b.op("add", b.p[1], 2 * k + 1)) for k in range(n)]
    acc = b.copy(0)
    for k, v in enumerate(vs):
        b(ir.BinOp("xor" if k % 2 else "add", acc, acc, v))
    b.ret(acc)
    return b


def pressure_ref(a: int, c: int, n: int = 30) -> int:
    acc = 0
    for k in range(n):
        v = (a + k) * (c + 2 * k + 1) % M64
        acc = (acc ^ v) if k % 2 else (acc + v) % M64
    return acc


def test_register_pressure_spills_only_what_it_must():
    fn = pressure_function(30)
    gen = FunctionGen(fn.f)
    fc = gen.run()
    assert 0 < gen.alloc.spill_slots < 30 - 12 + 4      # spills, but keeps 12 in registers
    assert sum(isinstance(h, int) for h in gen.alloc.home.values()) >= 30 - 12
    m = Machine([fc])
    for a, c in ((1, 2), (M64 - 1, 0x123456789), (0x7FFFFFFF, 1 << 63)):
        assert m.call("pressure", a, c) == pressure_ref(a, c)
    small = FB("small", 2)
    small.ret(small.op("add", small.op("mul", small.p[0], small.p[1]), 1))
    g = FunctionGen(small.f)
    g.run()
    assert g.alloc.spill_slots == 0


def test_pressure_in_a_loop_across_calls():
    b = FB("loop", 1)                           # 16 accumulators updated in a loop around calls
    accs = [b.copy(k) for k in range(16)]
    i = b.copy(0)
    b.jump("head")
    b.block("head")
    b.branch(b.cmp("ult", i, b.p[0]), "body", "done")
    b.block("body")
    r = b.call("clobber", i)
    for k, a in enumerate(accs):
        b(ir.BinOp("add", a, a, b.op("add", r, k)))
    b(ir.BinOp("add", i, i, 1))
    b.jump("head")
    b.block("done")
    tot = b.copy(0)
    for k, a in enumerate(accs):
        b(ir.BinOp("add", tot, tot, b.op("mul", a, k + 1)))
    b.ret(tot)
    leaf = FB("clobber", 1)
    leaf.ret(leaf.op("mul", leaf.p[0], 3))
    m = machine([b, leaf])
    n = 5
    accs_ref = [k + sum(3 * i + k for i in range(n)) for k in range(16)]
    assert m.call("loop", n) == sum(a * (k + 1) for k, a in enumerate(accs_ref))
    assert not m.misaligned


def test_leaf_function_saves_no_registers():
    b = FB("leaf", 2)
    b.ret(b.op("sub", b.p[0], b.p[1]))
    t = texts(function(build([b]), "leaf"))
    assert [x for x in t if x.startswith("push")] == ["push rbp"]
    fc = function(build([fib_function()]), "fib")
    pushes = [x for x in texts(fc) if x.startswith("push")]
    assert pushes[0] == "push rbp" and 1 <= len(pushes) - 1 <= 2
    assert all(x.split()[1] in ("rbp", "rbx", "r12", "r13", "r14", "r15") for x in pushes)


# -- machine operations -----------------------------------------------------------------------

MOP_ARGS = {"outb": (0x3F8, 0x41), "outw": (0x3F8, 0x4142), "outl": (0x3F8, 0x41424344),
            "inb": (0x60,), "inw": (0x60,), "inl": (0x60,),
            "write_cr0": (0x80000011,), "write_cr3": (0x1000,), "write_cr4": (0x20,),
            "invlpg": (0x400000,), "set_pte": (RAM, 0x1003), "lgdt": (RAM,), "lidt": (RAM,),
            "sgdt": (RAM,), "sidt": (RAM,), "rdmsr": (0xC0000080,), "wrmsr": (0xC0000080, 0x500),
            "cpuid": (0, RAM), "restore_flags": (0x202,), "swtch": (RAM, RAM + 64)}
NATIVE_TEXT = {"cli": ["cli"], "sti": ["sti"], "hlt": ["hlt"], "wbinvd": ["wbinvd"],
               "save_flags": ["pushfq", "pop"], "restore_flags": ["push", "popfq"],
               "outb": ["out dx, al"], "outw": ["out dx, ax"], "outl": ["out dx, eax"],
               "inb": ["in al, dx"], "inw": ["in ax, dx"], "inl": ["in eax, dx"],
               "read_cr0": ["mov r, cr0"], "read_cr2": ["mov r, cr2"], "read_cr3": ["mov r, cr3"],
               "read_cr4": ["mov r, cr4"], "write_cr0": ["mov cr0, r"], "write_cr3": ["mov cr3, r"],
               "write_cr4": ["mov cr4, r"], "invlpg": ["invlpg byte ptr [r]"],
               "set_pte": ["mov qword ptr [r], r"], "lgdt": ["lgdt [r]"], "lidt": ["lidt [r]"],
               "sgdt": ["sgdt [r]"], "sidt": ["sidt [r]"], "rdmsr": ["rdmsr"], "wrmsr": ["wrmsr"],
               "cpuid": ["cpuid"], "rdtsc": ["rdtsc"]}


def shape(text: str) -> str:
    """Instruction text with general register names replaced by 'r'."""
    t = re.sub(r"\br(ax|bx|cx|dx|si|di|bp|sp|\d+)\b", "r", text)
    return "pop" if t.startswith("pop ") else "push" if t.startswith("push ") else t


def mop_function(op: str, args=None, name=None) -> FB:
    intr = INTRINSICS[op]
    b = FB(name or "m_" + op, len(intr.params))
    res = b.mop(op, *(b.p if args is None else args), result=intr.result is not None)
    b.ret(res if res is not None else 0)
    return b


@pytest.mark.parametrize("op", sorted(INTRINSICS))
def test_machine_op_native_instruction_and_site(op):
    for args in (None, MOP_ARGS.get(op, ())):             # operands in registers, then immediates
        oc = build([mop_function(op, args)])
        fc = function(oc, "m_" + op)
        insns = disasm(fc)
        if op in ("pause", "swtch"):
            assert fc.sites == []
            want = ["pause"] if op == "pause" else ["call"]
            assert any(t.split()[0] == want[0] for _, _, t in insns)
            continue
        (site,) = fc.sites
        assert site.op == op and site.loc == LOC and site.becomes == ""
        covered = [shape(t) for off, size, t in insns if site.offset <= off < site.offset + site.length]
        assert covered == NATIVE_TEXT[op], (op, covered)
        ends = {off + size for off, size, _ in insns}
        assert site.offset + site.length in ends


def test_every_intrinsic_has_an_expected_native_form():
    assert set(NATIVE_TEXT) | {"pause", "swtch"} == set(INTRINSICS)


def test_machine_ops_run_on_unicorn():
    fns = [mop_function(op) for op in ("outb", "outw", "outl", "inb", "inw", "inl", "save_flags",
                                       "restore_flags", "cpuid", "set_pte", "read_cr3", "write_cr3",
                                       "sgdt", "rdtsc", "cli", "sti")]
    for regs in REGISTER_SETS.values():
        m = machine(fns, registers=regs)
        m.call("m_outb", 0x3F8, 0x1241)
        m.call("m_outw", 0x3F9, 0x12345)
        m.call("m_outl", 0xCF8, 0x1_8000_0000)
        assert m.outs == [(0x3F8, 1, 0x41), (0x3F9, 2, 0x2345), (0xCF8, 4, 0x80000000)]
        m.in_value = 0xFFFFFFFF
        assert [m.call("m_in" + s, 0x60) for s in "bwl"] == [0xFF, 0xFFFF, 0xFFFFFFFF]
        m.call("m_cli")
        assert m.call("m_save_flags") & 0x200 == 0
        m.call("m_sti")
        assert m.call("m_save_flags") & 0x200
        m.call("m_restore_flags", 0x2)
        assert m.call("m_save_flags") & 0x200 == 0
        m.write(RAM, b"\xcc" * 20)
        m.call("m_cpuid", 0, RAM)
        words = struct.unpack("<IIIII", m.read(RAM, 20))
        assert words[0] >= 1 and words[4] == 0xCCCCCCCC
        assert struct.pack("<III", words[1], words[3], words[2]) in (b"GenuineIntel", b"AuthenticAMD")
        m.call("m_set_pte", RAM + 8, 0x1234_5678_9ABC_D003)
        assert m.read_u64(RAM + 8) == 0x1234_5678_9ABC_D003
        cr3 = m.call("m_read_cr3")
        m.call("m_write_cr3", cr3)
        assert m.call("m_read_cr3") == cr3
        m.call("m_sgdt", RAM + 32)
        limit, base = struct.unpack("<HQ", m.read(RAM + 32, 10))
        assert (limit, base) == (23, GDT)
        assert m.call("m_rdtsc") > 0


def test_rdmsr_and_wrmsr_use_ecx_and_edx_eax():
    fc = function(build([mop_function("wrmsr", name="w"), mop_function("rdmsr", name="r")]), "w")
    t = texts(fc)
    k = t.index("wrmsr")
    assert "shr rdx, 0x20" in t[:k] and "mov rdx, rax" in t[:k]
    fc = function(build([mop_function("rdmsr", name="r")]), "r")
    t = texts(fc)
    k = t.index("rdmsr")
    assert t[k + 1:k + 3] == ["shl rdx, 0x20", "or rax, rdx"]
    assert any(x.startswith("mov rcx") for x in t[:k])


def test_cpuid_preserves_rbx_and_the_out_pointer_across_pressure():
    b = FB("f", 2)
    live = [b.op("add", b.p[0], k) for k in range(8)]
    b.mop("cpuid", 1, b.p[1], result=False)
    acc = b.copy(0)
    for v in live:
        b(ir.BinOp("add", acc, acc, v))
    b.ret(acc)
    m = machine([b])
    assert m.call("f", 100, RAM + 0x40) == sum(100 + k for k in range(8))     # call() checks rbx
    assert struct.unpack("<I", m.read(RAM + 0x40, 4))[0] != 0


def test_swtch_between_two_stacks():
    data = [ir.Data("main_sp", "bss", 8, 8), ir.Data("task_sp", "bss", 8, 8), ir.Data("count", "bss", 8, 8)]
    task = FB("task")                            # forever: count += 1; swtch(&task_sp, main_sp)
    task.jump("loop")
    task.block("loop")
    cnt = task(ir.AddrOf(task.v(), "count"))
    task.store(cnt, 0, task.op("add", task.load(cnt, 0, 8), 1), 8)
    main_sp = task.load(task(ir.AddrOf(task.v(), "main_sp")), 0, 8)
    task.mop("swtch", task(ir.AddrOf(task.v(), "task_sp")), main_sp, result=False)
    task.jump("loop")
    b = FB("run", 2)                             # (new task stack, rounds) -> count
    keep = b.op("mul", b.p[1], 1000)             # callee-saved values survive the switches
    i = b.copy(0)
    sp = b.copy(b.p[0])
    b.jump("head")
    b.block("head")
    b.branch(b.cmp("ult", i, b.p[1]), "body", "done")
    b.block("body")
    b.mop("swtch", b(ir.AddrOf(b.v(), "main_sp")), sp, result=False)
    b(ir.Load(sp, b(ir.AddrOf(b.v(), "task_sp")), 0, 8))
    b(ir.BinOp("add", i, i, 1))
    b.jump("head")
    b.block("done")
    b.ret(b.op("add", keep, b.load(b(ir.AddrOf(b.v(), "count")), 0, 8)))
    oc = build([task, b], data)
    assert oc.functions[-1].name == codegen.SWTCH
    m = Machine(oc.functions, data)
    top = RAM + 0x1000                            # 6 zero qwords, then the entry address
    m.write(top, bytes(48) + struct.pack("<Q", m.symbols["task"]))
    assert m.call("run", top, 5) == 5000 + 5
    assert not m.misaligned
    assert "swtch" not in [f.name for f in build([fib_function()]).functions]


# -- hypercalls, sites, interrupt functions -----------------------------------------------------

def test_hypercall_relocation_and_arguments():
    b = FB("f", 2)
    r = b(ir.Hypercall(b.v(), abi.HC_SET_PTE, [b.p[1], b.p[0]]))
    b(ir.Hypercall(None, abi.HC_IO_OUT, [0x3F8, 1, b.p[0], 4, 5]))
    b.ret(b.op("add", r, 1))
    fc = function(build([b]), "f")
    calls = [r for r in fc.relocs if r.symbol == "__hypercall_page"]
    assert [(r.kind, r.addend) for r in calls] == [
        (obj.PC32, abi.HC_SET_PTE * abi.HYPERCALL_STRIDE - 4), (obj.PC32, abi.HC_IO_OUT * 32 - 4)]
    assert all(fc.code[r.offset - 1] == 0xE8 for r in calls)
    m = Machine([fc])
    m.hypercall_result = 41
    assert m.call("f", 0xAAAA, 0xBBBB) == 42
    assert [(h.nr, h.args[:2]) for h in m.hypercalls] == [(abi.HC_SET_PTE, (0xBBBB, 0xAAAA)),
                                                           (abi.HC_IO_OUT, (0x3F8, 1))]
    assert m.hypercalls[1].args == (0x3F8, 1, 0xAAAA, 4, 5)
    assert not m.misaligned


def test_site_markers_cover_the_code_between_them_across_blocks():
    b = FB("f", 1)
    b(ir.SiteBegin(1, "cli", "shared-page store", loc=ir.Loc("t.pvk", 7, 3)))
    b.store(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, 0, 1, 1)
    b(ir.SiteEnd(1))
    b(ir.SiteBegin(2, "save_flags", "shared-page load", loc=ir.Loc("t.pvk", 8, 3)))
    x = b.load(abi.SHARED_PAGE, abi.SH_UPCALL_MASK, 1)
    b.branch(b.cmp("eq", x, 0), "a", "c")
    b.block("a")
    b(ir.BinOp("or", x, x, 0x200))
    b.jump("c")
    b.block("c")
    b(ir.SiteEnd(2))
    b.ret(x)
    fc = function(build([b]), "f")
    s1, s2 = fc.sites
    assert (s1.op, s1.becomes, s1.loc.line) == ("cli", "shared-page store", 7)
    assert disasm_range(fc, s1) == ["mov byte ptr [0x2000], 1"]
    assert s2.op == "save_flags" and s2.offset == s1.offset + s1.length
    covered = disasm_range(fc, s2)
    assert covered[0].startswith("movzx") and any(t.startswith("or") for t in covered)


def disasm_range(fc, site):
    return [t for off, _, t in disasm(fc) if site.offset <= off < site.offset + site.length]


def test_unbalanced_site_markers_are_errors():
    b = FB("f")
    b(ir.SiteBegin(1, "cli", "x"))
    b.ret(0)
    with pytest.raises(CodegenError, match="SiteBegin"):
        build([b])
    b = FB("g")
    b(ir.SiteEnd(3))
    b.ret(0)
    with pytest.raises(CodegenError, match="SiteEnd"):
        build([b])


def interrupt_handler(calls: bool, hypercall: int | None = None) -> FB:
    b = FB("isr", interrupt=True)
    cnt = b(ir.AddrOf(b.v(), "ticks"))
    vs = [b.op("mul", b.load(cnt, 0, 8), k + 2) for k in range(14)]     # touches many registers
    acc = b.copy(0)
    for v in vs:
        b(ir.BinOp("add", acc, acc, v))
    if calls:
        acc = b.call("helper", acc)
    b(ir.BinOp("udiv", acc, acc, 3))
    b(ir.BinOp("shl", acc, acc, b.op("and", acc, 1)))
    b.store(b(ir.AddrOf(b.v(), "ticks")), 0, acc, 8)
    b.cur.term = ir.IRet(hypercall)
    return b


@pytest.mark.parametrize("calls", [False, True])
def test_interrupt_function_preserves_every_register(calls):
    helper = FB("helper", 1)
    hv = [helper.op("xor", helper.p[0], k) for k in range(10)]           # dirties caller-saved regs
    acc = helper.copy(0)
    for v in hv:
        helper(ir.BinOp("add", acc, acc, v))
    helper.ret(acc)
    data = [ir.Data("ticks", "data", 8, 8, struct.pack("<Q", 1))]
    oc = build([interrupt_handler(calls), helper], data)
    fc = function(oc, "isr")
    t = texts(fc)
    assert t[-1] == "iretq" and not any(x == "ret" for x in t)
    (site,) = fc.sites
    assert site.op == "iret" and disasm_range(fc, site) == ["iretq"]
    m = Machine(oc.functions, data)
    before = m.interrupt("isr")
    for r, v in before.items():
        assert m.reg(r) == v, f"{r} not preserved"
    t1 = m.read_u64(m.symbols["ticks"])
    assert t1 != 1
    assert not m.misaligned


def test_interrupt_return_through_a_hypercall():
    data = [ir.Data("ticks", "data", 8, 8)]
    fc = function(build([interrupt_handler(False, abi.HC_IRET)], data), "isr")
    t = texts(fc)
    assert "iretq" not in t and t[-1].startswith("jmp")
    (r,) = [r for r in fc.relocs if r.symbol == "__hypercall_page"]
    assert (r.kind, r.addend, r.offset) == (obj.PC32, abi.HC_IRET * 32 - 4, len(fc.code) - 4)
    assert fc.code[r.offset - 1] == 0xE9
    (site,) = fc.sites
    assert site.op == "iret" and site.becomes == "hypercall iret" and site.length == 5
    pops = [x for x in t if x.startswith("pop")]
    pushes = [x for x in t if x.startswith("push")]
    assert [p.split()[1] for p in pops] == [p.split()[1] for p in reversed(pushes)]


# -- line rows, errors -----------------------------------------------------------------------------

def test_line_rows_follow_source_lines():
    b = FB("f", 1)
    locs = [ir.Loc("t.pvk", n, 5) for n in (3, 3, 4, 4, 6, 3)]
    x = b.p[0]
    for loc in locs:
        x = b(ir.BinOp("add", b.v(), x, 1, loc=loc))
    b.cur.term = ir.Ret(x, loc=ir.Loc("t.pvk", 7, 1))
    fc = function(build([b]), "f")
    assert fc.loc == LOC
    assert [row.loc.line for row in fc.lines] == [1, 3, 4, 6, 3, 7]
    offsets = [row.offset for row in fc.lines]
    assert offsets[0] == 0 and offsets == sorted(set(offsets)) and offsets[-1] < len(fc.code)


def test_object_code_passes_module_data_through():
    data = [ir.Data("x", "bss", 8, 8)]
    m = ir.Module([fib_function().f], data, files=["a.pvk", "lib/b.pvk"], target="pv")
    oc = codegen.generate(m)
    assert oc.data is data and oc.files == ["a.pvk", "lib/b.pvk"] and oc.target == "pv"
    assert [f.name for f in oc.functions] == ["fib"] and all(f.align == 16 for f in oc.functions)


def bad_functions():
    b = FB("seven", 7)
    b.ret(0)
    yield b, "parameters"
    b = FB("callseven", 0)
    b.call("x", 1, 2, 3, 4, 5, 6, 7)
    b.ret(0)
    yield b, "arguments"
    b = FB("iret_in_fn")
    b.cur.term = ir.IRet()
    yield b, "IRet"
    b = FB("ret_in_isr", interrupt=True)
    b.ret()
    yield b, "IRet"
    b = FB("noterm")
    yield b, "terminator"
    b = FB("badjump")
    b.jump("nowhere")
    yield b, "nowhere"
    b = FB("bigalign")
    b.f.new_slot(64, 4096)
    b.ret(0)
    yield b, "alignment"
    b = FB("badop")
    b.mop("frobnicate", result=False)
    b.ret(0)
    yield b, "frobnicate"
    b = FB("badcmp", 1)
    b.ret(b.cmp("less", b.p[0], 1))
    yield b, "less"
    b = FB("badsize", 1)
    b.ret(b.load(b.p[0], 0, 3))
    yield b, "3 bytes"
    b = FB("dup")
    b.jump("entry")
    b.block("entry")
    b.ret(0)
    yield b, "entry"


@pytest.mark.parametrize("fn,message", list(bad_functions()), ids=lambda x: getattr(getattr(x, "f", None), "name", ""))
def test_bad_input_is_a_one_line_codegen_error(fn, message):
    with pytest.raises(CodegenError) as e:
        build([fn])
    assert message in str(e.value) and fn.f.name in str(e.value)
    assert "\n" not in e.value.message


def test_clobber_table_matches_the_intrinsics():
    assert set(isel.MACHINE_CLOBBERS) <= set(INTRINSICS)


def test_harness_detects_a_broken_callee():
    """The harness itself: a function that trashes rbx must be caught."""
    from pvtool.x86.encode import Asm, RBX
    a = Asm()
    a.mov(RBX, 1)
    a.ret()
    m = Machine([obj.FunctionCode("bad", a.finish())])
    with pytest.raises(HarnessError, match="rbx"):
        m.call("bad")
    assert HYPERCALL_PAGE == m.symbols["__hypercall_page"]


# -- the conformance kernels, through the real front end ------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE = SHARED / "conformance"
needs_shared = pytest.mark.skipif(not CONFORMANCE.is_dir(), reason=f"{CONFORMANCE} is absent")
RUNNABLE = ("hello.pvk", "irqflags.pvk", "lang.pvk")     # need no paging, MSRs or long loops


def fake_hypervisor(m: Machine, nr: int, args: tuple[int, ...]) -> int:
    """Just enough of the PV ABI for console output: console_write, io_in/io_out, multicall."""
    if nr == abi.HC_CONSOLE_WRITE:
        m.console += m.read(args[0], args[1])
        return args[1]
    if nr == abi.HC_IO_OUT and args[0] == 0x3F8:
        m.console += bytes([args[2] & 0xFF])
    if nr == abi.HC_IO_IN:
        return 0x20                                       # line status: transmitter ready
    if nr == abi.HC_MULTICALL:
        count = struct.unpack("<I", m.read(abi.SHARED_PAGE + abi.SH_MC_COUNT, 4))[0]
        for k in range(count):
            entry = abi.SHARED_PAGE + abi.SH_MC_ENTRIES + k * abi.MC_ENTRY_SIZE
            enr, a0, a1, a2 = struct.unpack("<QQQQ", m.read(entry, 32))
            m.write(entry + 32, struct.pack("<Q", fake_hypervisor(m, enr, (a0, a1, a2, 0, 0)) % M64))
        m.write(abi.SHARED_PAGE + abi.SH_MC_COUNT, bytes(4))
        return count
    return 0


@needs_shared
@pytest.mark.parametrize("target", ["native", "pv"])
def test_conformance_kernels_compile(target):
    from pvtool import driver
    for path in sorted(CONFORMANCE.glob("*.pvk")):
        module = driver.compile_ir(str(path), target)
        oc = codegen.generate(module)
        assert oc.target == target
        for fc, fn in zip(oc.functions, module.functions):
            native_ops = [i for i in fn.instructions() if isinstance(i, ir.MachineOp) and i.op not in ("pause", "swtch")]
            markers = [i for i in fn.instructions() if isinstance(i, (ir.SiteBegin, ir.IRet))]
            assert len(fc.sites) == len(native_ops) + len(markers), (path.name, fn.name)
            assert all(0 <= s.offset < s.offset + s.length <= len(fc.code) for s in fc.sites)


@needs_shared
@pytest.mark.parametrize("target", ["native", "pv"])
@pytest.mark.parametrize("name", RUNNABLE)
def test_conformance_kernel_runs_on_unicorn(name, target):
    from pvtool import driver
    path = CONFORMANCE / name
    want = expectation(path)
    oc = codegen.generate(driver.compile_ir(str(path), target))
    m = Machine(oc.functions, oc.data, on_hypercall=fake_hypervisor)
    m.in_value = 0x20
    status = m.call("kmain", limit=5_000_000)
    console = m.console + bytes(v for port, _, v in m.outs if port == 0x3F8 and v is not None)
    assert console.decode() == want.output
    assert status == want.status
    assert not m.misaligned


# -- random programs against an IR evaluator ------------------------------------------------------

def evaluate(fns: dict[str, ir.Function], name: str, args: list[int], slots=None) -> int:
    """A direct IR evaluator for what random_program() generates."""
    fn = fns[name]
    env = dict(zip(fn.params, args))
    mem: dict[tuple[int, int], int] = {}          # (slot, byte offset) -> byte

    def val(o):
        return o % M64 if isinstance(o, int) else env.get(o, 0)
    block = fn.blocks[0]
    while True:
        for i in block.instrs:
            if isinstance(i, ir.Copy):
                env[i.dst] = val(i.src)
            elif isinstance(i, ir.BinOp):
                env[i.dst] = REF[i.op](val(i.a), val(i.b)) % M64
            elif isinstance(i, ir.UnOp):
                env[i.dst] = (-val(i.a) if i.op == "neg" else ~val(i.a)) % M64
            elif isinstance(i, ir.Ext):
                low = val(i.src) % (1 << i.bits)
                env[i.dst] = (low - (1 << i.bits) if i.signed and low >> (i.bits - 1) else low) % M64
            elif isinstance(i, ir.Cmp):
                env[i.dst] = int(CMP_REF[i.op](val(i.a), val(i.b)))
            elif isinstance(i, ir.Call):
                env[i.dst] = evaluate(fns, i.func, [val(a) for a in i.args])
            elif isinstance(i, ir.Store):                  # base is a SlotAddr vreg: (slot, 0)
                for k in range(i.size):
                    mem[(env[i.base], i.offset + k)] = val(i.value) >> (8 * k) & 0xFF
            elif isinstance(i, ir.Load):
                raw = sum(mem.get((env[i.base], i.offset + k), 0) << (8 * k) for k in range(i.size))
                if i.signed and raw >> (8 * i.size - 1):
                    raw -= 1 << (8 * i.size)
                env[i.dst] = raw % M64
            elif isinstance(i, ir.SlotAddr):
                env[i.dst] = i.slot                         # addresses are only used as bases
            else:
                raise AssertionError(i)
        t = block.term
        if isinstance(t, ir.Ret):
            return val(t.value)
        target = t.target if isinstance(t, ir.Jump) else (t.then if val(t.cond) else t.else_)
        block = fn.block(target)


def random_program(data, nparams: int) -> FB:
    from hypothesis import strategies as st
    b = FB("rand", nparams)
    nvars = data.draw(st.integers(1, 24), label="vars")
    imms = st.sampled_from(VALUES + IMMEDIATES)
    vars_ = list(b.p) + [b.copy(data.draw(imms)) for _ in range(nvars)]
    slot = b.f.new_slot(8, 8)
    labels = iter(range(10 ** 6))

    def operand():
        return data.draw(st.sampled_from(vars_)) if data.draw(st.booleans()) or not vars_ else data.draw(imms)

    def statements(depth: int, n: int) -> None:
        for _ in range(n):
            kind = data.draw(st.sampled_from(["bin", "bin", "bin", "un", "ext", "cmp", "call", "mem"]
                                             + (["if", "loop"] if depth < 2 else [])))
            dst = data.draw(st.sampled_from(vars_))
            if kind == "bin":
                op = data.draw(st.sampled_from(ir.BINOPS))
                a, c = operand(), operand()
                if op in isel.DIVISIONS:               # divisor in 1..0x7fff: never faults
                    c = b.op("or", b.op("and", c, 0x7FFF), 1)
                b(ir.BinOp(op, dst, a, c))
            elif kind == "un":
                b(ir.UnOp(data.draw(st.sampled_from(ir.UNOPS)), dst, operand()))
            elif kind == "ext":
                b(ir.Ext(dst, operand(), data.draw(st.sampled_from((8, 16, 32))), data.draw(st.booleans())))
            elif kind == "cmp":
                b(ir.Cmp(data.draw(st.sampled_from(ir.CMPOPS)), dst, operand(), operand()))
            elif kind == "call":
                args = [operand() for _ in range(data.draw(st.integers(0, 6)))]
                b(ir.Call(dst, "mix", args + [0] * (6 - len(args))))
            elif kind == "mem":
                size = data.draw(st.sampled_from((1, 2, 4, 8)))
                b.store(b(ir.SlotAddr(b.v(), slot)), 0, operand(), size)
                b(ir.Load(dst, b(ir.SlotAddr(b.v(), slot)), 0, size, data.draw(st.booleans())))
            elif kind == "if":
                k = next(labels)
                b.branch(b.cmp(data.draw(st.sampled_from(ir.CMPOPS)), operand(), operand()), f"t{k}", f"e{k}")
                b.block(f"t{k}")
                statements(depth + 1, data.draw(st.integers(0, 3)))
                b.jump(f"j{k}")
                b.block(f"e{k}")
                statements(depth + 1, data.draw(st.integers(0, 3)))
                b.jump(f"j{k}")
                b.block(f"j{k}")
            else:
                k = next(labels)
                i = b.copy(0)
                b.jump(f"h{k}")
                b.block(f"h{k}")
                b.branch(b.cmp("ult", i, data.draw(st.integers(0, 4))), f"b{k}", f"x{k}")
                b.block(f"b{k}")
                statements(depth + 1, data.draw(st.integers(1, 4)))
                b(ir.BinOp("add", i, i, 1))
                b.jump(f"h{k}")
                b.block(f"x{k}")

    statements(0, data.draw(st.integers(1, 12)))
    acc = b.copy(0)
    for k, v in enumerate(vars_):
        b(ir.BinOp("add", acc, acc, b.op("mul", v, 2 * k + 1)))
    b.ret(acc)
    return b


def mix_function() -> FB:
    b = FB("mix", 6)
    acc = b.copy(0x9E3779B97F4A7C15)
    for p in b.p:
        b(ir.BinOp("xor", acc, acc, p))
        b(ir.BinOp("mul", acc, acc, 0x100000001B3))
    b.ret(acc)
    return b


def test_random_programs_match_the_ir_evaluator():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data(), st.integers(0, 6), st.sampled_from(sorted(REGISTER_SETS)))
    def check(data, nparams, regs):
        prog, mix = random_program(data, nparams), mix_function()
        args = [data.draw(st.sampled_from(VALUES)) for _ in range(nparams)]
        want = evaluate({"rand": prog.f, "mix": mix.f}, "rand", args)
        m = machine([prog, mix], registers=REGISTER_SETS[regs])
        assert m.call("rand", *args) == want
        assert not m.misaligned
    check()
