"""Register pressure: more live values than registers, in straight-line code and in loops around calls."""
from __future__ import annotations

import pytest

from codegen_support import FB, LAYOUTS, M64, machine
from pvtool import ir
from pvtool.x86.codegen import FunctionGen
from unicorn_harness import Machine


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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pressure_in_a_loop_across_calls(layout):
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
    m = machine([b, leaf], bundled=LAYOUTS[layout])
    n = 5
    accs_ref = [k + sum(3 * i + k for i in range(n)) for k in range(16)]
    assert m.call("loop", n) == sum(a * (k + 1) for k, a in enumerate(accs_ref))
    assert not m.misaligned


