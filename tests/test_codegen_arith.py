"""Code generation of arithmetic: binary and unary operators, extensions, immediates.

Each operator is checked against Python on boundary values, with operands
in registers, in spill slots and as immediates of every width.
"""
from __future__ import annotations

import pytest
from unicorn import UcError

from codegen_support import (FB, IMMEDIATES, M64, REF, REGISTER_SETS, VALUES, defined, machine)
from pvtool import ir


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

