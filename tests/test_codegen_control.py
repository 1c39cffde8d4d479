"""Code generation of comparisons and branches: values, fused compare-and-branch, constants."""
from __future__ import annotations

import pytest

from codegen_support import (CMP_REF, FB, IMMEDIATES, LAYOUTS, M64, REGISTER_SETS, VALUES, build, function,
                             machine, texts)
from pvtool import ir
from unicorn_harness import Machine


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_compare_as_value_and_as_branch(regs, layout):
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
    m = machine(fns, registers=REGISTER_SETS[regs], bundled=LAYOUTS[layout])
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


