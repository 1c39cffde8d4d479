"""The PV code rules (codespec.md) on what the compiler emits, checked by an
independent capstone pass (tests/bundle_rules.py).

Every PV image of every kernel, generated expression kernels and random IR
programs must come out with no finding; the checker itself must find each
kind of violation; and the bundled layout of a native build (the option that
measures the layout's cost) must run like the plain one.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import bundle_rules
import gen_exprs
import kernels
from codegen_support import FB, mix_function, random_program
from pvimage import abi
from pvtool import driver, elfwrite, ir, link
from pvtool.obj import FunctionCode, ObjectCode
from pvtool.x86 import codegen
from pvtool.x86.encode import Asm
from runtime import hypervisor

KERNELS = kernels.all_kernels()


def image_of(module: ir.Module, bundled: bool | None = None, name: str = "kernel") -> bytes:
    oc = codegen.generate(module, bundled=bundled)
    oc.name = name
    return elfwrite.write(link.link(oc))


@pytest.mark.parametrize("path", KERNELS, ids=kernels.kernel_id)
def test_every_kernels_pv_image_obeys_the_code_rules(path):
    assert bundle_rules.image_findings(driver.compile_file(str(path), "pv")) == []


@pytest.mark.parametrize("seed", [1, 2])
def test_generated_kernels_obey_the_code_rules(seed, tmp_path):
    src = tmp_path / f"exprs_{seed}.pvk"
    src.write_text(gen_exprs.program(seed, 120).text)
    assert bundle_rules.image_findings(driver.compile_file(str(src), "pv")) == []


def test_random_programs_obey_the_code_rules():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data(), st.integers(0, 6))
    def check(data, nparams):
        kmain = FB("kmain")
        kmain.ret(kmain.call("rand", *range(nparams)))
        fns = [kmain.f, random_program(data, nparams).f, mix_function().f]
        assert bundle_rules.image_findings(image_of(ir.Module(fns, [], target="pv"))) == []
    check()


# -- the checker finds what it is for -------------------------------------------------------------

def linked(emit, target: str = "pv") -> bytes:
    """A PV image whose kmain is hand-written with a bundling encoder."""
    a = Asm(bundled=True)
    emit(a)
    kmain = FunctionCode("kmain", a.finish(), a.relocs, align=32)
    return elfwrite.write(link.link(ObjectCode([kmain], [], [], target=target, bundled=True)))


def raw(code: bytes):
    return lambda a: a.code.extend(code)


MASK_RAX, JMP_RAX = b"\x48\x83\xe0\xe0", b"\xff\xe0"


@pytest.mark.parametrize("emit, rule", [
    (raw(b"\xc3"), "R4: 'ret'"),
    (raw(JMP_RAX), "R6: 'jmp rax'"),
    (raw(b"\x48\x83\xe1\xe0\xff\xd0"), "R6: 'call rax'"),              # masks rcx, calls rax
    (raw(b"\x90" * 28 + MASK_RAX + JMP_RAX), "R6: 'jmp rax'"),             # the mask ends the bundle before
    (raw(b"\xff\x25\0\0\0\0"), "R4: 'jmp qword ptr [rip]'"),              # memory-indirect
    (raw(b"\xc7\xf8\0\0\0\0"), "R4: 'xbegin"),
    (raw(b"\x90" * 30 + b"\xb8\0\0\0\0"), "R3: bundle"),                   # crosses the bundle end
    (raw(b"\xeb\x01\xb8\x0f\x30\x90\x90"), "not an instruction start"),    # into the mov's imm32
    (raw(MASK_RAX + JMP_RAX + b"\xeb\xfc"), "second instruction of a masked pair"),
    (raw(b"\x90" * 4 + b"\xe8\0\0\0\0"), "call rule"),                     # a call ending mid-bundle
    (lambda a: a.call("__hypercall_page", 5), "not a hypercall entry"),
    (lambda a: a.call("__hypercall_page", abi.HC_COUNT * 32), "not a hypercall entry"),
])
def test_the_checker_finds_each_violation(emit, rule):
    findings = bundle_rules.image_findings(linked(emit))
    assert any(rule in f for f in findings), findings


def test_the_checker_finds_misplaced_entries_and_functions():
    fine = linked(lambda a: a.jmp_symbol("__hypercall_page", abi.HC_SHUTDOWN * 32))
    assert bundle_rules.image_findings(fine) == []
    entry = int.from_bytes(fine[24:32], "little")
    moved = fine[:24] + (entry + 2).to_bytes(8, "little") + fine[32:]
    assert any(f.startswith("R7: e_entry") for f in bundle_rules.image_findings(moved))
    oc = ObjectCode([FunctionCode("kmain", b"\x90" * 3, align=16),
                     FunctionCode("odd", b"\x90", align=16)], [], [], target="pv", bundled=True)
    findings = bundle_rules.image_findings(elfwrite.write(link.link(oc)))
    assert any(" does not start a bundle" in f for f in findings), findings


# -- the bundled layout of a native build ---------------------------------------------------------

@pytest.mark.parametrize("path", [kernels.PROJECT_KERNELS / f"{k}.pvk" for k in ("hello", "tasks", "ticks")],
                         ids=lambda p: Path(p).stem)
@pytest.mark.parametrize("mode", ["bare", "trap"])
def test_native_bundled_layout_runs_like_the_plain_one(path, mode):
    want = kernels.expectation(path)
    image = image_of(driver.compile_ir(str(path), "native"), bundled=True, name=path.stem)
    result = hypervisor.run(image, mode, timeout=120)
    assert result.reason == "shutdown", result.message
    assert (result.console.decode("latin-1"), result.status) == (want.output, want.status)


def test_bundle_cost_bench_measures_both_layouts():
    """bench/bundle_cost.py still runs against the runtime; the bundled layout only
    adds instructions (NOPs, masked returns), never removes one."""
    sys.path.insert(0, str(kernels.ROOT / "bench"))
    import bundle_cost
    (row,) = bundle_cost.measure(["sieve"], "bare", 1, 120)
    assert row.plain_guest_s > 0 and row.bundled_guest_s > 0 and row.bundled_text_bytes > row.plain_text_bytes
    assert "sieve" in bundle_cost.table([row], "bare")
    hello = kernels.PROJECT_KERNELS / "hello.pvk"
    plain, bundled = (bundle_cost.executed(bundle_cost.image(hello, b), "bare") for b in (False, True))
    assert 0 < plain <= bundled
