"""Code generation of machine operations, hypercalls, site rows and interrupt functions."""
from __future__ import annotations

import re
import struct

import pytest

from codegen_support import (FB, LAYOUTS, LOC, REGISTER_SETS, build, disasm, disasm_range, function, machine,
                             texts)
from pvimage import abi
from pvtool import ir, obj
from pvtool.intrinsics import INTRINSICS
from pvtool.source import Loc
from unicorn_harness import GDT, RAM, Machine


# -- machine operations -----------------------------------------------------------------------

MOP_ARGS = {"outb": (0x3F8, 0x41), "outw": (0x3F8, 0x4142), "outl": (0x3F8, 0x41424344),
            "inb": (0x60,), "inw": (0x60,), "inl": (0x60,),
            "write_cr0": (0x80000011,), "write_cr3": (0x1000,), "write_cr4": (0x20,),
            "invlpg": (0x400000,), "set_pte": (RAM, 0x1003), "lgdt": (RAM,), "lidt": (RAM,),
            "sgdt": (RAM,), "sidt": (RAM,), "rdmsr": (0xC0000080,), "wrmsr": (0xC0000080, 0x500),
            "cpuid": (0, RAM), "restore_flags": (0x202,), "swtch": (RAM, RAM + 64),
            "syscall": (1, 2, 3, 4), "set_kernel_stack": (RAM, 0x9000), "load_tr": (0x28,), "enter_user": (RAM,)}
NATIVE_TEXT = {"cli": ["cli"], "sti": ["sti"], "hlt": ["hlt"], "wbinvd": ["wbinvd"],
               "save_flags": ["pushfq", "pop"], "restore_flags": ["push", "popfq"],
               "outb": ["out dx, al"], "outw": ["out dx, ax"], "outl": ["out dx, eax"],
               "inb": ["in al, dx"], "inw": ["in ax, dx"], "inl": ["in eax, dx"],
               "read_cr0": ["mov r, cr0"], "read_cr2": ["mov r, cr2"], "read_cr3": ["mov r, cr3"],
               "read_cr4": ["mov r, cr4"], "write_cr0": ["mov cr0, r"], "write_cr3": ["mov cr3, r"],
               "write_cr4": ["mov cr4, r"], "invlpg": ["invlpg byte ptr [r]"],
               "set_pte": ["mov qword ptr [r], r"], "lgdt": ["lgdt [r]"], "lidt": ["lidt [r]"],
               "sgdt": ["sgdt [r]"], "sidt": ["sidt [r]"], "rdmsr": ["rdmsr"], "wrmsr": ["wrmsr"],
               "cpuid": ["cpuid"], "rdtsc": ["rdtsc"],
               "set_kernel_stack": ["mov qword ptr [r + 4], r", "mov qword ptr [rip], r"],
               "load_tr": ["ltr r"], "enter_user": ["iretq"]}
UNSITED = {"pause": "pause", "swtch": "call", "syscall": "syscall"}     # not sensitive: no site


def shape(text: str) -> str:
    """Instruction text with general register names replaced by 'r'."""
    t = re.sub(r"\br(ax|bx|cx|dx|si|di|bp|sp|\d+)\b", "r", text)
    t = re.sub(r"^ltr \w+$", "ltr r", t)           # ltr takes a 16-bit register
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
        if op in UNSITED:
            assert fc.sites == []
            assert any(t.split()[0] == UNSITED[op] for _, _, t in insns)
            continue
        (site,) = fc.sites
        assert site.op == op and site.loc == LOC and site.becomes == ""
        covered = [shape(t) for off, size, t in insns if site.offset <= off < site.offset + site.length]
        assert covered == NATIVE_TEXT[op], (op, covered)
        ends = {off + size for off, size, _ in insns}
        assert site.offset + site.length in ends


@pytest.mark.parametrize("op", sorted(NATIVE_TEXT))
def test_bundled_sites_cover_the_sensitive_instructions_and_no_leading_padding(op):
    """0 to 31 five-byte fillers (mov r32, imm32) put the operation at every offset of a bundle."""
    intr = INTRINSICS[op]
    for fill in range(32):
        b = FB("m", len(intr.params))
        for _ in range(fill):
            b.copy(7)
        b.mop(op, *b.p, result=intr.result is not None)
        b.ret(0)
        fc = function(build([b], bundled=True), "m")
        (site,) = fc.sites
        covered = [t for off, size, t in disasm(fc) if site.offset <= off < site.offset + site.length]
        assert not covered[0].startswith("nop"), (op, fill, covered)
        assert [shape(t.replace("cs:", "")) for t in covered if not t.startswith("nop")] == NATIVE_TEXT[op]


def test_every_intrinsic_has_an_expected_native_form():
    assert set(NATIVE_TEXT) | set(UNSITED) == set(INTRINSICS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_machine_ops_run_on_unicorn(layout):
    fns = [mop_function(op) for op in ("outb", "outw", "outl", "inb", "inw", "inl", "save_flags",
                                       "restore_flags", "cpuid", "set_pte", "read_cr3", "write_cr3",
                                       "sgdt", "rdtsc", "cli", "sti")]
    for regs in REGISTER_SETS.values():
        m = machine(fns, registers=regs, bundled=LAYOUTS[layout])
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hypercall_relocation_and_arguments(layout):
    b = FB("f", 2)
    r = b(ir.Hypercall(b.v(), abi.HC_SET_PTE, [b.p[1], b.p[0]]))
    b(ir.Hypercall(None, abi.HC_IO_OUT, [0x3F8, 1, b.p[0], 4, 5]))
    b.ret(b.op("add", r, 1))
    fc = function(build([b], bundled=LAYOUTS[layout]), "f")
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
    b(ir.SiteBegin(1, "cli", "shared-page store", loc=Loc("t.pvk", 7, 3)))
    b.store(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, 0, 1, 1)
    b(ir.SiteEnd(1))
    b(ir.SiteBegin(2, "save_flags", "shared-page load", loc=Loc("t.pvk", 8, 3)))
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("calls", [False, True])
def test_interrupt_function_preserves_every_register(calls, layout):
    helper = FB("helper", 1)
    hv = [helper.op("xor", helper.p[0], k) for k in range(10)]           # dirties caller-saved regs
    acc = helper.copy(0)
    for v in hv:
        helper(ir.BinOp("add", acc, acc, v))
    helper.ret(acc)
    data = [ir.Data("ticks", "data", 8, 8, struct.pack("<Q", 1))]
    oc = build([interrupt_handler(calls), helper], data, bundled=LAYOUTS[layout])
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


