"""Whole programs through the code generator: the conformance kernels (real
front end, run on Unicorn with a fake hypervisor) and random IR programs
checked against the reference IR interpreter (tests/ir_interp.py)."""
from __future__ import annotations

import struct

import pytest

import ir_interp
from codegen_support import FB, IMMEDIATES, M64, REGISTER_SETS, VALUES, machine
from kernels import CONFORMANCE
from pvimage import abi
from pvtool import driver, ir
from pvtool.expect import expectation
from pvtool.x86 import codegen, isel
from unicorn_harness import Machine

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



# -- random programs against the IR interpreter ------------------------------------------------

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


def test_random_programs_match_the_ir_interpreter():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data(), st.integers(0, 6), st.sampled_from(sorted(REGISTER_SETS)))
    def check(data, nparams, regs):
        prog, mix = random_program(data, nparams), mix_function()
        args = [data.draw(st.sampled_from(VALUES)) for _ in range(nparams)]
        want = ir_interp.Machine(ir.Module([prog.f, mix.f], [])).call("rand", *args)
        m = machine([prog, mix], registers=REGISTER_SETS[regs])
        assert m.call("rand", *args) == want
        assert not m.misaligned
    check()
