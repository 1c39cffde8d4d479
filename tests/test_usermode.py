"""User mode in the compiler (docs/language.md 3, 4, 5, 7): the handler forms that see a
TrapFrame, `syscall fn`, `user fn`/`user var`, the user-mode intrinsics, and the
small things (`null`, `sizeof`, `offsetof`, `align(N)`, `private`, `import ... as`).

Front-end rules are checked through their located one-line errors.  The code is
run on the bare Unicorn CPU of tests/unicorn_harness.py, entered the way the CPU
(or, in a PV build, the hypervisor) enters it: an interrupt frame on the stack, a
`syscall` with the user's rsp, rcx and r11.  The PV code rules are checked with the
independent checker (tests/bundle_rules.py) and with the validator.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from unicorn import UC_HOOK_INSN, UcError
from unicorn import x86_const as X

import bundle_rules
from codegen_support import disasm
from pvimage import abi, elfread, validate
from pvtool import driver, ir, lower, paravirt, parse, typecheck
from pvtool.diagnostics import CompileError
from pvtool.intrinsics import INTRINSICS
from pvtool.tools.diffview import diff_images
from pvtool.types import TRAP_FRAME_FIELDS
from pvtool.x86 import codegen
from qemu import boot as qemu_boot, requires_qemu
from test_lower import INTRINSIC_CALLS
from unicorn_harness import GPRS, KERNEL_CS, KERNEL_DS, RETURN, STACK_TOP, Machine

KMAIN = "fn kmain() -> u64 { return 0; }\n"
FRAME = {name: 8 * k for k, name in enumerate(TRAP_FRAME_FIELDS)}
IRET_ENTRY = 0x200000 + abi.HC_IRET * abi.HYPERCALL_STRIDE     # the harness's hypercall page


def write_program(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path / next(iter(files))


def compile_module(tmp_path: Path, source: str, target: str = "native", extra: dict | None = None) -> ir.Module:
    main = write_program(tmp_path, {"k.pvk": source, **(extra or {})})
    module = lower.lower(typecheck.check(parse.parse_program(str(main))))
    return paravirt.paravirtualize(module) if target == "pv" else module


def error_of(tmp_path: Path, source: str, extra: dict | None = None) -> str:
    """`line:col: message` of the program's one error."""
    with pytest.raises(CompileError) as info:
        compile_module(tmp_path, source, extra=extra)
    e = info.value
    return f"{Path(e.loc.file).name}:{e.loc.line}:{e.loc.col}: {e.message}"


# -- the language: rules and their errors -------------------------------------------------------

@pytest.mark.parametrize("source,expected", [
    ("interrupt fn h(x: u64) { }", "k.pvk:2:19: the parameter of interrupt fn 'h' must be a *TrapFrame, not u64"),
    ("interrupt fn h(f: *TrapFrame, g: *TrapFrame) { }",
     "k.pvk:2:31: interrupt fn 'h' takes one parameter, frame: *TrapFrame"),
    ("interrupt(error_code) fn h() { }", "k.pvk:2:1: interrupt(error_code) fn 'h' needs a parameter frame: *TrapFrame"),
    ("syscall fn s() { }", "k.pvk:2:1: syscall fn 's' needs a parameter frame: *TrapFrame"),
    ("syscall fn s(f: *TrapFrame) -> u64 { return 0; }", "k.pvk:2:32: syscall fn 's' cannot return a value"),
    ("interrupt(vector) fn h(f: *TrapFrame) { }", "k.pvk:2:11: expected 'error_code', found 'vector'"),
    ("syscall fn s(f: *TrapFrame) { }\nfn g() { s(null); }", "k.pvk:3:10: syscall fn 's' cannot be called"),
    ("interrupt(error_code) fn h(f: *TrapFrame) { }\nfn g() { h(null); }",
     "k.pvk:3:10: interrupt(error_code) fn 'h' cannot be called"),
    ("fn k() { }\nuser fn u() { k(); }", "k.pvk:3:15: user fn 'u' cannot use kernel function 'k'"),
    ("var g: u64;\nuser fn u() -> u64 { return g; }", "k.pvk:3:29: user fn 'u' cannot use kernel variable 'g'"),
    ("fn k() { }\nuser fn u() -> u64 { return &k as u64; }", "k.pvk:3:30: user fn 'u' cannot use kernel function 'k'"),
    ("user fn u() { var x: u64; swtch(&x, 0); }", "k.pvk:2:27: user fn 'u' cannot use 'swtch' (it runs kernel code)"),
    ("var p = null;", "k.pvk:2:9: null needs a pointer type from its context"),
    ("fn f() -> u64 { return null; }", "k.pvk:2:24: null needs a pointer type from its context (a u64 is expected here)"),
    ("const N: u64 = offsetof(u64, a);", "k.pvk:2:25: offsetof needs a struct type, not u64"),
    ("const N: u64 = offsetof(TrapFrame, eax);", "k.pvk:2:36: struct 'TrapFrame' has no field 'eax'"),
    ("var t: [u8; 16] align(24);", "k.pvk:2:23: alignment must be a power of two up to 4096, not 24"),
    ("var t: [u8; 16] align(8192);", "k.pvk:2:23: alignment must be a power of two up to 4096, not 8192"),
    ("struct TrapFrame { a: u64 }", "k.pvk:2:1: 'TrapFrame' is a built-in type"),
    ("var USER_TEXT_END: u64;", "k.pvk:2:1: 'USER_TEXT_END' is a predeclared name"),
    ("fn f() { USER_DATA_START = 1; }", "k.pvk:2:10: cannot assign to 'USER_DATA_START', an address the linker fixes"),
    ("var syscall: u64;", "k.pvk:2:5: expected identifier, found 'syscall'"),
])
def test_rule_errors(tmp_path, source, expected):
    assert error_of(tmp_path, KMAIN + source) == expected


@pytest.mark.parametrize("kind", ["user fn", "private fn"])
def test_kmain_cannot_be_a_user_or_private_fn(tmp_path, kind):
    assert error_of(tmp_path, f"{kind} kmain() -> u64 {{ return 0; }}").endswith(
        ": 'kmain' must be declared 'fn kmain() -> u64'")


def test_sizeof_offsetof_and_null_are_constants_of_their_context(tmp_path):
    source = KMAIN + """
struct S { a: u8, b: u32, c: [u16; 3], d: *S }
const SIZES: u64 = sizeof(S) * 1000 + sizeof(TrapFrame);
const OFFSETS: u64 = offsetof(S, d) * 1000 + offsetof(TrapFrame, rip);
var arr: [u64; sizeof([u16; 5]) as u64];
var p: *S = null;
var h: fn(u64) -> u64 = null;
fn f(q: *S) -> bool { return q == null && null != q && h == null; }
"""
    module = compile_module(tmp_path, source)
    data = {d.name: d for d in module.data}
    assert data["arr"].size == 80 and data["p"].section == "bss" and data["h"].section == "bss"
    checked = typecheck.check(parse.parse_program(str(tmp_path / "k.pvk")))
    consts = {i.name: i.sym.value for i in checked.items if hasattr(i, "sym") and hasattr(i.sym, "value")}
    assert consts["SIZES"] == 24 * 1000 + 168 and consts["OFFSETS"] == 16 * 1000 + 128


def test_align_raises_a_globals_alignment(tmp_path):
    module = compile_module(tmp_path, KMAIN + "var table: [u64; 512] align(4096);\nvar b: u8 align(64) = 1;")
    data = {d.name: d for d in module.data}
    assert (data["table"].align, data["table"].size) == (4096, 4096)
    assert (data["b"].align, data["b"].section) == (64, "data")


LIB = {"lib/console.pvk": "private var idt: u64 = 5;\nvar shown: u64;\nstruct Cell { v: u64 }\n"
                          "fn put(x: u64) -> u64 { shown = x + idt; return shown; }\n"}


def test_private_items_of_two_files_do_not_collide(tmp_path):
    source = 'import "lib/console.pvk" as con;\nprivate var idt: u64 = 7;\n' \
             "fn kmain() -> u64 { var c: con::Cell; c.v = idt; return con::put(c.v); }\n"
    module = compile_module(tmp_path, source, extra=LIB)
    names = sorted(d.name for d in module.data)
    assert names == ["console::idt", "k::idt", "shown"]
    assert {f.name for f in module.functions} == {"kmain", "put"}


@pytest.mark.parametrize("use,expected", [
    ("con::idt", "k.pvk:2:28: 'idt' is private to {dir}/lib/console.pvk"),
    ("put(1)", "k.pvk:2:28: unknown function 'put'"),             # `as` imports nothing unqualified
    ("io::put(1)", "k.pvk:2:28: unknown module 'io' (import a file with 'as io')"),
    ("con::nothing", "k.pvk:2:28: unknown name 'con::nothing'"),
])
def test_import_as_reaches_public_names_only_qualified(tmp_path, use, expected):
    source = f'import "lib/console.pvk" as con;\nfn kmain() -> u64 {{ return {use}; }}\n'
    assert error_of(tmp_path, source, extra=LIB) == expected.format(dir=tmp_path)


def test_a_plain_import_still_shares_its_names(tmp_path):
    source = 'import "lib/console.pvk";\nfn kmain() -> u64 { var c: Cell; return put(shown); }\n'
    compile_module(tmp_path, source, extra=LIB)
    assert error_of(tmp_path, source + "var shown: u64;\n", extra=LIB).startswith(
        "console.pvk:2:1: duplicate definition of 'shown' (first defined at")


# -- code: handlers that see the interrupted context --------------------------------------------

HANDLERS = """
var seen: [u64; 6];
interrupt fn plain(frame: *TrapFrame) {
    seen[0] = frame.rip; seen[1] = frame.cs; seen[2] = frame.rflags; seen[3] = frame.rsp;
    seen[4] = frame.ss; seen[5] = frame.error_code;
    frame.rax = frame.rbx + frame.r15;
    frame.r11 = 0x77;
}
interrupt(error_code) fn with_code(frame: *TrapFrame) {
    seen[5] = frame.error_code;
    frame.rdi = frame.error_code * 2;
}
"""


def machine(module: ir.Module, **kw) -> Machine:
    oc = codegen.generate(module)
    return Machine(oc.functions, oc.data, **kw)


def enter(m: Machine, name: str, error_code: int | None, stop: int = RETURN) -> tuple[int, dict[str, int]]:
    """Deliver an interrupt to `name` as the CPU does: rsp aligned to 16, the five-qword
    frame, the error code if any.  Returns the stack pointer before the frame and the
    registers' values at the interruption."""
    before = m.sentinels()
    m.set_reg("eflags", 0x2)
    sp = STACK_TOP - 256
    pushed = struct.pack("<5Q", RETURN, KERNEL_CS, 0x202, sp, KERNEL_DS)
    if error_code is not None:
        pushed = struct.pack("<Q", error_code) + pushed
    m.write(sp - len(pushed), pushed)
    m.set_reg("rsp", sp - len(pushed))
    m.uc.emu_start(m.symbols[name], stop, count=100_000)
    return sp, before


@pytest.mark.parametrize("name,error_code", [("plain", None), ("with_code", 0x1234)])
def test_native_frame_entry_builds_the_frame_and_restores_what_the_body_changed(tmp_path, name, error_code):
    m = machine(compile_module(tmp_path, KMAIN + HANDLERS))
    sp, before = enter(m, name, error_code)
    assert m.reg("rip") == RETURN and m.reg("rsp") == sp      # iretq popped the frame, the error code dropped
    seen = struct.unpack("<6Q", m.read(m.symbols["seen"], 48))
    expected = dict(before)
    if name == "plain":
        assert seen == (RETURN, KERNEL_CS, 0x202, sp, KERNEL_DS, 0)
        expected |= {"rax": (before["rbx"] + before["r15"]) % 2**64, "r11": 0x77}
    else:
        assert seen[5] == error_code
        expected["rdi"] = 2 * error_code
    assert {r: m.reg(r) for r in GPRS} == expected
    assert f"{name}.body" not in m.misaligned                 # the body runs on a System V stack


@pytest.mark.parametrize("name,error_code", [("plain", None), ("with_code", 0x1234)])
def test_pv_frame_entry_returns_through_the_iret_hypercall(tmp_path, name, error_code):
    at_stub = {}

    def iret(m, nr, args):
        at_stub.update({r: m.reg(r) for r in GPRS + ("rsp",)}, nr=nr)
        return 0

    m = machine(compile_module(tmp_path, KMAIN + HANDLERS, "pv"), on_hypercall=iret)
    sp, before = enter(m, name, error_code, stop=IRET_ENTRY + 1)
    assert at_stub["nr"] == abi.HC_IRET and at_stub["rsp"] == sp - 40    # at the iret frame
    if name == "plain":
        assert at_stub["rax"] == (before["rbx"] + before["r15"]) % 2**64 and at_stub["r11"] == 0x77
    else:
        assert at_stub["rdi"] == 2 * error_code
    assert all(at_stub[r] == before[r] for r in ("rbx", "rcx", "rsi", "rbp", "r8", "r12", "r15"))


SYSCALL = """
syscall fn sys(frame: *TrapFrame) {
    frame.rax = frame.rdi * 3 + frame.rsi + frame.rdx + frame.error_code;
    frame.rcx = frame.rcx + 1;
}
fn kernel_stack(top: u64) { var tss: [u8; 104]; set_kernel_stack(&tss[0], top); }
"""


def test_native_syscall_entry_switches_to_the_kernel_stack_and_pushes_a_user_frame(tmp_path):
    oc = codegen.generate(compile_module(tmp_path, KMAIN + SYSCALL))
    m = Machine(oc.functions, oc.data)
    kernel_top = STACK_TOP - 0x1000
    m.call("kernel_stack", kernel_top)
    assert m.read_u64(m.symbols[ir.KERNEL_STACK]) == kernel_top
    entry = next(f for f in oc.functions if f.name == "sys")
    iretq = m.symbols["sys"] + entry.sites[0].offset
    user_rsp, user_rip = STACK_TOP - 0x8000, 0x401234
    before = m.sentinels()
    for r, v in (("rsp", user_rsp), ("rcx", user_rip), ("r11", 0x246), ("rdi", 5), ("rsi", 7), ("rdx", 11)):
        m.set_reg(r, v)
    m.uc.emu_start(m.symbols["sys"], iretq, count=10_000)      # stop at the iretq to user mode
    rsp = m.reg("rsp")
    assert rsp == kernel_top - 40
    assert struct.unpack("<5Q", m.read(rsp, 40)) == (user_rip, abi.USER_CS, 0x246, user_rsp, abi.USER_DS)
    assert m.read_u64(m.symbols[ir.SYSCALL_USER_RSP]) == user_rsp
    assert m.reg("rax") == 5 * 3 + 7 + 11 and m.reg("rcx") == user_rip + 1
    assert all(m.reg(r) == before[r] for r in ("rbx", "rbp", "r8", "r9", "r10", "r12", "r13", "r14", "r15"))


def test_pv_syscall_entry_is_a_plain_frame_entry(tmp_path):
    pv = next(f for f in codegen.generate(compile_module(tmp_path, KMAIN + SYSCALL, "pv")).functions
              if f.name == "sys")
    text = [t for _, _, t in disasm(pv)]
    assert text[0] == "push 0" and not any(ir.KERNEL_STACK in str(r.symbol) for r in pv.relocs)
    assert pv.sites[0].becomes == "hypercall iret" and pv.sites[0].kind == abi.SITE_HYPERCALL


# -- code: the intrinsics ------------------------------------------------------------------------

ENTER = """
var frame: TrapFrame;
fn leave() { enter_user(&frame); }
"""


def frame_values(m: Machine, rsp: int) -> dict[str, int]:
    values = {name: 0x0101_0101_0000_0000 * (k + 1) + k for k, name in enumerate(TRAP_FRAME_FIELDS[:15])}
    values |= {"error_code": 99, "rip": RETURN, "cs": KERNEL_CS, "rflags": 0x202, "rsp": rsp, "ss": KERNEL_DS}
    m.write(m.symbols["frame"], b"".join(struct.pack("<Q", values[f]) for f in TRAP_FRAME_FIELDS))
    return values


def test_native_enter_user_pops_every_register_from_the_frame(tmp_path):
    m = machine(compile_module(tmp_path, KMAIN + ENTER))
    values = frame_values(m, STACK_TOP - 0x400)
    m.set_reg("rsp", STACK_TOP - 0x100)
    m.uc.emu_start(m.symbols["leave"], RETURN, count=10_000)
    assert m.reg("rip") == RETURN and m.reg("rsp") == STACK_TOP - 0x400
    assert {r: m.reg(r) for r in GPRS} == {r: values[r] for r in GPRS}


def test_pv_enter_user_jumps_to_the_iret_entry_at_the_frame(tmp_path):
    seen = {}

    def iret(m, nr, args):
        seen.update({r: m.reg(r) for r in GPRS + ("rsp",)}, nr=nr)
        return 0

    module = compile_module(tmp_path, KMAIN + ENTER, "pv")
    m = machine(module, on_hypercall=iret)
    values = frame_values(m, STACK_TOP - 0x400)
    m.set_reg("rsp", STACK_TOP - 0x100)
    m.uc.emu_start(m.symbols["leave"], IRET_ENTRY + 1, count=10_000)
    assert seen["nr"] == abi.HC_IRET and seen["rsp"] == m.symbols["frame"] + FRAME["rip"]
    assert {r: seen[r] for r in GPRS} == {r: values[r] for r in GPRS}


def test_syscall_intrinsic_passes_its_registers_and_survives_the_clobbers(tmp_path):
    source = KMAIN + "user fn call(n: u64, a: u64) -> u64 { var k = n * 5; return syscall(n, a, a + 1, a + 2) + k; }"
    seen = []

    def on_syscall(uc, _):
        seen.append(tuple(uc.reg_read(getattr(X, f"UC_X86_REG_{r.upper()}")) for r in ("rax", "rdi", "rsi", "rdx")))
        uc.reg_write(X.UC_X86_REG_RAX, 1000)
        uc.reg_write(X.UC_X86_REG_RCX, 0xDEAD)                  # what the CPU leaves in rcx and r11
        uc.reg_write(X.UC_X86_REG_R11, 0xBEEF)

    for target in ("native", "pv"):
        for registers in (None, []):
            oc = codegen.generate(compile_module(tmp_path, source, target), registers=registers)
            m = Machine(oc.functions, oc.data)
            m.uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
            assert m.call("call", 3, 10) == 1000 + 15
            assert seen.pop() == (3, 10, 11, 12)


def test_set_kernel_stack_and_load_tr_natively(tmp_path):
    module = compile_module(tmp_path, KMAIN + "var tss: [u8; 104];\n"
                            "fn go(top: u64) { set_kernel_stack(&tss[0], top); load_tr(0x28); }")
    oc = codegen.generate(module)
    m = Machine(oc.functions, oc.data)
    m.uc.hook_add(UC_HOOK_INSN, lambda *a: None, None, 1, 0, X.UC_X86_INS_SYSCALL)
    go = next(f for f in oc.functions if f.name == "go")
    assert [s.op for s in go.sites] == ["set_kernel_stack", "load_tr"]
    ltr = [t for _, _, t in disasm(go) if t.startswith("ltr")]
    assert len(ltr) == 1
    # Run up to the ltr (the harness has no TSS descriptor for it to load).
    m.set_reg("rdi", 0x123450)
    m.set_reg("rsp", STACK_TOP - 0x108)
    m.uc.emu_start(m.symbols["go"], m.symbols["go"] + go.sites[1].offset, count=1000)
    assert m.read_u64(m.symbols["tss"] + 4) == 0x123450
    assert m.read_u64(m.symbols[ir.KERNEL_STACK]) == 0x123450


# -- the paravirt pass ---------------------------------------------------------------------------

def sites_of(fn: ir.Function) -> list[tuple[str, int, str, list[ir.Instr]]]:
    """(op, kind, becomes, instructions between the markers) of each site of fn."""
    out, open_ = [], None
    for i in fn.instructions():
        if isinstance(i, ir.SiteBegin):
            open_ = (i, [])
        elif isinstance(i, ir.SiteEnd):
            out.append((open_[0].op, open_[0].kind, open_[0].becomes, open_[1]))
            open_ = None
        elif open_ is not None:
            open_[1].append(i)
    return out


def test_pv_rewrites_of_the_user_mode_intrinsics(tmp_path):
    module = compile_module(tmp_path, KMAIN + "var tss: [u8; 104];\nvar f: TrapFrame;\n"
                            "fn go(top: u64) { set_kernel_stack(&tss[0], top); load_tr(0x28); enter_user(&f); }", "pv")
    go = next(f for f in module.functions if f.name == "go")
    (op1, k1, b1, i1), (op2, k2, b2, i2), (op3, k3, b3, i3) = sites_of(go)
    assert (op1, k1, b1) == ("set_kernel_stack", abi.SITE_BATCHED, "multicall queue entry: stack_switch (batched)")
    entry = [i for i in i1 if isinstance(i, ir.Store) and i.base != abi.SHARED_PAGE and i.offset in (0, 8)]
    assert [(i.offset, i.value) for i in entry] == [(0, abi.HC_STACK_SWITCH), (8, go.params[0])]
    assert (op2, k2, i2) == ("load_tr", abi.SITE_NO_EXIT, [])
    assert (op3, k3) == ("enter_user", abi.SITE_HYPERCALL)
    assert [(type(i), i.hypercall) for i in i3] == [(ir.ResumeFrame, abi.HC_IRET)]


def test_handler_bodies_return_through_the_iret_hypercall_in_pv(tmp_path):
    module = compile_module(tmp_path, KMAIN + HANDLERS + SYSCALL, "pv")
    entries = {f.trap_entry.name: (f.trap_entry.kind, f.trap_entry.hypercall) for f in module.functions if f.trap_entry}
    assert entries == {"plain": ("interrupt", abi.HC_IRET), "with_code": ("interrupt_error", abi.HC_IRET),
                       "sys": ("syscall", abi.HC_IRET)}


# One call of each sensitive intrinsic (the locals x, b, r, f are declared around them).
SENSITIVE_CALLS = {op: call for op, call in INTRINSIC_CALLS.items() if INTRINSICS[op].sensitive}


def test_every_sensitive_operation_of_user_code_raises_gp_without_leaving_the_guest(tmp_path):
    body = "\n".join(f"    {c};" for c in SENSITIVE_CALLS.values())
    source = KMAIN + f"user fn u() -> u64 {{\n    var x: u64; var b: [u8; 10]; var r: [u32; 4]; var f: TrapFrame;\n{body}\n    return x;\n}}"
    u = next(f for f in compile_module(tmp_path, source, "pv").functions if f.name == "u")
    sites = sites_of(u)
    assert [s[0] for s in sites] == list(SENSITIVE_CALLS)
    for op, kind, becomes, instrs in sites:
        assert (kind, becomes) == (abi.SITE_NO_EXIT, "raises #GP in user mode")
        assert isinstance(instrs[0], ir.Load) and instrs[0].base == 0x8000_0000_0000_0000
    everything = list(u.instructions())
    assert not any(isinstance(i, (ir.Hypercall, ir.ResumeFrame, ir.MachineOp)) for i in everything)
    assert not any(isinstance(i, (ir.Load, ir.Store)) and isinstance(i.base, int)
                   and abi.SHARED_PAGE <= i.base < abi.SHARED_PAGE + abi.PAGE_SIZE for i in everything)


def test_user_code_faults_at_the_rewritten_site(tmp_path):
    module = compile_module(tmp_path, KMAIN + "user fn u() -> u64 { return read_cr3(); }", "pv")
    oc = codegen.generate(module)
    u = next(f for f in oc.functions if f.name == "u")
    m = Machine(oc.functions, oc.data)
    with pytest.raises(UcError):
        m.call("u")
    site = m.symbols["u"] + u.sites[0].offset
    assert site <= m.reg("rip") < site + u.sites[0].length and not m.hypercalls


def test_a_queued_entry_names_the_code_that_queued_it(tmp_path):
    module = compile_module(tmp_path, "fn kmain() -> u64 { outb(0x3f8, 65); return 0; }", "pv")
    kmain = module.functions[0]
    instrs = list(kmain.instructions())
    here = [i for i in instrs if isinstance(i, ir.CodeAddr)]
    stores = [i for i in instrs if isinstance(i, ir.Store) and i.offset == 32 and i.value in [h.dst for h in here]]
    assert len(here) == 1 and len(stores) == 1
    oc = codegen.generate(module)

    def multicall(m, nr, args):
        entry = abi.SHARED_PAGE + abi.SH_MC_ENTRIES
        m.queued = [m.read_u64(entry + 8 * k) for k in range(5)]
        return 1

    m = Machine(oc.functions, oc.data, on_hypercall=multicall)
    m.call("kmain")
    nr, port, size, value, result = m.queued
    assert (nr, port, size, value) == (abi.HC_IO_OUT, 0x3F8, 1, 65)
    start = m.symbols["kmain"]
    assert start < result < start + len(oc.functions[0].code)
    assert result in {start + a for a, _, _ in disasm(oc.functions[0])}       # an instruction start


# -- images: user sections, the code rules ---------------------------------------------------------

PROGRAM = """
import "lib/console.pvk" as con;
var tss: [u8; 104] align(16);
var kstack: [u8; 4096] align(4096);
var frame: TrapFrame;
user var counter: u64 = 3;
user var scratch: [u8; 64];
user fn start() { counter += 1; var r = syscall(1, counter, 0, 0); write_cr3(r); }
interrupt fn tick() { }
interrupt fn bp(f: *TrapFrame) { f.rip = f.rip + 1; }
interrupt(error_code) fn gp(f: *TrapFrame) { f.rax = f.error_code; }
syscall fn sys(f: *TrapFrame) { f.rax = con::put(f.rdi); }
fn kmain() -> u64 {
    set_kernel_stack(&tss[0], &kstack[4095] as u64 + 1);
    load_tr(0x28);
    frame.rip = &start as u64;
    if frame.rax == 1 { enter_user(&frame); }
    return USER_TEXT_END - USER_TEXT_START + USER_DATA_END - USER_DATA_START;
}
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    main = write_program(tmp_path_factory.mktemp("um"), {"um.pvk": PROGRAM, **LIB})
    return {t: driver.compile_file(str(main), t) for t in ("native", "pv")}


def segments(image: bytes) -> list[tuple[int, int, int, int]]:
    elf = ELFFile(io.BytesIO(image))
    return [(s["p_vaddr"], s["p_memsz"], s["p_flags"], s["p_filesz"]) for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"]


@pytest.mark.parametrize("target", ["native", "pv"])
def test_user_sections_have_their_own_page_aligned_segments(images, target):
    elf = ELFFile(io.BytesIO(images[target]))
    sym = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
    utext, udata = elf.get_section_by_name(".user.text"), elf.get_section_by_name(".user.data")
    bounds = [sym[n] for n in ("USER_TEXT_START", "USER_TEXT_END", "USER_DATA_START", "USER_DATA_END")]
    assert bounds == [utext["sh_addr"], udata["sh_addr"], udata["sh_addr"], udata["sh_addr"] + 4096]
    assert all(b % 4096 == 0 for b in bounds)
    assert utext["sh_addr"] <= sym["start"] < bounds[1] and bounds[2] <= sym["counter"] < bounds[3]
    kernel_end = max(s["sh_addr"] + s["sh_size"] for s in elf.iter_sections() if s.name == ".bss")
    assert bounds[0] >= kernel_end
    loads = {vaddr: (flags, memsz) for vaddr, memsz, flags, _ in segments(images[target])}
    assert loads[bounds[0]][0] == 5 and loads[bounds[0]][1] <= bounds[1] - bounds[0]        # R-X
    assert loads[bounds[2]][0] == 6 and loads[bounds[2]][1] <= bounds[3] - bounds[2]        # RW
    for s in ("kmain", "tick", "sys", "sys.body", "con::put" if "con::put" in sym else "put"):
        assert sym[s] < kernel_end


def test_pv_image_obeys_the_code_rules(images):
    assert bundle_rules.image_findings(images["pv"]) == []
    assert validate.violations(elfread.load(images["pv"])) == []


def test_every_new_stub_obeys_the_bundle_rules(tmp_path):
    oc = codegen.generate(compile_module(tmp_path, KMAIN + HANDLERS + SYSCALL + ENTER, "pv"))
    for f in oc.functions:
        assert bundle_rules.code_findings(f.code) == [], f.name


def test_diff_pairs_native_and_pv_sites_of_the_new_operations(images):
    d = diff_images(elfread.load(images["native"]), elfread.load(images["pv"]))
    pairs = {(f.name, p.op): p for f in d.functions for p in f.sites}
    for key in [("kmain", "set_kernel_stack"), ("kmain", "load_tr"), ("kmain", "enter_user"),
                ("start", "write_cr3"), ("bp", "iret"), ("gp", "iret"), ("sys", "iret")]:
        assert pairs[key].native is not None and pairs[key].pv is not None, key
    assert pairs["start", "write_cr3"].pv.becomes == "raises #GP in user mode"


# -- a kernel that enters user mode, booted on QEMU ------------------------------------------------

USER_KERNEL = Path(__file__).with_name("usermode_kernel.pvk")


@requires_qemu
@pytest.mark.qemu
def test_native_kernel_enters_user_mode_on_qemu():
    """GDT with user segments and a TSS, #GP gate, syscall MSRs; iretq to a user fn that
    prints through system calls, gets a result back, then faults on `cli`."""
    console, status = qemu_boot(driver.compile_file(str(USER_KERNEL), "native"), timeout=60)
    assert (console, status) == ("to user mode\nhello\ny\n#GP from user mode\n", 3)


@pytest.mark.parametrize("mode", ["bare", "trap", "pv", "hvm", "hvm-shadow"])
def test_the_user_mode_kernel_runs_on_the_runtime(mode):
    from runtime import hypervisor
    image = driver.compile_file(str(USER_KERNEL), "pv" if mode == "pv" else "native")
    result = hypervisor.run(image, mode, timeout=120)
    assert (result.reason, result.console.decode(), result.status) == \
        ("shutdown", "to user mode\nhello\ny\n#GP from user mode\n", 3), result.message


def test_the_user_mode_kernel_obeys_the_code_rules_in_pv():
    image = driver.compile_file(str(USER_KERNEL), "pv")
    assert bundle_rules.image_findings(image) == []
    assert validate.violations(elfread.load(image)) == []


def test_pv_ir_behaves_like_native_ir_with_modules_and_kernel_stacks(tmp_path):
    """The interpreter's models (tests/ir_interp.py, tests/test_paravirt.py): set_kernel_stack
    natively and its stack_switch hypercall leave the same log, around a batched port write."""
    from test_paravirt import NativeMachine, PVMachine, run
    source = ('import "lib/console.pvk" as con;\nvar tss: [u8; 104];\nprivate var idt: u64 = 7;\n'
              "fn kmain() -> u64 {\n    set_kernel_stack(&tss[0], 0x9000); outb(0x3f8, 65);\n"
              "    set_kernel_stack(&tss[0], 0xa000);\n    return con::put(idt);\n}\n")
    native, native_result = run(compile_module(tmp_path, source, "native", LIB), NativeMachine)
    pv, pv_result = run(compile_module(tmp_path, source, "pv", LIB), PVMachine)
    assert native_result == pv_result == 12
    assert native.log == pv.log == [("kernel stack", 0x9000), ("out", 0x3F8, 65), ("kernel stack", 0xA000)]


@pytest.mark.parametrize("mode", ["bare", "trap", "pv"])
def test_the_runtime_loads_images_with_user_sections(tmp_path, mode):
    """What works on the runtime today: the user segments load and their bounds are one page each
    (entering user mode on the runtime is the runtime's part of issue #11)."""
    from runtime import hypervisor
    main = write_program(tmp_path, {"k.pvk": "user var counter: u64 = 3;\n"
                                             "user fn start() -> u64 { counter += 1; return syscall(1, counter, 0, 0); }\n"
                                             "fn kmain() -> u64 { return (USER_TEXT_END - USER_TEXT_START) / 4096 * 10\n"
                                             "    + (USER_DATA_END - USER_DATA_START) / 4096; }\n"})
    result = hypervisor.run(driver.compile_file(str(main), "native" if mode != "pv" else "pv"), mode, timeout=60)
    assert (result.reason, result.status) == ("shutdown", 11), result.message
