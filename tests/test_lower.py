"""Lowering, checked by running the IR: the conformance kernels, small
programs, and the integer semantics of every type against a Python oracle."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pvtool.expect import expectation

from pvtool import ast, ir
from pvtool.typecheck import check
from pvtool.intrinsics import INTRINSICS
from pvtool.lower import lower
from pvtool.parse import parse_program, parse_text

sys.path.insert(0, str(Path(__file__).parent))
import ir_interp  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
KERNELS = sorted((SHARED / "conformance").glob("*.pvk"))

CONSOLE = """
fn putc(c: u8) { while (inb(0x3fd) & 0x20) == 0 { pause(); } outb(0x3f8, c); }
fn puts(s: *u8) { var i: u64 = 0; while s[i] != 0 { putc(s[i]); i += 1; } }
fn put_u64(v: u64) {
    var buf: [u8; 20]; var n: u64 = 0;
    while true { buf[n] = '0' + (v % 10) as u8; n += 1; v /= 10; if v == 0 { break; } }
    while n > 0 { n -= 1; putc(buf[n]); }
}
fn put_i64(v: i64) { if v < 0 { putc('-'); put_u64((0 - v) as u64); } else { put_u64(v as u64); } }
"""


def build(src: str, path: str = "t.pvk") -> ir.Module:
    prog = ast.Program(parse_text(src, path), [path])
    module = lower(check(prog))
    validate(module)
    return module


def execute(src: str) -> ir_interp.Result:
    return ir_interp.run(build(src + CONSOLE))


def validate(m: ir.Module) -> None:
    """The structural rules of pvtool.ir that the back end relies on."""
    for f in m.functions:
        labels = [b.label for b in f.blocks]
        assert labels and labels[0] == "entry" and len(set(labels)) == len(labels), f.name
        reached = {"entry"}
        for b in f.blocks:
            assert b.term is not None, (f.name, b.label)
            for s in b.successors():
                assert s in labels, (f.name, b.label, s)
                reached.add(s)
            for i in [*b.instrs, b.term]:
                assert isinstance(i.loc, ir.Loc), (f.name, i)
                for v in [*i.uses(), *i.defs()]:
                    assert not isinstance(v, ir.VReg) or v.id < f.next_vreg
                    assert not isinstance(v, int) or 0 <= v < 2**64
                if isinstance(i, ir.MachineOp):
                    assert i.op in INTRINSICS
                if isinstance(i, (ir.Ret, ir.IRet)):
                    assert isinstance(i, ir.IRet) == f.interrupt
                    assert (getattr(i, "value", None) is not None) == f.returns_value
        assert reached == set(labels), f"{f.name}: unreachable blocks {set(labels) - reached}"
    names = [d.name for d in m.data]
    assert len(set(names)) == len(names)
    for d in m.data:
        assert d.section in ("rodata", "data", "bss")
        assert (d.init == b"") == (d.section == "bss") and (not d.init or len(d.init) == d.size)


# -- the conformance kernels ---------------------------------------------------------------------------

@pytest.mark.skipif(not KERNELS, reason=f"no conformance kernels in {SHARED}")
@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.stem)
def test_conformance_kernel_runs(path):
    """Every kernel, run on the interpreter's machine (paging, set_pte and
    invlpg are modelled, so paging and oschurn run for real)."""
    module = lower(check(parse_program(str(path))))
    validate(module)
    assert module.files[0] == str(path)
    want = expectation(path)
    result = ir_interp.run(module)
    assert (result.console, result.exit_status) == (want.output, want.status)


# -- small programs -------------------------------------------------------------------------------------

def test_structs_arrays_pointers_and_globals():
    r = execute("""
struct Node { value: u64, next: *Node }
struct Rec { a: u8, b: u32, c: [u16; 3], d: *Rec }
var nodes: [Node; 3];
var table: [u32; 4] = [1, 2, 3, 4];
var grid: [[u8; 3]; 2] = [[1, 2, 3], [4]];
var pick: *u32 = &table[2];
var banner = "ok";
fn push(head: *Node, n: *Node, v: u64) -> *Node { n.value = v; n.next = head; return n; }
fn kmain() -> u64 {
    var head = 0 as *Node;
    for i in 0..3 { head = push(head, &nodes[i], i + 10); }
    var n = head;
    while n as u64 != 0 { put_u64(n.value); putc(' '); n = n.next; }
    var r: Rec;
    r.a = 0xff; r.a += 1; r.c[2] = 0xffff; r.d = &r; r.d.b = 7;
    put_u64(r.a as u64); putc(' '); put_u64(r.c[2] as u64); putc(' '); put_u64(r.b as u64); putc(' ');
    var p: *u32 = &table[0];
    p[3] = p[3] * 10; *(p + 1) = 20;
    put_u64(*pick as u64 + table[1] as u64 + table[3] as u64); putc(' ');
    put_u64(grid[1][0] as u64 + grid[0][2] as u64 + grid[1][2] as u64); putc(' ');
    puts(banner);
    return (&table[3] as u64) - (&table[1] as u64);
}""")
    assert (r.console, r.value) == ("12 11 10 0 65535 7 63 7 ok", 8)


def test_function_pointers_and_interrupt_handlers():
    src = """
var ops: [fn(u64) -> u64; 2] = [&double, &square];
var ticks: u64;
interrupt fn timer() { ticks += 1; if ticks > 10 { return; } ticks += 1; }
fn double(x: u64) -> u64 { return x * 2; }
fn square(x: u64) -> u64 { return x * x; }
fn apply(f: fn(u64) -> u64, x: u64) -> u64 { return f(x); }
fn kmain() -> u64 {
    var f = ops[1];
    var g = &double;
    var raw = &square as u64;
    var h = raw as fn(u64) -> u64;
    var isr: fn() = &timer;
    put_u64(f(3) + g(4) + apply(h, 5) + ops[0](1));
    if isr == &timer && g != f { return 1; }
    return 0;
}"""
    r = execute(src)
    assert (r.console, r.value) == ("44", 1)
    m = build(src + CONSOLE)
    timer = next(f for f in m.functions if f.name == "timer")
    assert timer.interrupt and not timer.params and not timer.returns_value
    assert sum(isinstance(b.term, ir.IRet) for b in timer.blocks) == 2
    kmain = next(f for f in m.functions if f.name == "kmain")
    instrs = list(kmain.instructions())
    assert sum(isinstance(i, ir.CallIndirect) for i in instrs) == 3
    assert {i.symbol for i in instrs if isinstance(i, ir.AddrOf)} >= {"double", "square", "timer"}
    ops = next(d for d in m.data if d.name == "ops")
    assert (ops.section, [(r.offset, r.symbol) for r in ops.relocs]) == ("data", [(0, "double"), (8, "square")])


def test_short_circuit_and_conditions():
    r = execute("""
var calls: u64;
fn side(v: bool) -> bool { calls += 1; return v; }
fn kmain() -> u64 {
    if false && side(true) { return 1; }
    if true || side(true) { } else { return 2; }
    var b = side(false) || side(true);
    var c = !(side(true) && side(false));
    if b && c && calls == 4 && !false { puts("yes"); }
    var x: u64 = 5;
    if x > 3 && (x < 4 || x == 5) { puts(" and"); } else if x == 5 { return 3; } else { return 4; }
    return calls;
}""")
    assert (r.console, r.value) == ("yes and", 4)


def test_loops_break_continue_and_for_semantics():
    r = execute("""
fn kmain() -> u64 {
    var n: u64 = 4;
    var t: u64 = 0;
    for i in 0..n { n = 100; i = 50; t += 1; }       // bounds once, i is a copy
    var s: i64 = 0;
    var lo: i64 = -3;
    for j in lo..2 { s += j; }                        // signed range
    var u: u64 = 0;
    for k in 0..10 { if k == 2 { continue; } if k == 5 { break; } u += k; }
    for e in 5..1 { u += 1000; }                      // empty
    var w: u64 = 0;
    while true { w += 1; if w == 7 { break; } }
    put_u64(t); putc(' '); put_i64(s); putc(' '); put_u64(u); putc(' '); put_u64(w);
    return 0;
}""")
    assert r.console == "4 -5 8 7"


def test_locals_start_at_zero_every_time():
    r = execute("""
struct Big { a: [u64; 20], b: u8 }
fn kmain() -> u64 {
    var total: u64 = 0;
    for i in 0..3 {
        var x: u64;
        var small: [u8; 21];
        var big: Big;
        var arr: [u32; 5] = [7, 8];
        total += x + small[20] as u64 + big.a[19] + big.b as u64 + arr[1] as u64 + arr[4] as u64;
        x = 99; small[20] = 9; big.a[19] = 9; big.b = 9; arr[4] = 9;
    }
    return total;
}""")
    assert r.value == 24


def test_address_taken_locals_and_parameters():
    src = """
fn bump(p: *u64) { *p += 1; }
fn f(x: u64) -> u64 { bump(&x); bump(&x); return x; }
fn g(x: u64) -> u64 { var y = x; y += 1; return y; }
fn kmain() -> u64 { var a: u8 = 250; var p = &a; *p += 10; return f(40) + g(1) + a as u64; }"""
    assert execute(src).value == 42 + 2 + 4
    m = build(src + CONSOLE)
    fns = {f.name: f for f in m.functions}
    assert len(fns["f"].slots) == 1 and fns["g"].slots == []
    assert len(fns["kmain"].slots) == 1 and fns["kmain"].slots[0].size == 1


def test_compound_assignment_evaluates_the_target_once():
    r = execute("""
var a: [u64; 4];
var n: u64;
fn next() -> u64 { n += 1; return n; }
fn kmain() -> u64 { a[next()] += 5; a[next()] <<= 1; a[2] |= 8; return a[1] * 100 + a[2] * 10 + n; }""")
    assert r.value == 5 * 100 + 8 * 10 + 2


def test_recursion():
    r = execute("""
fn ack(m: u64, n: u64) -> u64 {
    if m == 0 { return n + 1; }
    if n == 0 { return ack(m - 1, 1); }
    return ack(m - 1, ack(m, n - 1));
}
fn kmain() -> u64 { return ack(2, 3); }""")
    assert r.value == 9


def test_early_exit_through_the_debug_port():
    r = execute("fn kmain() -> u64 { puts(\"bye\"); outb(0xf4, 7); return 1; }")
    assert (r.console, r.value, r.exit_status) == ("bye", None, 7)


@pytest.mark.parametrize("expr", ["a / b", "a % b", "m / (b - 1)", "m % (b - 1)"])
def test_division_faults_at_run_time(expr):
    m = build(f"fn kmain() -> u64 {{ var a: i64 = 7; var b: i64 = 0; var m: i64 = -9223372036854775807 - 1;"
              f" return ({expr}) as u64; }}")
    with pytest.raises(ir_interp.Fault, match="#DE"):
        ir_interp.run(m)


def test_narrow_signed_division_wraps():
    r = execute("fn kmain() -> u64 { var m: i8 = -128; var d: i8 = -1; put_i64((m / d) as i64);"
                " putc(' '); put_i64((m % d) as i64); return 0; }")
    assert r.console == "-128 0"


def test_strings_are_deduplicated_rodata():
    m = build('var a = "same"; fn kmain() -> u64 { var b = "same"; var c = "other\\n"; return 0; }')
    strings = [d for d in m.data if d.section == "rodata"]
    assert sorted(d.init for d in strings) == [b"other\n\0", b"same\0"]
    assert all(d.name.startswith(".str.") and d.align == 1 for d in strings)
    a = next(d for d in m.data if d.name == "a")
    assert a.relocs == [ir.DataReloc(0, next(d.name for d in strings if d.init == b"same\0"), 0)]


def test_global_sections_and_initial_bytes():
    m = build("var z: [u64; 100];\nvar zero: u32 = 0;\nvar t: [i16; 3] = [-1, 2];\nvar b: bool = true;\n"
              "var p: *u8 = &t[1] as *u8;\nvar np: *u8 = 0 as *u8;\nvar hi: *u8 = 0x1000 as *u8;\n"
              "fn kmain() -> u64 { return 0; }")
    d = {x.name: x for x in m.data}
    assert (d["z"].section, d["z"].size, d["z"].align) == ("bss", 800, 8)
    assert d["zero"].section == "bss"
    assert (d["t"].section, d["t"].init, d["t"].align) == ("data", b"\xff\xff\x02\x00\x00\x00", 2)
    assert d["b"].init == b"\x01"
    assert d["p"].relocs == [ir.DataReloc(0, "t", 2)]
    assert (d["np"].section, d["hi"].init) == ("bss", (0x1000).to_bytes(8, "little"))


# One call of each intrinsic, in the function of test_every_intrinsic_is_one_machine_op.
INTRINSIC_CALLS = {
    "cli": "cli()", "sti": "sti()", "hlt": "hlt()", "save_flags": "x = save_flags()",
    "restore_flags": "restore_flags(x)", "outb": "outb(1, 2)", "outw": "outw(1, 2)", "outl": "outl(1, 2)",
    "inb": "x = inb(1) as u64", "inw": "x = inw(1) as u64", "inl": "x = inl(1) as u64",
    "read_cr0": "x = read_cr0()", "read_cr2": "x = read_cr2()", "read_cr3": "x = read_cr3()",
    "read_cr4": "x = read_cr4()", "write_cr0": "write_cr0(x)", "write_cr3": "write_cr3(x)",
    "write_cr4": "write_cr4(x)", "invlpg": "invlpg(x)", "set_pte": "set_pte(&x, 3)",
    "lgdt": "lgdt(&b[0])", "lidt": "lidt(&b[0])", "sgdt": "sgdt(&b[0])", "sidt": "sidt(&b[0])",
    "rdmsr": "x = rdmsr(0xc0000080)", "wrmsr": "wrmsr(0xc0000080, x)", "cpuid": "cpuid(0, &r[0])",
    "rdtsc": "x = rdtsc()", "wbinvd": "wbinvd()", "pause": "pause()", "swtch": "swtch(&x, 0)",
    "syscall": "x = syscall(1, 2, 3, 4)", "set_kernel_stack": "set_kernel_stack(&b[0], x)",
    "load_tr": "load_tr(0x28)", "enter_user": "enter_user(&f)",
}


def test_every_intrinsic_is_one_machine_op():
    calls = INTRINSIC_CALLS
    assert set(calls) == set(INTRINSICS)
    lines = "\n".join(f"    {c};" for c in calls.values())
    m = build(f"fn kmain() -> u64 {{\n    var x: u64; var b: [u8; 10]; var r: [u32; 4]; var f: TrapFrame;\n{lines}\n    return x;\n}}")
    ops = [i for i in m.functions[0].instructions() if isinstance(i, ir.MachineOp)]
    assert [o.op for o in ops] == list(calls)
    for line, o in enumerate(ops, start=3):
        assert (o.loc.line, o.loc.col) == (line, 5 if o.dst is None else 9)
        assert (o.dst is not None) == (INTRINSICS[o.op].result is not None)
        assert len(o.args) == len(INTRINSICS[o.op].params)


def test_narrow_values_stay_canonical():
    m = build("fn f(a: u8, b: i16, c: u64) -> u64 { var x = a + a; var y = b * b; var z = c + c;"
              " var w = a / a; var s = b >> 1; var q = b / b; return x as u64 + y as u64 + z + w as u64"
              " + s as u64 + q as u64; }\nfn kmain() -> u64 { return f(1, 2, 3); }")
    f = m.functions[0]
    instrs = [i for i in f.instructions() if isinstance(i, (ir.BinOp, ir.Ext))]
    shape = [(i.op, i.a == i.b) if isinstance(i, ir.BinOp) else ("ext", i.bits, i.signed) for i in instrs]
    assert shape[:9] == [("add", True), ("ext", 8, False), ("mul", True), ("ext", 16, True),
                         ("add", True), ("udiv", True), ("sar", False), ("sdiv", True), ("ext", 16, True)]


def test_signed_comparisons_and_loads():
    m = build("var g: i32 = -5;\nfn kmain() -> u64 { var a: i32 = g; var b: u32 = 3;"
              " if a < 0 && b < 4 { return 1; } return 0; }")
    instrs = list(m.functions[0].instructions())
    load = next(i for i in instrs if isinstance(i, ir.Load))
    assert (load.size, load.signed) == (4, True)
    assert [i.op for i in instrs if isinstance(i, ir.Cmp)] == ["slt", "ult"]
    assert ir_interp.run(m).value == 1


def test_unreachable_code_is_dropped():
    m = build("fn kmain() -> u64 { return 1; var x: u64 = 2; x += 1; }")
    (f,) = m.functions
    assert [b.label for b in f.blocks] == ["entry"] and f.blocks[0].term == ir.Ret(1, loc=f.blocks[0].term.loc)


@pytest.mark.parametrize("body", [
    "while x < 9 { return 1; x = 2; } return 0;",        # code after a return
    "while x < 9 { break; x = 2; } return 0;",           # ... and after a break
    "if false { x = 1; } return x;",                     # the side of a constant condition not taken
    "if x == 0 || true { return 1; } return 2;",
    "while true { x += 1; } return x;",                  # a loop only a break could leave
    "if x == 0 { } while x < 3 { x += 1; } return x;",   # an empty join, skipped by the jumps
])
def test_blocks_nothing_reaches_are_dropped(body):
    """Each way lowering can make a block nothing jumps to (build() checks that none is left)."""
    (f,) = build(f"fn kmain() -> u64 {{ var x: u64 = 0; {body} }}").functions
    assert len({b.label for b in f.blocks}) == len(f.blocks)


# -- integer semantics of every type, against a Python oracle -------------------------------------------

TYPES = {f"{s}{b}": (b, s == "i") for s in "ui" for b in (8, 16, 32, 64)}
BINOPS = ["+", "-", "*", "/", "%", "&", "|", "^", "<<", ">>", "<", "<=", ">", ">=", "==", "!="]


def wrap(v: int, bits: int, signed: bool) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if signed and v >> (bits - 1) else v


def edge_values(bits: int, signed: bool) -> list[int]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    vals = [0, 1, 2, 3, 7, 63, hi, hi - 1, lo, lo + 1, wrap(0x5A5A_A5A5_1234_8765, bits, signed), hi // 3]
    if signed:
        vals += [-1, -2, -7, -64]
    return list(dict.fromkeys(vals))


def oracle(op: str, a: int, b: int, bits: int, signed: bool) -> int | None:
    """a OP b as PVK defines it; None where the machine faults."""
    if op in ("/", "%"):
        if b == 0:
            return None
        q = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)
        if bits == 64 and signed and q == 1 << 63:
            return None
        return wrap(q if op == "/" else a - q * b, bits, signed)
    if op in ("<<", ">>"):
        n = (b & (2**64 - 1)) % 64                # the count's canonical register, modulo 64
        return wrap(a << n if op == "<<" else a >> n, bits, signed)
    if op in ("<", "<=", ">", ">=", "==", "!="):
        return int(eval(f"a {op} b"))
    return wrap(eval(f"a {op} b"), bits, signed)


def literal(v: int, ty: str) -> str:
    return f"({v} as {ty})" if v >= 0 else f"(0 - {-v} as {ty})"


@pytest.mark.parametrize("ty", TYPES)
def test_integer_semantics_at_run_time(ty):
    """Every binary operator, unary -, ~ and every conversion, on operands
    loaded from memory, so nothing is folded."""
    bits, signed = TYPES[ty]
    vals = edge_values(bits, signed)
    n = len(vals)
    per = len(BINOPS) + 2
    init = ", ".join(str(v) for v in vals)
    guarded = ["/", "%"]
    body = []
    for k, op in enumerate(BINOPS):
        e = f"(a {op} b) as u64"
        if op in guarded:
            body.append(f"if b != 0 && !(a == lo && b == m1 && wide) {{ out[k + {k}] = {e}; }}")
        else:
            body.append(f"out[k + {k}] = {e};")
    body.append(f"out[k + {len(BINOPS)}] = (-a) as u64; out[k + {len(BINOPS) + 1}] = (~a) as u64;")
    casts = "\n        ".join(f"conv[i * 8 + {t}] = (a as {name}) as u64;" for t, name in enumerate(TYPES))
    lo = min(vals)
    src = f"""
var vals: [{ty}; {n}] = [{init}];
var out: [u64; {n * n * per}];
var conv: [u64; {n * 8}];
fn kmain() -> u64 {{
    var k: u64 = 0;
    var lo: {ty} = {literal(lo, ty)};
    var m1: {ty} = {literal(-1, ty) if signed else '0'};
    var wide = {'true' if bits == 64 and signed else 'false'};
    for i in 0..{n} {{
        var a = vals[i];
        {casts}
        for j in 0..{n} {{
            var b = vals[j];
            {chr(10).join(body)}
            k += {per};
        }}
    }}
    return k;
}}"""
    result = ir_interp.run(build(src))
    out = result.machine.read_global("out", 8, n * n * per)
    conv = result.machine.read_global("conv", 8, n * 8)
    for i, a in enumerate(vals):
        for t, (tb, ts) in enumerate(TYPES.values()):
            assert conv[i * 8 + t] == wrap(a, tb, ts) % 2**64, (ty, a, list(TYPES)[t])
        for j, b in enumerate(vals):
            got = out[(i * n + j) * per:(i * n + j + 1) * per]
            for k, op in enumerate(BINOPS):
                want = oracle(op, a, b, bits, signed)
                assert got[k] == (0 if want is None else want % 2**64), (ty, a, op, b)
            assert got[-2:] == [wrap(-a, bits, signed) % 2**64, wrap(~a, bits, signed) % 2**64], (ty, a)


@pytest.mark.parametrize("ty", TYPES)
def test_integer_semantics_of_constant_folding(ty):
    """The same operators folded at compile time, into a global's initial bytes."""
    bits, signed = TYPES[ty]
    vals = edge_values(bits, signed)[:8] + ([-1, -7] if signed else [])
    exprs, wants = [], []
    for a in vals:
        for b in vals:
            for op in BINOPS:
                want = oracle(op, a, b, bits, signed)
                if want is not None:
                    exprs.append(f"({literal(a, ty)} {op} {literal(b, ty)}) as u64")
                    wants.append(want % 2**64)
        exprs.append(f"(-{literal(a, ty)}) as u64")
        wants.append(wrap(-a, bits, signed) % 2**64)
    src = f"var out: [u64; {len(exprs)}] = [{', '.join(exprs)}];\nfn kmain() -> u64 {{ return 0; }}"
    result = ir_interp.run(build(src))
    assert result.machine.read_global("out", 8, len(exprs)) == wants
