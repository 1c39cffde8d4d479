"""The paravirtualization pass: each rewrite, the batching and its flush
points, and the claim that observable behaviour is unchanged.

Behaviour is compared on the IR interpreter (tests/ir_interp.py): the native
IR runs on a machine that logs every effect a device or the MMU could see
(port writes, page-table writes, TLB flushes, control-register, descriptor
and MSR writes), the PV IR on a model of the hypervisor that services the
same hypercalls on the same machine.  The pass is correct when console,
result and the whole effect log are identical, in order.
"""
from __future__ import annotations

import struct

import pytest

import ir_interp
import kernels
from pvimage import abi
from pvtool import ir, lower, paravirt, parse
from pvtool import typecheck as check
from pvtool.errors import InternalError
from pvtool.intrinsics import INTRINSICS

S = abi.SHARED_PAGE


class NativeMachine(ir_interp.Machine):
    """The interpreter's machine, logging every observable effect."""

    def __init__(self, module):
        self.log: list[tuple] = []
        self.sensitive_ops = 0
        super().__init__(module)

    def machine_op(self, op, *args):
        return getattr(self, "op_" + op)(*args)

    def out(self, port, v):
        self.log.append(("out", port & 0xFFFF, v))
        super().out(port, v)

    def op_set_pte(self, p, v):
        self.log.append(("pte", p, v))
        super().op_set_pte(p, v)

    def op_invlpg(self, va):
        self.log.append(("invlpg", va))
        super().op_invlpg(va)

    def op_write_cr3(self, v):
        self.log.append(("cr3", v))
        super().op_write_cr3(v)

    def op_write_cr0(self, v):
        self.log.append(("cr0", v))
        super().op_write_cr0(v)

    def op_write_cr4(self, v):
        self.log.append(("cr4", v))
        super().op_write_cr4(v)

    def op_lgdt(self, p):
        super().op_lgdt(p)
        self.log.append(("gdt", self.gdtr))

    def op_lidt(self, p):
        super().op_lidt(p)
        self.log.append(("idt", self.idtr))

    def op_wrmsr(self, msr, v):
        self.log.append(("msr", msr, v))
        super().op_wrmsr(msr, v)

    def op_set_kernel_stack(self, tss, top):
        self.log.append(("kernel stack", top))
        super().op_set_kernel_stack(tss, top)


class _PVTranslator(ir_interp._Translator):
    def instr(self, i):
        if isinstance(i, ir.Hypercall):
            call = f"m.hypercall({', '.join([str(i.nr)] + [self.op(a) for a in i.args])})"
            return call if i.dst is None else f"{self.op(i.dst)} = {call}"
        return super().instr(i)


class PVMachine(NativeMachine):
    """A model of the hypervisor's PV interface (docs/abi.md) on the same machine."""

    def translate_all(self):
        real = ir_interp._Translator
        ir_interp._Translator = _PVTranslator
        try:
            return super().translate_all()
        finally:
            ir_interp._Translator = real

    def __init__(self, module):
        self.hypercalls: list[int] = []
        super().__init__(module)
        self.phys_store(S + abi.SH_UPCALL_MASK, 1, 1)
        self.sync_shared()

    def sync_shared(self):
        for n, off in ((0, abi.SH_CR0), (2, abi.SH_CR2), (3, abi.SH_CR3), (4, abi.SH_CR4)):
            self.phys_store(S + off, 8, self.cr[n])
        for off, (limit, base) in ((abi.SH_GDTR, self.gdtr), (abi.SH_IDTR, self.idtr)):
            self.phys_store(S + off, 2, limit)
            self.phys_store(S + off + 2, 8, base)

    def hypercall(self, nr, *args):
        self.hypercalls.append(nr)
        result = self.service(nr, *args)
        self.sync_shared()
        return 0 if result is None else result

    def service(self, nr, *a):
        if nr == abi.HC_MULTICALL:
            count = self.phys_load(S + abi.SH_MC_COUNT, 4)
            assert count <= abi.MC_MAX
            for k in range(count):
                entry = S + abi.SH_MC_ENTRIES + k * abi.MC_ENTRY_SIZE
                nr_k, *args = (self.phys_load(entry + 8 * j, 8) for j in range(4))
                assert nr_k in abi.BATCHABLE
                self.service(nr_k, *args)
            self.phys_store(S + abi.SH_MC_COUNT, 4, 0)
            return count
        if nr == abi.HC_IO_OUT:
            port, size, value = a[:3]
            return self.out(port, value & ((1 << (8 * size)) - 1))
        if nr == abi.HC_IO_IN:
            return {1: self.op_inb, 2: self.op_inw, 4: self.op_inl}[a[1]](a[0])
        if nr == abi.HC_RDMSR:
            self.phys_store(S + abi.SH_HC_VALUE, 8, self.op_rdmsr(a[0]))
            return 0
        if nr == abi.HC_EVENT_CHECK:
            return 0
        if nr == abi.HC_STACK_SWITCH:
            self.log.append(("kernel stack", a[0]))
            self.kernel_stack = a[0]
            return 0
        if nr == abi.HC_WRITE_CR:
            return {0: self.op_write_cr0, 4: self.op_write_cr4}[a[0]](a[1])
        handler = {abi.HC_SET_PTE: self.op_set_pte, abi.HC_INVLPG: self.op_invlpg,
                   abi.HC_NEW_BASEPTR: self.op_write_cr3, abi.HC_SET_GDT: self.op_lgdt,
                   abi.HC_SET_TRAP_TABLE: self.op_lidt, abi.HC_WRMSR: self.op_wrmsr,
                   abi.HC_CPUID: self.op_cpuid, abi.HC_RDTSC: self.op_rdtsc,
                   abi.HC_WBINVD: self.op_wbinvd, abi.HC_BLOCK: self.op_hlt}[nr]
        return handler(*a[:handler.__code__.co_argcount - 1])

    def machine_op(self, op, *args):
        assert not INTRINSICS[op].sensitive, f"{op} reached the machine in a PV build"
        return super().machine_op(op, *args)


def build_ir(path, target):
    module = lower.lower(check.check(parse.parse_program(str(path))))
    return paravirt.paravirtualize(module) if target == "pv" else module


def run(module, machine_class):
    m = machine_class(module)
    try:
        value = m.call("kmain")
    except ir_interp._Exit as e:
        return m, e.status
    return m, value


def compile_text(tmp_path, source: str, target: str) -> ir.Module:
    path = tmp_path / "k.pvk"
    path.write_text(source)
    return build_ir(path, target)


# -- behaviour is unchanged: every kernel, native IR vs PV IR ----------------------------

# Compute kernels add nothing here but time; the interpreter does not model
# interrupts or user mode, so the timer kernels and those with processes
# (lib/proc.pvk) are left to the four-way test on the runtime.
EQUIVALENCE = [k for k in kernels.all_kernels()
               if k.stem not in ("sieve", "sort", "checksum") and "interrupt fn" not in k.read_text()
               and "lib/proc.pvk" not in k.read_text()]


@pytest.mark.parametrize("path", EQUIVALENCE, ids=kernels.kernel_id)
def test_pv_build_behaves_like_native(path):
    expected = kernels.expectation(path)
    native, native_result = run(build_ir(path, "native"), NativeMachine)
    pv, pv_result = run(build_ir(path, "pv"), PVMachine)
    assert native.console.decode() == expected.output
    assert pv.console.decode() == native.console.decode()
    assert pv_result == native_result
    assert pv.log == native.log, "the PV build changed what devices and the MMU see, or its order"


# -- each operation's rewrite ------------------------------------------------------------------

def one_op(op: str, args: list, dst: bool) -> ir.Module:
    fn = ir.Function("f", [], [], next_vreg=1, returns_value=dst)
    fn.blocks = [ir.Block("entry", [ir.MachineOp(op, ir.VReg(0) if dst else None, args)],
                          ir.Ret(ir.VReg(0) if dst else None))]
    return paravirt.paravirtualize(ir.Module([fn], []))


def flat(module: ir.Module) -> list[ir.Instr]:
    return list(module.functions[0].instructions())


ARGS = {"*u64": 0x1000000, "*TrapFrame": 0x1000000, "*u8": 0x1000000, "*u32": 0x1000000, "u64": 0x1234, "u32": 0x10, "u16": 0x3f8, "u8": 7}


@pytest.mark.parametrize("op", [i.name for i in INTRINSICS.values() if i.sensitive])
def test_every_sensitive_operation_is_rewritten_into_a_site(op):
    info = INTRINSICS[op]
    instrs = flat(one_op(op, [ARGS[t] for t in info.params], info.result is not None))
    assert not any(isinstance(i, ir.MachineOp) for i in instrs)
    begins = [i for i in instrs if isinstance(i, ir.SiteBegin)]
    assert [b.op for b in begins] == [op]
    assert begins[0].becomes


@pytest.mark.parametrize("op", ["cli", "sti", "save_flags", "restore_flags", "read_cr0", "read_cr2",
                                "read_cr3", "read_cr4", "sgdt", "sidt"])
def test_shared_page_operations_make_no_unconditional_exit(op):
    info = INTRINSICS[op]
    fn = one_op(op, [ARGS[t] for t in info.params], info.result is not None).functions[0]
    # Hypercalls may only sit in the conditional event_check block.
    for block in fn.blocks:
        for i in block.instrs:
            if isinstance(i, ir.Hypercall):
                assert i.nr == abi.HC_EVENT_CHECK and block.label.startswith(".pv.event")


@pytest.mark.parametrize("op,nr", [("hlt", abi.HC_BLOCK),
                                   ("write_cr0", abi.HC_WRITE_CR), ("write_cr4", abi.HC_WRITE_CR),
                                   ("lgdt", abi.HC_SET_GDT), ("lidt", abi.HC_SET_TRAP_TABLE),
                                   ("rdmsr", abi.HC_RDMSR), ("wrmsr", abi.HC_WRMSR),
                                   ("cpuid", abi.HC_CPUID), ("rdtsc", abi.HC_RDTSC),
                                   ("wbinvd", abi.HC_WBINVD), ("inb", abi.HC_IO_IN),
                                   ("inw", abi.HC_IO_IN), ("inl", abi.HC_IO_IN)])
def test_hypercall_operations(op, nr):
    info = INTRINSICS[op]
    instrs = flat(one_op(op, [ARGS[t] for t in info.params], info.result is not None))
    assert [i.nr for i in instrs if isinstance(i, ir.Hypercall)] == [nr]


@pytest.mark.parametrize("op", ["set_pte", "invlpg", "outb", "outw", "outl", "write_cr3", "set_kernel_stack"])
def test_batched_operations_queue_in_the_shared_page(op):
    info = INTRINSICS[op]
    instrs = flat(one_op(op, [ARGS[t] for t in info.params], False))
    stores = [i for i in instrs if isinstance(i, ir.Store) and i.base == S and i.offset == abi.SH_MC_COUNT]
    assert len(stores) == 1
    numbers = {i.value for i in instrs if isinstance(i, ir.Store) and i.base != S and i.offset == 0}
    assert numbers == {paravirt.QUEUED[op]}                 # the entry's hypercall number
    # The only hypercalls: the queue-full flush, and the flush before the return.
    assert {i.nr for i in instrs if isinstance(i, ir.Hypercall)} == {abi.HC_MULTICALL}


def test_nothing_sensitive_survives_and_pause_is_kept():
    instrs = flat(one_op("pause", [], False))
    assert [i.op for i in instrs if isinstance(i, ir.MachineOp)] == ["pause"]


def test_interrupt_return_becomes_the_iret_hypercall():
    fn = ir.Function("h", [], [ir.Block("entry", [], ir.IRet())], interrupt=True)
    out = paravirt.paravirtualize(ir.Module([fn], []))
    assert out.functions[0].blocks[0].term.hypercall == abi.HC_IRET


# -- batching and flush points ---------------------------------------------------------------------

LOOP = """
fn kmain() -> u64 {
    var pt = 0x1000000 as *u64;
    for i in 0..PAGES {
        set_pte(&pt[i], (0x1400000 + i * 4096) | 3);
    }
    for i in 0..PAGES {
        invlpg(0x40000000 + i * 4096);
    }
    AFTER
    return 0;
}
"""


def multicalls(m: PVMachine) -> int:
    return m.hypercalls.count(abi.HC_MULTICALL)


def test_a_loop_of_updates_is_one_multicall(tmp_path):
    m, _ = run(compile_text(tmp_path, LOOP.replace("PAGES", "16").replace("AFTER", ""), "pv"), PVMachine)
    assert multicalls(m) == 1
    assert [e[0] for e in m.log] == ["pte"] * 16 + ["invlpg"] * 16


def test_a_full_queue_is_flushed(tmp_path):
    m, _ = run(compile_text(tmp_path, LOOP.replace("PAGES", "100").replace("AFTER", ""), "pv"), PVMachine)
    # 200 entries in queues of MC_MAX: three when full, one at the return.
    assert multicalls(m) == -(-200 // abi.MC_MAX)
    assert len(m.log) == 200


@pytest.mark.parametrize("observer", [
    "var x = *(0x1000000 as *u64);",     # a load could read the entry itself
    "*(0x1400000 as *u64) = 1;",         # a store could go through the new mapping
    "inb(0x3fd);",                       # a device could answer differently
    "cli();",                            # any other machine operation
    "putc(1);",                          # a call: the callee may do any of these
])
def test_updates_are_flushed_right_before_anything_that_could_observe_them(tmp_path, observer):
    source = "fn putc(c: u8) { *(0x1400000 as *u8) = c; }\n" + LOOP.replace("PAGES", "4").replace("AFTER", observer)
    observer_line = source.splitlines().index("    " + observer) + 1
    instrs = flat_all(compile_text(tmp_path, source, "pv"), "kmain")
    flushes = [i for i in instrs if isinstance(i, ir.Hypercall) and i.nr == abi.HC_MULTICALL]
    # One multicall, at the observer (not at the queue-full check, which never fires here).
    at_observer = [i for i in flushes if i.loc.line == observer_line]
    assert len(at_observer) == 1
    first_observer = next(k for k, i in enumerate(instrs) if i.loc and i.loc.line == observer_line)
    assert instrs.index(at_observer[0]) - first_observer < 4


QUIET = """
fn table(i: u64) -> *u64 { return (0x1000000 + i * 4096) as *u64; }
fn window(space: u64) -> *u64 { return table(4 + 4 * space); }
fn depth(n: u64) -> u64 { if n == 0 { return 0; } return depth(n - 1) + 1; }
fn touch(i: u64) -> *u64 { var p = table(i); p[0] = 1; return p; }
fn kmain() -> u64 {
    invlpg(0x40000000);
    var pt = window(1);
    depth(3);
    for i in 0..4 {
        set_pte(&pt[i], (0x1400000 + i * 4096) | 3);
    }
    CALL
    return 0;
}
"""


def test_a_call_that_only_computes_is_no_flush_point(tmp_path):
    """A helper that works out an address (as churn's `table` does) sees nothing of a pending batch:
    the flush before the calls and the updates after them go to the hypervisor in one multicall."""
    m, _ = run(compile_text(tmp_path, QUIET.replace("CALL", ""), "pv"), PVMachine)
    assert multicalls(m) == 1
    assert [e[0] for e in m.log] == ["invlpg"] + ["pte"] * 4


def test_a_call_that_touches_memory_further_down_is_a_flush_point(tmp_path):
    """`touch` stores, and so does whatever calls it: the queue is flushed before the call."""
    source = QUIET.replace("CALL", "touch(2);")
    module = compile_text(tmp_path, source, "pv")
    assert paravirt.quiet_functions(module) == {"table", "window", "depth"}
    instrs = flat_all(module, "kmain")
    call = next(k for k, i in enumerate(instrs) if isinstance(i, ir.Call) and i.func == "touch")
    flush = max(k for k, i in enumerate(instrs[:call]) if isinstance(i, ir.Hypercall))
    assert instrs[flush].nr == abi.HC_MULTICALL and call - flush < 4
    m, _ = run(module, PVMachine)
    assert multicalls(m) == 1


def test_quiet_functions_asked_for_some_callers_look_only_below_them(tmp_path):
    """The pass asks only about what its sensitive functions call: the answer is the whole
    module's quiet set cut to the functions reached from those callers."""
    module = compile_text(tmp_path, QUIET.replace("CALL", "touch(2);"), "native")
    fns = {fn.name: fn for fn in module.functions}
    assert paravirt.quiet_functions(module, [fns["touch"]]) == {"table"}
    assert paravirt.quiet_functions(module, [fns["depth"]]) == {"depth"}
    assert paravirt.quiet_functions(module, [fns["table"]]) == set()
    assert paravirt.quiet_functions(module, [fns["kmain"]]) == {"table", "window", "depth"}


SWITCH = """
var tss: [u8; 104];
fn switch_stacks() {}
fn kmain() -> u64 {
    write_cr3(0x1000000);
    set_kernel_stack(&tss[0], 0x200000);
    switch_stacks();
    return 0;
}
"""


def test_a_process_switch_is_one_multicall(tmp_path):
    """A new address space and the kernel stack for it go to the hypervisor together, as in Xen
    (a context switch costs one hypercall), flushed before the call that switches stacks."""
    m, _ = run(compile_text(tmp_path, SWITCH, "pv"), PVMachine)
    assert multicalls(m) == 1
    assert [nr for nr in m.hypercalls if nr != abi.HC_MULTICALL] == []
    instrs = flat_all(compile_text(tmp_path, SWITCH, "pv"), "kmain")
    queued = [i.value for i in instrs if isinstance(i, ir.Store) and i.base != S and i.offset == 0]
    assert queued == [abi.HC_NEW_BASEPTR, abi.HC_STACK_SWITCH]


def test_reading_an_entry_right_after_set_pte_sees_the_new_value(tmp_path):
    source = LOOP.replace("PAGES", "4").replace("AFTER", "return pt[2];")
    _, value = run(compile_text(tmp_path, source, "pv"), PVMachine)
    assert value == 0x1402003


def flat_all(module: ir.Module, name: str) -> list[ir.Instr]:
    return list(next(f for f in module.functions if f.name == name).instructions())


def test_pending_analysis_follows_loops():
    fn = ir.Function("f", [ir.VReg(0)], [], next_vreg=5)
    fn.blocks = [
        ir.Block("entry", [], ir.Jump("loop")),
        ir.Block("loop", [ir.MachineOp("invlpg", None, [ir.VReg(0)])], ir.Branch(ir.VReg(0), "loop", "out")),
        ir.Block("out", [], ir.Ret()),
    ]
    assert paravirt.pending_at_entry(fn) == {"entry": False, "loop": True, "out": True}


def test_site_markers_pair_up_and_carry_locations(tmp_path):
    module = compile_text(tmp_path, "fn kmain() -> u64 {\n  cli();\n  outb(0x80, 1);\n  return 0;\n}\n", "pv")
    instrs = flat(module)
    begins = [i for i in instrs if isinstance(i, ir.SiteBegin)]
    ends = [i for i in instrs if isinstance(i, ir.SiteEnd)]
    assert [b.site for b in begins] == [e.site for e in ends]
    assert [(b.op, b.loc.line) for b in begins] == [("cli", 2), ("outb", 3)]


def test_paravirt_refuses_to_leave_sensitive_operations(monkeypatch):
    monkeypatch.setattr(paravirt._Rewriter, "rewrite", lambda self, ins: self.emit(ins))
    with pytest.raises(InternalError, match="^paravirt: f: cli was not rewritten$"):
        one_op("cli", [], False)


def test_save_flags_reports_the_virtual_if(tmp_path):
    source = """
    fn kmain() -> u64 {
        cli();
        var off = save_flags();
        sti();
        var on = save_flags();
        return ((off >> 9) & 1) | (((on >> 9) & 1) << 1) | ((on & 2) << 1);
    }"""
    m, value = run(compile_text(tmp_path, source, "pv"), PVMachine)
    assert value == 0b110
    assert m.hypercalls == []           # no event pending: no exit at all


def test_unmasking_with_an_event_pending_makes_one_exit(tmp_path):
    source = "fn kmain() -> u64 { var f = save_flags(); cli(); restore_flags(f | 0x200); cli(); sti(); return 0; }"
    m = PVMachine(compile_text(tmp_path, source, "pv"))
    m.phys_store(S + abi.SH_UPCALL_PENDING, 1, 1)
    m.call("kmain")
    assert m.hypercalls == [abi.HC_EVENT_CHECK, abi.HC_EVENT_CHECK]


def test_sgdt_copies_the_shared_page_descriptor(tmp_path):
    source = """
    var d: [u8; 10];
    fn kmain() -> u64 { sgdt(&d[0]); return 0; }"""
    m, _ = run(compile_text(tmp_path, source, "pv"), PVMachine)
    limit, base = struct.unpack("<HQ", bytes(m.read_global("d", 1, 10)))
    assert (limit, base) == m.gdtr
    assert m.hypercalls == []
