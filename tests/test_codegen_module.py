"""The code generator's contract: line rows, what passes through to the object
code, one-line errors for IR it cannot compile, and the test harness itself."""
from __future__ import annotations

import pytest

from codegen_support import FB, LOC, build, fib_function, function
from pvtool import ir, obj
from pvtool.diagnostics import CompileError
from pvtool.errors import InternalError
from pvtool.intrinsics import INTRINSICS
from pvtool.source import Loc
from pvtool.x86 import codegen, isel
from pvtool.x86.codegen import CodegenError
from unicorn_harness import HYPERCALL_PAGE, HarnessError, Machine


def test_line_rows_follow_source_lines():
    b = FB("f", 1)
    locs = [Loc("t.pvk", n, 5) for n in (3, 3, 4, 4, 6, 3)]
    x = b.p[0]
    for loc in locs:
        x = b(ir.BinOp("add", b.v(), x, 1, loc=loc))
    b.cur.term = ir.Ret(x, loc=Loc("t.pvk", 7, 1))
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
    assert [f.name for f in oc.functions] == ["fib"]
    assert oc.bundled and all(f.align == 32 for f in oc.functions)      # pv: the code rules
    m.target = "native"
    oc = codegen.generate(m)
    assert not oc.bundled and all(f.align == 16 for f in oc.functions)
    assert codegen.generate(m, bundled=True).bundled


def test_unbalanced_site_markers_are_internal_errors():
    b = FB("f")
    b(ir.SiteBegin(1, "cli", "x"))
    b.ret(0)
    with pytest.raises(InternalError, match="^codegen: f: SiteBegin without SiteEnd$"):
        build([b])
    b = FB("g")
    b(ir.SiteEnd(3))
    b.ret(0)
    with pytest.raises(CodegenError, match="SiteEnd"):
        build([b])


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
def test_ir_the_back_end_cannot_compile_is_a_one_line_internal_error(fn, message):
    with pytest.raises(CodegenError) as e:
        build([fn])
    assert isinstance(e.value, InternalError) and not isinstance(e.value, CompileError)
    assert e.value.stage == "codegen" and str(e.value).startswith(f"codegen: {fn.f.name}: ")
    assert message in e.value.message and "\n" not in e.value.message


def test_a_frame_beyond_2_gib_is_the_programs_error_at_its_function():
    b = FB("huge")
    b.f.new_slot(1 << 30, 8)
    b.f.new_slot(1 << 30, 8)
    b.ret(0)
    with pytest.raises(CompileError) as e:
        build([b])
    assert e.value.loc == LOC and not isinstance(e.value, InternalError)
    assert e.value.message.startswith("function 'huge' needs a 2147483")


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


