"""Code generation of calls: recursion, argument shuffles, indirect calls, values
live across calls, callee-saved registers, and `swtch` between two stacks."""
from __future__ import annotations

import struct

import pytest

from codegen_support import (FB, LAYOUTS, M64, REGISTER_SETS, build, fib_function, function, machine, texts)
from pvtool import ir
from pvtool.x86 import codegen
from unicorn_harness import RAM, Machine


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_recursion_fib(regs, layout):
    m = machine([fib_function()], registers=REGISTER_SETS[regs], bundled=LAYOUTS[layout])
    assert [m.call("fib", n) for n in range(12)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89]
    assert m.call("fib", 20) == 6765
    assert not m.misaligned


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_six_arguments_in_every_order(regs, layout):
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
    m = machine([callee, caller], registers=REGISTER_SETS[regs], bundled=LAYOUTS[layout])

    def weigh(*a):
        return sum(v * 10 ** i for i, v in enumerate(a))
    args = (1, 2, 3, 4, 5, 6)
    want = weigh(2, 3, 4, 5, 6, 1) + weigh(6, 5, 4, 3, 2, 1) + weigh(1, 1, 7, 4, 0x123456789, 3)
    assert m.call("rotate", *args) == want % M64
    assert not m.misaligned


@pytest.mark.parametrize("layout", LAYOUTS)
def test_indirect_call(layout):
    callee = FB("twice", 1)
    callee.ret(callee.op("add", callee.p[0], callee.p[0]))
    b = FB("f", 1)
    fp = b(ir.AddrOf(b.v(), "twice"))
    r = b(ir.CallIndirect(b.v(), fp, [b.p[0]]))
    b.ret(b(ir.CallIndirect(b.v(), fp, [r])))
    m = machine([callee, b], bundled=LAYOUTS[layout])
    assert m.call("f", 5) == 20


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_values_live_across_calls(regs, layout):
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
    m = machine([leaf, b], registers=REGISTER_SETS[regs], bundled=LAYOUTS[layout])
    x = 1000
    cl = 0
    for k in range(12):
        cl ^= x * (k + 3)
    assert m.call("f", x) == (cl + sum((x + k) * (k + 1) for k in range(10))) % M64


def test_leaf_function_saves_no_registers():
    b = FB("leaf", 2)
    b.ret(b.op("sub", b.p[0], b.p[1]))
    t = texts(function(build([b]), "leaf"))
    assert [x for x in t if x.startswith("push")] == ["push rbp"]
    fc = function(build([fib_function()]), "fib")
    pushes = [x for x in texts(fc) if x.startswith("push")]
    assert pushes[0] == "push rbp" and 1 <= len(pushes) - 1 <= 2
    assert all(x.split()[1] in ("rbp", "rbx", "r12", "r13", "r14", "r15") for x in pushes)



@pytest.mark.parametrize("layout", LAYOUTS)
def test_swtch_between_two_stacks(layout):
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
    oc = build([task, b], data, bundled=LAYOUTS[layout])
    assert oc.functions[-1].name == codegen.SWTCH
    m = Machine(oc.functions, data)
    top = RAM + 0x1000                            # 6 zero qwords, then the entry address
    m.write(top, bytes(48) + struct.pack("<Q", m.symbols["task"]))
    assert m.call("run", top, 5) == 5000 + 5
    assert not m.misaligned
    assert "swtch" not in [f.name for f in build([fib_function()]).functions]
