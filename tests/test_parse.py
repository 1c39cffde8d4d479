"""The parser: every construct of the grammar, literals, comments, positions, imports."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from pvtool import ast, parse
from pvtool.diagnostics import CompileError
from pvtool.parse import parse_program, parse_text


def items(src: str) -> list[ast.Item]:
    return parse_text(src, "t.pvk")


def dump(src: str) -> str:
    return " ".join(ast.dump(i) for i in items(src))


def body(src: str) -> str:
    """The dump of the statements of `fn f() { src }`."""
    (fn,) = items("fn f() { " + src + " }")
    return " ".join(ast.dump(s) for s in fn.body.stmts)


def expr(src: str) -> str:
    (fn,) = items("fn f() { x = " + src + "; }")
    return ast.dump(fn.body.stmts[0].value)


def syntax_error(src: str) -> CompileError:
    with pytest.raises(CompileError) as e:
        items(src)
    return e.value


# -- items -----------------------------------------------------------------------------

def test_import_const_var_items():
    assert dump('import "lib/a.pvk";') == "(Import 'lib/a.pvk')"
    assert dump("const N: u16 = 0x3f8;") == "(Const 'N' (TName 'u16') (IntLit 1016))"
    assert dump("var t: u64;") == "(Global 't' (TName 'u64') None)"
    assert dump('var b: *u8 = "hi";') == "(Global 'b' (TPtr (TName 'u8')) (StrLit b'hi'))"
    assert dump("var z = 5;") == "(Global 'z' None (IntLit 5))"
    assert dump("var a: [u32; 2] = [1, 2,];") == \
        "(Global 'a' (TArray (TName 'u32') (IntLit 2)) (ArrayLit [(IntLit 1) (IntLit 2)]))"


def test_struct_items():
    assert dump("struct T { id: u64, next: *T, name: [u8; 16] }") == (
        "(Struct 'T' [(FieldDecl 'id' (TName 'u64')) (FieldDecl 'next' (TPtr (TName 'T'))) "
        "(FieldDecl 'name' (TArray (TName 'u8') (IntLit 16)))])")
    assert dump("struct T { a: u8, }") == "(Struct 'T' [(FieldDecl 'a' (TName 'u8'))])"
    assert dump("struct E { }") == "(Struct 'E' [])"


def test_fn_items():
    assert dump("fn add(a: u64, b: u64) -> u64 { return a + b; }") == (
        "(Fn 'add' [(Param 'a' (TName 'u64')) (Param 'b' (TName 'u64'))] (TName 'u64') "
        "(Block [(Return (Binary '+' (Name 'a') (Name 'b')))]) False)")
    assert dump("fn reset() { }") == "(Fn 'reset' [] None (Block []) False)"
    assert dump("interrupt fn tick() { }") == "(Fn 'tick' [] None (Block []) True)"
    assert dump("fn f(a: u8,) { }") == "(Fn 'f' [(Param 'a' (TName 'u8'))] None (Block []) False)"


def test_types():
    def ty(src):
        (g,) = items(f"var x: {src};")
        return ast.dump(g.type_expr)
    assert ty("**u8") == "(TPtr (TPtr (TName 'u8')))"
    assert ty("[[u8; 2]; 3]") == "(TArray (TArray (TName 'u8') (IntLit 2)) (IntLit 3))"
    assert ty("[u8; N * 2]") == "(TArray (TName 'u8') (Binary '*' (Name 'N') (IntLit 2)))"
    assert ty("fn()") == "(TFn [] None)"
    assert ty("fn(u64, *u8) -> u64") == "(TFn [(TName 'u64') (TPtr (TName 'u8'))] (TName 'u64'))"
    assert ty("fn() -> fn(u8)") == "(TFn [] (TFn [(TName 'u8')] None))"
    assert ty("[fn(); 4]") == "(TArray (TFn [] None) (IntLit 4))"
    assert ty("Task") == "(TName 'Task')"


# -- statements -----------------------------------------------------------------------------

def test_var_statements():
    assert body("var x: u64 = 1; var y: u64; var z = 5;") == (
        "(VarStmt 'x' (TName 'u64') (IntLit 1)) (VarStmt 'y' (TName 'u64') None) "
        "(VarStmt 'z' None (IntLit 5))")


@pytest.mark.parametrize("op", ["=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>="])
def test_every_assignment_operator(op):
    base = op[:-1] if op != "=" else "="
    assert body(f"x {op} 1;") == f"(Assign '{base}' (Name 'x') (IntLit 1))"


def test_assignment_targets():
    assert body("*p = *p + 1;") == \
        "(Assign '=' (Unary '*' (Name 'p')) (Binary '+' (Unary '*' (Name 'p')) (IntLit 1)))"
    assert body("a[i].f = 0;") == \
        "(Assign '=' (FieldAccess (Index (Name 'a') (Name 'i')) 'f') (IntLit 0))"


def test_if_else_chain_is_flat():
    assert body("if a { } else if b { x = 1; } else { }") == (
        "(If [((Name 'a') (Block [])) ((Name 'b') (Block [(Assign '=' (Name 'x') (IntLit 1))]))] "
        "(Block []))")
    assert body("if (a) { }") == "(If [((Name 'a') (Block []))] None)"


def test_loops_and_jumps():
    assert body("while c { break; continue; }") == "(While (Name 'c') (Block [(Break) (Continue)]))"
    assert body("for i in 0..n { }") == "(For 'i' (IntLit 0) (Name 'n') (Block []))"
    assert body("for i in 0..(l + 1) / 8 { }") == \
        "(For 'i' (IntLit 0) (Binary '/' (Binary '+' (Name 'l') (IntLit 1)) (IntLit 8)) (Block []))"
    assert body("return; return e;") == "(Return None) (Return (Name 'e'))"


def test_expression_statement_and_nested_block():
    assert body("f(x); { g(); }") == \
        "(ExprStmt (Call (Name 'f') [(Name 'x')])) (Block [(ExprStmt (Call (Name 'g') []))])"


# -- expressions ------------------------------------------------------------------------------

@pytest.mark.parametrize("src, tree", [
    ("a || b && c", "(Binary '||' (Name 'a') (Binary '&&' (Name 'b') (Name 'c')))"),
    ("a && b == c", "(Binary '&&' (Name 'a') (Binary '==' (Name 'b') (Name 'c')))"),
    ("a == b | c", "(Binary '==' (Name 'a') (Binary '|' (Name 'b') (Name 'c')))"),
    ("a | b ^ c", "(Binary '|' (Name 'a') (Binary '^' (Name 'b') (Name 'c')))"),
    ("a ^ b & c", "(Binary '^' (Name 'a') (Binary '&' (Name 'b') (Name 'c')))"),
    ("a & b << c", "(Binary '&' (Name 'a') (Binary '<<' (Name 'b') (Name 'c')))"),
    ("a << b + c", "(Binary '<<' (Name 'a') (Binary '+' (Name 'b') (Name 'c')))"),
    ("a + b * c", "(Binary '+' (Name 'a') (Binary '*' (Name 'b') (Name 'c')))"),
    ("a * b as u8", "(Binary '*' (Name 'a') (Cast (Name 'b') (TName 'u8')))"),
    ("-a as u8", "(Cast (Unary '-' (Name 'a')) (TName 'u8'))"),
    ("&g[0] as u64", "(Cast (Unary '&' (Index (Name 'g') (IntLit 0))) (TName 'u64'))"),
    ("x as u64 != 0", "(Binary '!=' (Cast (Name 'x') (TName 'u64')) (IntLit 0))"),
    ("a - b - c", "(Binary '-' (Binary '-' (Name 'a') (Name 'b')) (Name 'c'))"),
    ("a - (b - c)", "(Binary '-' (Name 'a') (Binary '-' (Name 'b') (Name 'c')))"),
    ("a as u8 as u64", "(Cast (Cast (Name 'a') (TName 'u8')) (TName 'u64'))"),
    ("!~-*&x", "(Unary '!' (Unary '~' (Unary '-' (Unary '*' (Unary '&' (Name 'x'))))))"),
    ("*p.f", "(Unary '*' (FieldAccess (Name 'p') 'f'))"),
    ("f(x)(y)", "(Call (Call (Name 'f') [(Name 'x')]) [(Name 'y')])"),
    ("a[i][j]", "(Index (Index (Name 'a') (Name 'i')) (Name 'j'))"),
    ("s.f.g", "(FieldAccess (FieldAccess (Name 's') 'f') 'g')"),
    ("t(3)[0]", "(Index (Call (Name 't') [(IntLit 3)]) (IntLit 0))"),
    ("f(1, 2,)", "(Call (Name 'f') [(IntLit 1) (IntLit 2)])"),
    ("true || false", "(Binary '||' (BoolLit True) (BoolLit False))"),
    ("a <= b", "(Binary '<=' (Name 'a') (Name 'b'))"),
    ("a >= b", "(Binary '>=' (Name 'a') (Name 'b'))"),
    ("a > b", "(Binary '>' (Name 'a') (Name 'b'))"),
    ("a % b", "(Binary '%' (Name 'a') (Name 'b'))"),
    ("a >> b", "(Binary '>>' (Name 'a') (Name 'b'))"),
    ("[]", "(ArrayLit [])"),
])
def test_precedence_and_shape(src, tree):
    assert expr(src) == tree


def test_comparisons_do_not_chain():
    e = syntax_error("fn f() { x = a < b < c; }")
    assert (e.loc.line, e.loc.col, e.message) == (1, 20, "unexpected '<'")


# -- literals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("src, value", [
    ("42", 42), ("0x2a", 42), ("0X2A", 42), ("0b101010", 42), ("1_000_000", 1000000),
    ("0xdead_beef", 0xDEADBEEF), ("0b1111_0000", 0xF0), ("007", 7), ("0", 0),
    ("18446744073709551615", 2**64 - 1), ("0xffff_ffff_ffff_ffff", 2**64 - 1),
])
def test_integer_forms(src, value):
    assert expr(src) == f"(IntLit {value})"


@pytest.mark.parametrize("src", ["1__0", "10_", "0x_1", "0x", "0b12", "12ab", "0b"])
def test_malformed_integers(src):
    e = syntax_error(f"fn f() {{ x = {src}; }}")
    assert (e.loc.col, e.message) == (14, f"malformed integer literal '{src}'")


def test_integer_too_large():
    e = syntax_error("fn f() { x = 18446744073709551616; }")
    assert e.message == "integer literal '18446744073709551616' is larger than 64 bits"


@pytest.mark.parametrize("digits", [4301, 5000, 100_000])
def test_integer_with_thousands_of_digits_is_located(digits):
    # Python's int() refuses decimal strings of more than 4300 digits.
    e = syntax_error("fn f() {\n  x = " + "9" * digits + "; }")
    assert (e.loc.line, e.loc.col) == (2, 7)
    assert e.message == "integer literal '99999999999999999999...' is larger than 64 bits"


def test_leading_zeros_do_not_count():
    assert expr("0" * 5000 + "42") == "(IntLit 42)"
    assert expr("0x" + "0" * 100 + "ff") == "(IntLit 255)"
    assert syntax_error("fn f() { x = 0x1" + "0" * 16 + "; }").message.endswith("is larger than 64 bits")


@pytest.mark.parametrize("src, value", [
    ("'a'", 97), ("'\\n'", 10), ("'\\t'", 9), ("'\\r'", 13), ("'\\0'", 0), ("'\\\\'", 92),
    ("'\\''", 39), ("'\\\"'", 34), ("'\\x41'", 0x41), ("'\\xff'", 255), ("'\"'", 34),
])
def test_every_character_escape(src, value):
    assert expr(src) == f"(CharLit {value})"


def test_string_escapes_and_utf8():
    assert expr(r'"a\n\t\r\0\\\'\"\x7f"') == "(StrLit b'a\\n\\t\\r\\x00\\\\\\'\"\\x7f')"
    assert expr('"é"') == "(StrLit b'\\xc3\\xa9')"
    assert expr('""') == "(StrLit b'')"


@pytest.mark.parametrize("src, col, message", [
    ("'ab'", 14, "character literal must hold exactly one byte"),
    ("''", 14, "empty character literal"),
    ("'é'", 14, "character literal must hold exactly one byte"),
    ("'\\q'", 15, "unknown escape sequence '\\q'"),
    ('"ab\\x4g"', 17, "'\\x' needs two hex digits"),
    ('"abc', 14, "unterminated string literal"),
    ("'a", 14, "unterminated character literal"),
])
def test_bad_literals(src, col, message):
    e = syntax_error(f"fn f() {{ x = {src}; }}")
    assert (e.loc.line, e.loc.col, e.message) == (1, col, message)


def test_comments():
    src = """// leading comment
    /* block
       over lines */ const A: u64 = /* inside */ 1 + // tail
        2;   /* a * b */ // end"""
    assert dump(src) == "(Const 'A' (TName 'u64') (Binary '+' (IntLit 1) (IntLit 2)))"
    assert dump("/**/ /***/ /* * / */ var x: u8;") == "(Global 'x' (TName 'u8') None)"


def test_unterminated_comment():
    e = syntax_error("var x: u8;\n/* never closed\n")
    assert (e.loc.line, e.loc.col, e.message) == (2, 1, "unterminated comment")


PUNCTUATION = {*parse._PRECEDENCE, *parse._ASSIGN, "::", "->", "..", ".", "!", "~", ";", ":", ",", "(", ")", "{",
               "}", "[", "]"}
PIECES = ["fn", "while", "x_1", "Q", "07", "0x1f", "'a'", "'\\n'", '"s t"', *sorted(PUNCTUATION),
          " ", "\n", "\t", "// c\n", "/* c */", "/*", "'", '"', "@", "é"]


@given(st.lists(st.sampled_from(PIECES), max_size=12))
def test_tokens_tile_the_text(pieces):
    """Whatever the text, the tokens are its non-blank, non-comment parts in order, each
    at its offset and of the kind its spelling says, up to the first ERROR."""
    text = "".join(pieces)
    tokens = parse._lex(text)
    assert tokens.kinds[-1] == "$END" and tokens.texts[-1] == ""
    assert "$END" not in tokens.kinds[:-1] and "ERROR" not in tokens.kinds[:-2]
    stopped = len(tokens.kinds) > 1 and tokens.kinds[-2] == "ERROR"     # then $END is past the text
    at = 0
    for kind, word, start in list(zip(tokens.kinds, tokens.texts, tokens.starts))[:-1 if stopped else None]:
        assert text[start:start + len(word)] == word
        assert re.fullmatch(r"(\s|//[^\n]*|/\*(?:(?!\*/).)*\*/)*", text[at:start], re.DOTALL), text[at:start]
        assert kind == expected_kind(word), (word, kind)
        at = start + len(word)
    assert tokens.starts[-1] == len(text)


def expected_kind(word: str) -> str:
    if word in parse.KEYWORDS or word in PUNCTUATION:
        return word
    if re.fullmatch(r"[A-Za-z_]\w*", word):
        return "NAME"
    if word[:1].isdigit():
        return "INT"
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"":
        return "CHAR" if word[0] == "'" else "STRING"
    return "$END" if word == "" else "ERROR"


# -- positions ----------------------------------------------------------------------------------

def test_positions():
    (fn,) = items("fn f() {\n\tvar x = a +\n  b;\n}")
    var = fn.body.stmts[0]
    assert (var.loc.line, var.loc.col) == (2, 2)
    plus = var.init
    assert (plus.loc.line, plus.loc.col) == (2, 12)        # the operator
    assert (plus.right.loc.line, plus.right.loc.col) == (3, 3)
    assert (fn.end.line, fn.end.col) == (4, 1)      # the body's closing brace
    assert fn.loc.file == "t.pvk"


_SPREAD_TOKENS = ("fn f ( ) { var x = a + b * c ; x += ( y - z ) ; if a < b { return q [ 1 ] . r ; } "
                  "while t != 0 { u ( v , w ) ; } }").split()


@given(st.lists(st.sampled_from([" ", "\n", "\n\n\n", "\t", "\n // c\n", " /* \n */ "]),
                min_size=len(_SPREAD_TOKENS), max_size=len(_SPREAD_TOKENS)))
def test_positions_across_line_breaks(gaps):
    """Every name, literal and operator is located at its own text, wherever the line breaks
    fall: consecutive positions lie on one line, the next, lines further on or lines before
    (an operator after a right operand that spans lines), and the text may end without one."""
    text = "".join(g + t for g, t in zip(gaps, _SPREAD_TOKENS))
    lines = text.split("\n")
    located = []

    def walk(node):
        if isinstance(node, (list, tuple)):
            for x in node:
                walk(x)
        elif isinstance(node, ast.Node):
            shown = {ast.Name: "name", ast.Binary: "op", ast.Assign: "op"}.get(type(node))
            if shown or isinstance(node, ast.IntLit):
                located.append((node.loc, str(node.value) if shown is None else getattr(node, shown)))
            for f in ast.fields(node):
                walk(getattr(node, f.name))

    walk(items(text))
    assert len(located) == 21         # 13 names, 2 literals, 5 operators, 1 assignment
    for loc, word in located:          # (a compound assignment's operator is `+` of `+=`)
        assert lines[loc.line - 1][loc.col - 1:].startswith(word), (loc, word)

@pytest.mark.parametrize("expr, located", [
    ("r.data[i](x) as u8", [("Cast", 4), ("Call", 4), ("Index", 4), ("FieldAccess", 4), ("Name", 4)]),
    ("-p.q as i32", [("Cast", 4), ("Unary", 4), ("FieldAccess", 5), ("Name", 5)]),
    ("((a + b)).c as u64", [("Cast", 6), ("FieldAccess", 6), ("Binary", 8)]),
    ("(( f ))(1)", [("Call", 7), ("Name", 7)]),
])
def test_calls_indexes_fields_and_casts_are_located_at_their_first_operand(expr, located):
    """At the first token of the primary (or unary) expression they apply to, after any '('."""
    (fn,) = items(f"fn f() {{\n  y =\n   {expr};\n}}")
    e = fn.body.stmts[0].value
    for kind, col in located:
        assert (type(e).__name__, e.loc.line, e.loc.col) == (kind, 3, col)
        e = getattr(e, "operand", None) or getattr(e, "callee", None) or getattr(e, "base", None)


# -- syntax errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("src, line, col, message", [
    ("fn f() { x = 1 }", 1, 15, "expected ';'"),
    ("fn f() {\n  x = 1\n  y = 2;\n}", 2, 8, "expected ';'"),
    ("fn f( { }", 1, 7, "expected ')' or identifier, found '{'"),
    ("fn f() { x = 1 +; }", 1, 17, "unexpected ';'"),
    ("fn f() {", 1, 9, "unexpected end of file"),
    ("var x = @;", 1, 9, "unexpected character '@'"),
    ("fn f() { \x00 }", 1, 10, "unexpected character '\\x00'"),
    ("fn", 1, 3, "expected identifier, found end of file"),
    ("struct S { a: u8 b: u8 }", 1, 18, "expected ',', '::' or '}', found 'b'"),
])
def test_syntax_errors(src, line, col, message):
    e = syntax_error(src)
    assert (e.loc.line, e.loc.col, e.message) == (line, col, message)


def test_keywords_are_not_names():
    e = syntax_error("var while: u8;")
    assert (e.loc.col, e.message) == (5, "expected identifier, found 'while'")


# -- imports ---------------------------------------------------------------------------------------

def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_import_relative_to_importing_file(tmp_path):
    write(tmp_path, {
        "main.pvk": 'import "lib/a.pvk";\nfn kmain() -> u64 { return 0; }',
        "lib/a.pvk": 'import "b.pvk";\nconst A: u64 = 1;',
        "lib/b.pvk": 'const B: u64 = 2;',
    })
    prog = parse_program(str(tmp_path / "main.pvk"))
    assert [Path(f).name for f in prog.files] == ["main.pvk", "a.pvk", "b.pvk"]
    names = [getattr(i, "name", None) for i in prog.items]
    assert names == [None, "kmain", None, "A", "B"]          # main file's items first
    assert prog.items[2].resolved == str(tmp_path / "lib" / "b.pvk")
    assert prog.items[3].loc.file == str(tmp_path / "lib" / "a.pvk")


def test_each_file_included_once(tmp_path):
    write(tmp_path, {
        "main.pvk": 'import "a.pvk"; import "b.pvk"; import "./a.pvk";',
        "a.pvk": 'import "c.pvk"; const A: u64 = 1;',
        "b.pvk": 'import "c.pvk"; const B: u64 = 1;',
        "c.pvk": 'const C: u64 = 1;',
    })
    prog = parse_program(str(tmp_path / "main.pvk"))
    assert [Path(f).name for f in prog.files] == ["main.pvk", "a.pvk", "c.pvk", "b.pvk"]
    assert sum(isinstance(i, ast.Const) and i.name == "C" for i in prog.items) == 1


def test_import_cycle_reported_at_the_import(tmp_path):
    write(tmp_path, {
        "main.pvk": 'import "a.pvk";',
        "a.pvk": 'const A: u64 = 1;\n  import "b.pvk";',
        "b.pvk": 'import "a.pvk";',
    })
    with pytest.raises(CompileError) as e:
        parse_program(str(tmp_path / "main.pvk"))
    err = e.value
    assert (Path(err.loc.file).name, err.loc.line, err.loc.col) == ("b.pvk", 1, 1)
    a, b = tmp_path / "a.pvk", tmp_path / "b.pvk"
    assert err.message == f"import cycle: {a} -> {b} -> {a}"


def test_self_import_is_a_cycle(tmp_path):
    write(tmp_path, {"main.pvk": 'import "main.pvk";'})
    with pytest.raises(CompileError) as e:
        parse_program(str(tmp_path / "main.pvk"))
    assert e.value.message.startswith("import cycle:")


def test_missing_import_reported_at_the_import(tmp_path):
    write(tmp_path, {"main.pvk": 'const A: u64 = 1;\n\n   import "nope.pvk";'})
    with pytest.raises(CompileError) as e:
        parse_program(str(tmp_path / "main.pvk"))
    err = e.value
    assert (Path(err.loc.file).name, err.loc.line, err.loc.col) == ("main.pvk", 3, 4)
    assert err.message == f"cannot read '{tmp_path / 'nope.pvk'}': No such file or directory"


@pytest.mark.parametrize("path, why", [
    ("a\\0b.pvk", "the path contains a NUL byte"),
    ("sub", "Is a directory"),
    ("", "Is a directory"),
    ("main.pvk/x.pvk", "Not a directory"),
    ("x" * 5000 + ".pvk", "File name too long"),
])
def test_unreadable_import_paths_are_located(tmp_path, path, why):
    (tmp_path / "sub").mkdir()
    write(tmp_path, {"main.pvk": f'fn kmain() -> u64 {{ return 0; }}\nimport "{path}";'})
    with pytest.raises(CompileError) as e:
        parse_program(str(tmp_path / "main.pvk"))
    assert (Path(e.value.loc.file).name, e.value.loc.line, e.value.loc.col) == ("main.pvk", 2, 1)
    assert e.value.message.startswith(f"cannot read '{tmp_path}") and e.value.message.endswith(f"': {why}")
    assert "\0" not in str(e.value)


def test_an_import_path_that_is_not_utf8(tmp_path):
    write(tmp_path, {"main.pvk": 'import "\\xff.pvk";'})
    with pytest.raises(CompileError) as e:
        parse_program(str(tmp_path / "main.pvk"))
    assert (e.value.loc.line, e.value.loc.col, e.value.message) == (1, 8, "the import path is not valid UTF-8")


def test_missing_main_file(tmp_path):
    with pytest.raises(CompileError) as e:
        parse_program(str(tmp_path / "none.pvk"))
    assert str(e.value) == f"{tmp_path / 'none.pvk'}: error: cannot read " \
                           f"'{tmp_path / 'none.pvk'}': No such file or directory"


def test_error_in_imported_file_names_that_file(tmp_path):
    write(tmp_path, {"main.pvk": 'import "x.pvk";', "x.pvk": "\n var = 1;"})
    with pytest.raises(CompileError) as e:
        parse_program(str(tmp_path / "main.pvk"))
    assert str(e.value).splitlines() == [
        f"{tmp_path / 'x.pvk'}:2:6: error: expected identifier, found '='", " var = 1;", "     ^"]


# -- the conformance kernels --------------------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / "shared"
KERNELS = sorted((SHARED / "conformance").glob("*.pvk"))


@pytest.mark.skipif(not KERNELS, reason=f"no conformance kernels in {SHARED}")
@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.stem)
def test_conformance_kernels_parse(path):
    prog = parse_program(str(path))
    assert prog.files[0] == str(path)
    assert any(isinstance(i, ast.Fn) and i.name == "kmain" for i in prog.items)


def test_user_mode_items_and_their_modifiers():
    imp, const, uvar, glob, handler, sys_fn, ufn = items(
        'import "lib/con.pvk" as con;\n'
        "private const N: u64 = sizeof(TrapFrame);\n"
        "private user var stack: [u8; 64] align(16);\n"
        "var p: *con::Task = null;\n"
        "interrupt(error_code) fn gp(frame: *TrapFrame) { }\n"
        "syscall fn sys(frame: *TrapFrame) { }\n"
        "user fn u() -> u64 { return syscall(1, 2, 3, offsetof(TrapFrame, rip)); }\n")
    assert (imp.path, imp.alias) == ("lib/con.pvk", "con")
    assert const.private and ast.dump(const.value) == "(SizeOf (TName 'TrapFrame'))"
    assert (uvar.private, uvar.user, ast.dump(uvar.align)) == (True, True, "(IntLit 16)")
    assert ast.dump(glob) == "(Global 'p' (TPtr (TName 'con::Task')) (Null))"
    assert (handler.interrupt, handler.error_code, handler.syscall, handler.user) == (True, True, False, False)
    assert (sys_fn.interrupt, sys_fn.syscall) == (False, True)
    assert ufn.user and ast.dump(ufn.body.stmts[0].value) == (
        "(Call (Name 'syscall') [(IntLit 1) (IntLit 2) (IntLit 3) (OffsetOf (TName 'TrapFrame') 'rip')])")


def test_qualified_names_in_expressions():
    assert expr("con::f(con::x) + y") == "(Binary '+' (Call (Name 'con::f') [(Name 'con::x')]) (Name 'y'))"
