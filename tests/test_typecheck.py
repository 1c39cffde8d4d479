"""The checker: one test per kind of error (exact position and message),
robustness against hostile input, and the annotations lower relies on."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from pvtool import ast
from pvtool.typecheck import check
from pvtool.diagnostics import MAX_NESTING, CompileError
from pvtool.lower import lower
from pvtool.parse import parse_program, parse_text
from pvtool.types import I8, U8, U64, ArrayType, FnType, PtrType, StructType

KMAIN = "fn kmain() -> u64 { return 0; }\n"


def checked(src: str, path: str = "t.pvk") -> ast.Program:
    return check(ast.Program(parse_text(src, path), [path]))


def marked(src: str) -> tuple[str, int, int]:
    """Source with a `$` marking where the error must be reported: the
    source without it, and the line and column of the mark."""
    at = src.index("$")
    before = src[:at]
    line = before.count("\n") + 1
    col = at - (before.rfind("\n") + 1) + 1
    return src[:at] + src[at + 1:], line, col


ERRORS = [
    # names
    ("unknown name", "fn kmain() -> u64 { return $x; }", "unknown name 'x'"),
    ("unknown function", KMAIN + "fn f() { $nothing(); }", "unknown function 'nothing'"),
    ("unknown type", KMAIN + "var x: $Foo;", "unknown type 'Foo'"),
    ("unknown field", KMAIN + "struct S { a: u8 }\nfn f(s: *S) -> u8 { return s.$b; }",
     "struct 'S' has no field 'b'"),
    ("field of non-struct", KMAIN + "fn f(x: u64) -> u64 { return x.$b; }", "a u64 has no field 'b'"),
    ("duplicate global", KMAIN + "var x: u64;\n$var x: u8;",
     "duplicate definition of 'x' (first defined at t.pvk:2:1)"),
    ("duplicate function", KMAIN + "$fn kmain() -> u64 { return 1; }",
     "duplicate definition of 'kmain' (first defined at t.pvk:1:1)"),
    ("duplicate struct", KMAIN + "struct S { a: u8 }\n$struct S { b: u8 }",
     "duplicate definition of struct 'S' (first defined at t.pvk:2:1)"),
    ("duplicate local", KMAIN + "fn f() { var x: u64; $var x: u64; }",
     "'x' is already declared in this scope (at t.pvk:2:10)"),
    ("local clashes with parameter", KMAIN + "fn f(x: u64) { $var x = 1; }",
     "'x' is already declared in this scope (at t.pvk:2:6)"),
    ("duplicate field", KMAIN + "struct S { a: u8, $a: u16 }", "duplicate field 'a' in struct 'S'"),
    ("struct named like a builtin", KMAIN + "$struct u8 { a: u8 }", "'u8' is a built-in type"),
    ("item named like an intrinsic", KMAIN + "$fn outb() { }", "'outb' is the name of a machine operation"),
    ("intrinsic used as a value", KMAIN + "fn f() { var p = $pause; }",
     "machine operation 'pause' can only be called"),
    ("function used as a value", KMAIN + "fn f() { var p = $f; }",
     "function 'f' is not a value; write &f for its address"),
    ("empty struct", KMAIN + "$struct S { }", "struct 'S' has no fields"),
    ("recursive struct", KMAIN + "$struct A { b: B }\nstruct B { a: A }", "struct 'A' contains itself"),
    ("recursive constant", KMAIN + "$const A: u64 = B;\nconst B: u64 = A;", "constant 'A' depends on itself"),
    ("recursive global type", KMAIN + "$var a = &b;\nvar b = &a;", "the type of 'a' depends on itself"),
    # kmain
    ("kmain with the wrong type", "$fn kmain() -> u8 { return 0; }",
     "'kmain' must be declared 'fn kmain() -> u64'"),
    ("kmain with parameters", "$fn kmain(x: u64) -> u64 { return x; }",
     "'kmain' must be declared 'fn kmain() -> u64'"),
    # types of operands
    ("mismatched operands", KMAIN + "fn f(a: u8, b: u64) -> u64 { return a $+ b; }",
     "operands of '+' have different types: u8 and u64"),
    ("mismatched comparison", KMAIN + "fn f(a: u8, b: u64) -> bool { return a $< b; }",
     "operands of '<' have different types: u8 and u64"),
    ("arithmetic on bool", KMAIN + "fn f() { var x = 1 $+ true; }",
     "operator '+' needs integer operands, found u64 and bool"),
    ("ordering bools", KMAIN + "fn f(a: bool) -> bool { return a $< a; }",
     "operator '<' cannot compare values of type bool"),
    ("shift of a bool", KMAIN + "fn f(a: bool) { var x = a $<< 1; }",
     "operator '<<' needs integer operands, found bool and u64"),
    ("negating a bool", KMAIN + "fn f() { var x = $-true; }",
     "operator '-' needs an integer operand, found bool"),
    ("not of an integer", KMAIN + "fn f() { var x = !$1; }", "operand of '!': expected bool, found u64"),
    ("logic on integers", KMAIN + "fn f(a: u64) -> bool { return $a && true; }",
     "left operand of '&&': expected bool, found u64"),
    ("literal too big", "fn kmain() -> u64 { var a: u8 = $300; return 0; }",
     "integer literal 300 does not fit in u8"),
    ("negative literal too big", KMAIN + "var x: i8 = -$129;", "integer literal 129 does not fit in i8"),
    ("signed literal too big", KMAIN + "var x: i8 = $128;", "integer literal 128 does not fit in i8"),
    ("condition not bool", "fn kmain() -> u64 { if $1 { } return 0; }", "condition: expected bool, found u64"),
    ("while condition not bool", KMAIN + "fn f(x: *u8) { while $x { } }", "condition: expected bool, found *u8"),
    ("bad argument type", KMAIN + "fn f() { outb(0x3f8, $0x3f8 as u16); }",
     "argument 2 of 'outb': expected u8, found u16"),
    ("wrong argument count", KMAIN + "fn g(a: u64) { }\nfn f() { $g(1, 2); }", "'g' takes 1 argument, 2 given"),
    ("wrong intrinsic argument count", KMAIN + "fn f() { $outb(1); }", "'outb' takes 2 arguments, 1 given"),
    ("void call as value", KMAIN + "fn g() { }\nfn f() -> u64 { return $g(); }", "this call returns no value"),
    ("calling a non-function", KMAIN + "fn f() { var x: u64 = 5; $x(); }", "cannot call a value of type u64"),
    ("indirect call argument", KMAIN + "fn f(h: fn(u8)) { h($true); }",
     "argument 1 of 'h': expected u8, found bool"),
    ("call through an expression", KMAIN + "fn f(t: *fn(u8)) { t[1]($true); }",
     "argument 1 of this function: expected u8, found bool"),
    ("bad cast", KMAIN + "fn f(p: *u8) -> bool { return $p as bool; }", "cannot convert *u8 to bool"),
    ("pointer to narrow int", KMAIN + "fn f(p: *u8) -> u32 { return $p as u32; }", "cannot convert *u8 to u32"),
    ("deref of an integer", KMAIN + "fn f(x: u64) -> u64 { return $*x; }", "cannot dereference a value of type u64"),
    ("index of an integer", KMAIN + "fn f(x: u64) -> u64 { return $x[0]; }", "cannot index a value of type u64"),
    ("index not u64", KMAIN + "fn f(p: *u8, i: u32) -> u8 { return p[$i]; }", "index: expected u64, found u32"),
    ("constant index out of bounds", KMAIN + "fn f() { var a: [u8; 2]; a[$2] = 1; }",
     "index 2 is out of bounds for [u8; 2]"),
    ("pointer offset not u64", KMAIN + "fn f(p: *u8, n: u8) -> *u8 { return p + $n; }",
     "pointer offset: expected u64, found u8"),
    ("integer plus pointer", KMAIN + "fn f(p: *u8) -> *u8 { return 1 $+ p; }",
     "pointer arithmetic is written p + n, with n a u64"),
    ("return value type", KMAIN + "fn f() -> u64 { return $true; }", "return value: expected u64, found bool"),
    ("initialiser type", KMAIN + "fn f() { var x: u8 = 'a' $== 'b'; }",
     "initialiser of 'x': expected u8, found bool"),
    ("range bounds", KMAIN + "fn f() { for i in $0..true { } }",
     "range bounds must be integers of one type, found u64 and bool"),
    # lvalues
    ("assign to literal", KMAIN + "fn f() { $1 = 2; }", "cannot assign to this expression"),
    ("assign to constant", KMAIN + "const C: u64 = 1;\nfn f() { $C = 2; }", "cannot assign to constant 'C'"),
    ("assign to call", KMAIN + "fn g() -> u64 { return 1; }\nfn f() { $g() = 2; }",
     "cannot assign to this expression"),
    ("assign wrong type", KMAIN + "fn f(p: *u8) { p = $1; }", "assigned value: expected *u8, found u64"),
    ("compound assign type", KMAIN + "fn f(x: u64) { x $+= true; }",
     "operator '+=' needs integer operands, found u64 and bool"),
    ("address of constant", KMAIN + "const C: u64 = 1;\nfn f() { var p = &$C; }",
     "cannot take the address of constant 'C'"),
    ("address of literal", KMAIN + "fn f() { var p = &$5; }", "cannot take the address of this expression"),
    # aggregates
    ("assign whole array", KMAIN + "fn f() { var a: [u8; 4]; var b: [u8; 4]; $a = b; }",
     "cannot assign a whole [u8; 4]; assign its elements or fields"),
    ("copy in an initialiser", KMAIN + "struct S { a: u8 }\nfn f(p: *S) { var s: S = $*p; }",
     "initialiser of 's': cannot copy a whole S; initialise its elements or fields"),
    ("array as value", KMAIN + "fn f() { var a: [u8; 4]; var b = $a; }",
     "a [u8; 4] cannot be used as a value (use & or index it)"),
    ("struct parameter", KMAIN + "struct S { a: u8 }\nfn f(s: $S) { }",
     "parameter of type S: structs and arrays are passed by pointer"),
    ("array result", KMAIN + "fn f() -> $[u8; 4] { }", "cannot return a value of type [u8; 4]; return a pointer"),
    ("array literal in an expression", KMAIN + "fn f(x: u64) { x = $[1]; }",
     "an array literal can only initialise an array variable"),
    ("array literal without a type", KMAIN + "fn f() { var x = $[1, 2]; }",
     "'x' needs a type: write var x: [T; N] = [...]"),
    ("too many elements", KMAIN + "var a: [u8; 2] = [1, 2, $3];", "initialiser of 'a': too many elements for [u8; 2]"),
    ("array literal for a scalar", KMAIN + "var a: u64 = $[1];",
     "initialiser of 'a': an array literal cannot initialise a u64"),
    # constants and globals
    ("array size not constant", KMAIN + "var n: u64 = 4;\nvar a: [u8; $n];", "array size must be a constant expression"),
    ("array size zero", KMAIN + "fn f() { var a: [u8; $0]; }", "array size must be positive, not 0"),
    ("array too large", KMAIN + "var a: $[u64; 0x10000000];", "array is too large (2 GiB or more)"),
    ("constant not constant", KMAIN + "var v: u64 = 1;\nconst A: u64 = $v;",
     "value of constant 'A' must be a constant expression"),
    ("constant division by zero", KMAIN + "const Z: u64 = 1 + 1 $/ 0;",
     "value of constant 'Z': division by zero or overflow in '/'"),
    ("constant i64 overflow", KMAIN + "const Z: i64 = (-9223372036854775807 - 1) $/ -1;",
     "value of constant 'Z': division by zero or overflow in '/'"),
    ("constant of pointer type", KMAIN + "const P: $*u8 = 0;", "constant 'P' must have an integer or bool type, not *u8"),
    ("global initialiser not constant", KMAIN + "fn g() -> u64 { return 1; }\nvar a: u64 = $g();",
     "initialiser of 'a' must be a constant, a string, an address or an array literal"),
    ("global address of a local path", KMAIN + "var p: *u8;\nvar q: *u8 = $&p[1];",
     "initialiser of 'q' must be a constant, a string, an address or an array literal"),
    ("untyped uninitialised local", KMAIN + "fn f() { $var x; }", "'x' needs a type or an initialiser"),
    ("untyped uninitialised global", KMAIN + "$var x;", "'x' needs a type or an initialiser"),
    # functions and control flow
    ("too many parameters", KMAIN + "fn f(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, $g: u64) { }",
     "'f' has 7 parameters; at most 6 are allowed"),
    ("function pointer type with too many parameters", KMAIN + "var h: $fn(u8, u8, u8, u8, u8, u8, u8);",
     "a function takes at most 6 parameters, not 7"),
    ("break outside loop", "fn kmain() -> u64 { $break; }", "'break' outside a loop"),
    ("continue outside loop", "fn kmain() -> u64 { $continue; }", "'continue' outside a loop"),
    ("missing return value", KMAIN + "fn f() -> u64 { $return; }", "'f' must return a u64"),
    ("value in void function", KMAIN + "fn f() { return $1; }", "'f' does not return a value"),
    ("falls off the end", "fn kmain() -> u64 { $}", "'kmain' can reach the end of its body without returning a value"),
    ("falls off an if", KMAIN + "fn f(c: bool) -> u64 {\n  if c { return 1; }\n$}",
     "'f' can reach the end of its body without returning a value"),
    ("falls out of a loop with break", KMAIN + "fn f() -> u64 { while true { break; } $}",
     "'f' can reach the end of its body without returning a value"),
    ("interrupt fn with a parameter", KMAIN + "interrupt fn h(x: $u64) { }",
     "the parameter of interrupt fn 'h' must be a *TrapFrame, not u64"),
    ("interrupt fn with a result", KMAIN + "interrupt fn h() -> $u64 { return 1; }",
     "interrupt fn 'h' cannot return a value"),
    ("calling an interrupt fn", KMAIN + "interrupt fn h() { }\nfn f() { $h(); }", "interrupt fn 'h' cannot be called"),
    ("interrupt fn returning a value", KMAIN + "interrupt fn h() { return $1; }", "'h' does not return a value"),
    ("aggregate expression statement", KMAIN + "var a: [u8; 2];\nfn f() { $a; }",
     "a [u8; 2] value cannot be used as a statement"),
]


@pytest.mark.parametrize("src, message", [(s, m) for _, s, m in ERRORS], ids=[k for k, _, _ in ERRORS])
def test_error(src, message):
    text, line, col = marked(src)
    with pytest.raises(CompileError) as e:
        checked(text)
    assert (e.value.message, e.value.loc.line, e.value.loc.col) == (message, line, col)


def test_error_kinds_are_distinct():
    assert len({k for k, _, _ in ERRORS}) == len(ERRORS)


def test_missing_kmain_is_reported_at_the_start_of_the_main_file():
    with pytest.raises(CompileError) as e:
        checked("fn main() -> u64 { return 0; }", "k.pvk")
    assert str(e.value).splitlines()[0] == "k.pvk:1:1: error: the program has no 'fn kmain() -> u64'"


def test_error_format_quotes_the_line_with_a_caret():
    src = "fn kmain() -> u64 {\n\tvar a: u8 = 1;\n\treturn a +  b;\n}"
    with pytest.raises(CompileError) as e:
        checked(src, "fmt.pvk")
    assert str(e.value) == "fmt.pvk:3:14: error: unknown name 'b'"     # no text attached
    assert e.value.format({"fmt.pvk": src}) == ("fmt.pvk:3:14: error: unknown name 'b'\n"
                                                "\treturn a +  b;\n"
                                                "\t            ^")


# -- hostile input: always a CompileError -------------------------------------------------------------

def compile_file(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "in.pvk"
    p.write_bytes(data)
    lower(check(parse_program(str(p))))


HOSTILE = {
    "empty": b"",
    "only comment": b"// nothing\n",
    "binary junk": bytes(random.Random(1).randrange(256) for _ in range(4000)),
    "all bytes": bytes(range(256)) * 4,
    "nul byte": b"fn kmain() -> u64 { \x00 }",
    "non-utf8 in comment": b"fn kmain() -> u64 {\n  return 0; // \xff\xfe\n}",
    "latin-1 string": b'fn kmain() -> u64 { puts("caf\xe9"); return 0; }',
    "unterminated string": b'fn kmain() -> u64 { puts("abc); }',
    "unterminated comment": b"fn kmain() -> u64 { /* ",
    "unterminated char": b"fn kmain() -> u64 { return 'a",
    "10000 parentheses": b"fn kmain() -> u64 { return " + b"(1 + " * 10000 + b"1" + b")" * 10000 + b"; }",
    "10000 blocks": b"fn kmain() -> u64 { " + b"{" * 10000 + b"}" * 10000 + b" return 0; }",
    "10000 ifs": b"fn kmain() -> u64 { " + b"if true { " * 10000 + b"}" * 10000 + b" return 0; }",
    "10000 negations": b"fn kmain() -> u64 { return " + b"-" * 10000 + b"1; }",
    "10000 additions": b"fn kmain() -> u64 { return " + b"1 + " * 10000 + b"1; }",
    "10000 calls": b"fn kmain() -> u64 { return " + b"kmain(" * 10000 + b")" * 10000 + b"; }",
    "10000 pointer types": b"var a: " + b"*" * 10000 + b"u8; fn kmain() -> u64 { return 0; }",
    "10000 unclosed braces": b"fn kmain() -> u64 { " + b"{" * 10000,
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_gives_compile_error(tmp_path, data):
    with pytest.raises(CompileError) as e:
        compile_file(tmp_path, data)
    assert e.value.message and str(e.value).startswith(str(tmp_path / "in.pvk"))


def test_non_utf8_position(tmp_path):
    with pytest.raises(CompileError) as e:
        compile_file(tmp_path, b"fn kmain() -> u64 {\n  return 0; // \xff\xfe\n}")
    assert (e.value.loc.line, e.value.loc.col, e.value.message) == (2, 16, "source is not valid UTF-8")


def test_deep_nesting_reports_the_limit(tmp_path):
    with pytest.raises(CompileError) as e:
        compile_file(tmp_path, b"fn kmain() -> u64 { return " + b"-" * 10000 + b"1; }")
    assert e.value.message == f"program nested too deeply (more than {MAX_NESTING} levels)"


def test_nesting_just_inside_the_limit_compiles(tmp_path):
    # Each `if` is two levels (statement and block), each `(x + ...)` one.
    ifs, sums = 60, MAX_NESTING - 130
    src = ("fn kmain() -> u64 { var x: u64 = 1; " + "if true { " * ifs + "x = " +
           "(x + " * sums + "1" + ")" * sums + ";" + "}" * ifs + " return x; }")
    compile_file(tmp_path, src.encode())


def test_random_mutations_never_crash(tmp_path):
    """Byte-level mutations of a real program: every outcome is success or CompileError."""
    base = (b"struct S { a: u8, b: *S }\nvar g: [u32; 4] = [1, 2];\nconst K: u64 = 3 << 2;\n"
            b"fn f(s: *S, n: u64) -> u64 { var t = 0; for i in 0..n { t += s.a as u64 + i; }"
            b" if t > K && !(n == 0) { return t; } else { return ~t; } }\n"
            b"fn kmain() -> u64 { var s: S; s.b = &s; outb(0x3f8, 'x'); return f(&s, 3); }\n")
    rng = random.Random(7)
    outcomes = set()
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                del data[i]
            elif op == 1:
                data.insert(i, rng.choice(b"{}()[];,.:*&-+!<>=\"'/x0_9 \n\xff"))
            else:
                data[i] = rng.randrange(256)
        try:
            compile_file(tmp_path, bytes(data))
            outcomes.add("ok")
        except CompileError:
            outcomes.add("error")
    assert "error" in outcomes


# -- what the checker records ---------------------------------------------------------------------------

def find(prog: ast.Program, name: str):
    return next(i for i in prog.items if getattr(i, "name", None) == name)


def test_struct_layout_is_c_like():
    prog = checked(KMAIN + "struct S { a: u8, b: u32, c: [u16; 3], d: *S, e: u8 }\nvar s: S;")
    st = find(prog, "s").sym.type
    assert isinstance(st, StructType)
    assert [(f.name, f.offset) for f in st.info.fields] == [("a", 0), ("b", 4), ("c", 8), ("d", 16), ("e", 24)]
    assert (st.info.size, st.info.align) == (32, 8)


def test_constants_fold_with_wrapping():
    prog = checked(KMAIN + "const A: u8 = 200 + 100;\nconst B: i8 = -128;\nconst C: u64 = 0 - 1;\n"
                   "const D: i32 = -7 / 2;\nconst E: u16 = (0x12345 as u16) >> 4;\nconst F: bool = A < 50 && !false;\n"
                   "const G: u64 = LATER * 2;\nconst LATER: u64 = 21;\nconst H: i8 = 200 as i8;")
    values = {n: find(prog, n).sym.value for n in "ABCDEFGH"}
    assert values == {"A": 44, "B": -128, "C": 2**64 - 1, "D": -3, "E": 0x234, "F": 1, "G": 42, "H": -56}


def test_literal_types_come_from_context():
    prog = checked("fn kmain() -> u64 { var a: i16 = 5; var b = a + 1; var c = 1 < a; var d = 7;"
                   " var e = (3 as u8) * 2; var f: u8 = 'a' + 1; return 0; }")
    stmts = find(prog, "kmain").body.stmts
    types = {s.name: s.sym.type for s in stmts if isinstance(s, ast.VarStmt)}
    assert [str(types[n]) for n in "abcdef"] == ["i16", "i16", "bool", "u64", "u8", "u8"]
    assert stmts[2].init.left.type.name == "i16"                 # the literal 1 in `1 < a`


def test_global_static_values():
    prog = checked(KMAIN + "struct P { x: u32, y: u32 }\nvar pts: [P; 2];\nvar t: [u16; 3] = [1, 2];\n"
                   "var s = \"hi\";\nvar q: *u32 = &pts[1].y;\nvar h: fn() -> u64 = &kmain;\n"
                   "var n: u64 = &kmain as u64;\nvar b: bool = true;\nvar m: i8 = -1;")
    assert find(prog, "t").value == [1, 2]
    assert find(prog, "s").value == ast.AddrValue(None, 0, b"hi")
    assert find(prog, "q").value == ast.AddrValue("pts", 12)
    assert find(prog, "h").value == ast.AddrValue("kmain", 0)
    assert find(prog, "n").value == ast.AddrValue("kmain", 0)
    assert (find(prog, "b").value, find(prog, "m").value) == (1, -1)
    assert find(prog, "pts").value is None


def test_symbols_and_address_taken_locals():
    prog = checked("fn kmain() -> u64 { var a: u64 = 1; var b: u64 = 2; var p = &a; return b + *p; }")
    stmts = find(prog, "kmain").body.stmts
    a, b, p = (s.sym for s in stmts[:3])
    assert (a.addr_taken, b.addr_taken, p.addr_taken) == (True, False, False)
    assert p.type == PtrType(U64)


def test_calls_are_resolved():
    prog = checked(KMAIN + "fn g(x: u8) -> u8 { return x; }\ninterrupt fn isr() { }\n"
                   "fn f(h: fn(u8) -> u8) -> u8 { var i = &isr; outb(0x80, g(1)); return h(2); }")
    f = find(prog, "f")
    var_i, call_out, ret = f.body.stmts
    assert var_i.sym.type == FnType((), None)
    out = call_out.expr
    assert out.intrinsic.name == "outb" and out.func is None
    assert out.args[1].func.name == "g"
    assert ret.value.intrinsic is None and ret.value.func is None      # indirect
    assert ret.value.type == U8


def test_shadowing_is_allowed_in_inner_scopes():
    prog = checked("var x: u8;\nfn kmain() -> u64 { var x: u64 = 1; { var x: i8 = -1; } return x; }")
    ret = find(prog, "kmain").body.stmts[-1]
    assert ret.value.sym.type == U64


def test_struct_may_point_to_later_and_to_itself():
    prog = checked(KMAIN + "struct A { b: *B, arr: *[B; 2] }\nstruct B { a: A, me: *B }\nvar x: B;")
    assert find(prog, "x").sym.type.info.size == 24
    assert isinstance(find(prog, "x").sym.type.info.field("a").type.info.field("arr").type.target, ArrayType)


def test_while_true_needs_no_return():
    checked("fn kmain() -> u64 { while true { } }")
    checked("fn kmain() -> u64 { if true { return 1; } else { while 1 == 1 { } } }")


def test_negative_literal_minimum():
    prog = checked(KMAIN + "const A: i8 = -128;\nconst B: i64 = -9223372036854775808;")
    assert (find(prog, "A").sym.value, find(prog, "B").sym.value) == (-128, -2**63)
    assert find(prog, "A").sym.type == I8


SHARED = Path(__file__).resolve().parents[2] / "shared"
KERNELS = sorted((SHARED / "conformance").glob("*.pvk"))


@pytest.mark.skipif(not KERNELS, reason=f"no conformance kernels in {SHARED}")
@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.stem)
def test_conformance_kernels_check(path):
    prog = check(parse_program(str(path)))
    assert prog.checked
    assert find(prog, "kmain").type == FnType((), U64)
