"""Shared helpers for the code generator's tests (tests/test_codegen_*.py).

The tests compile hand-built IR, run it on Unicorn (tests/unicorn_harness.py)
and read it back with capstone.  Most behaviour tests compile the same IR
three times: with every register allocatable, with none (every value lives
in a spill slot) and with only rcx and rdx (the registers shifts, division
and port I/O fight over), so both the register and the memory paths of each
emitter are exercised.
"""
from __future__ import annotations

import capstone

import bundle_rules
from pvtool import ir, obj
from pvtool.source import Loc
from pvtool.x86 import codegen, isel
from pvtool.x86.encode import RCX, RDX
from unicorn_harness import Machine

M64 = 1 << 64
REGISTER_SETS = {"all": None, "none": [], "rcx-rdx": [RCX, RDX]}
LAYOUTS = {"plain": False, "bundled": True}     # bundled: the PV code rules
VALUES = (0, 1, 2, 7, 63, 64, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
          0x100000000, (1 << 63) - 1, 1 << 63, M64 - 1, M64 - 2, 0x123456789ABCDEF0)
IMMEDIATES = (1, 5, M64 - 1, 0x7FFFFFFF, 0x80000000, 1 << 63, 0x123456789)
LOC = Loc("t.pvk", 1, 1)
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


def build(fns, data=(), registers=None, bundled=False) -> obj.ObjectCode:
    """Object code for the functions; bundled code is checked against the PV code rules."""
    oc = codegen.generate(ir.Module([f.f if isinstance(f, FB) else f for f in fns], list(data)),
                          registers, bundled)
    for fc in oc.functions if bundled else ():
        findings = bundle_rules.code_findings(fc.code)
        assert not findings, f"{fc.name}: " + "; ".join(findings[:5])
    return oc


def machine(fns, data=(), registers=None, bundled=False) -> Machine:
    return Machine(build(fns, data, registers, bundled).functions, list(data))


def disasm(fc: obj.FunctionCode) -> list[tuple[int, int, str]]:
    return [(i.address, i.size, f"{i.mnemonic} {i.op_str}".strip()) for i in _CS.disasm(fc.code, 0)]


def texts(fc: obj.FunctionCode) -> list[str]:
    return [t for _, _, t in disasm(fc)]


def function(oc: obj.ObjectCode, name: str) -> obj.FunctionCode:
    return next(f for f in oc.functions if f.name == name)



def disasm_range(fc: obj.FunctionCode, site: obj.SiteRow) -> list[str]:
    """The instructions a site row covers."""
    return [t for off, _, t in disasm(fc) if site.offset <= off < site.offset + site.length]


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


def random_program(data, nparams: int) -> FB:
    """A random function of straight-line code, branches, loops, calls and slot
    accesses, drawn with hypothesis `data`; returns a checksum of every variable."""
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
