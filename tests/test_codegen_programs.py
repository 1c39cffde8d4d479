"""Whole programs through the code generator: the conformance kernels (real
front end, run on Unicorn with a fake hypervisor) and random IR programs
checked against the reference IR interpreter (tests/ir_interp.py)."""
from __future__ import annotations

import struct

import pytest

import ir_interp
from codegen_support import M64, REGISTER_SETS, VALUES, machine, mix_function, random_program
from kernels import CONFORMANCE
from pvimage import abi
from pvtool import driver, ir
from pvtool.expect import expectation
from pvtool.intrinsics import INTRINSICS
from pvtool.x86 import codegen
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
        code = {fc.name: fc for fc in oc.functions}
        for fn in module.functions:
            fc = code[fn.name]
            native_ops = [i for i in fn.instructions() if isinstance(i, ir.MachineOp) and INTRINSICS[i.op].sensitive]
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

def test_random_programs_match_the_ir_interpreter():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data(), st.integers(0, 6), st.sampled_from(sorted(REGISTER_SETS)), st.booleans())
    def check(data, nparams, regs, bundled):
        prog, mix = random_program(data, nparams), mix_function()
        args = [data.draw(st.sampled_from(VALUES)) for _ in range(nparams)]
        want = ir_interp.Machine(ir.Module([prog.f, mix.f], [])).call("rand", *args)
        m = machine([prog, mix], registers=REGISTER_SETS[regs], bundled=bundled)
        assert m.call("rand", *args) == want
        assert not m.misaligned
    check()
