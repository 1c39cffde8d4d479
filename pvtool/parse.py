"""Source files to syntax trees: reading, lexing, parsing and imports.

`parse_program` reads the main file, follows `import` items depth first
(each file once, paths relative to the importing file) and returns one
`ast.Program`.  The grammar lives in grammar/pvk.lark; lark (LALR) builds a
parse tree, which `_Builder` turns into `pvtool.ast` nodes while checking
what the grammar leaves loose: literal spelling, escapes and nesting depth.
Every failure is a `CompileError` with a position.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import lark
from lark import Token, Tree

from . import ast
from .diagnostics import MAX_NESTING, CompileError, deep_recursion, remember_source
from .ir import Loc

_GRAMMAR = Path(__file__).with_name("grammar") / "pvk.lark"
_parser: lark.Lark | None = None


def _lark() -> lark.Lark:
    global _parser
    if _parser is None:
        _parser = lark.Lark(_GRAMMAR.read_text(), parser="lalr", lexer="basic", propagate_positions=True,
                            maybe_placeholders=True)
    return _parser


# -- public entry points -------------------------------------------------------------

def parse_program(path: str) -> ast.Program:
    """Parse `path` and everything it imports; items of the main file come first."""
    with deep_recursion():
        try:
            return _Program(path).run()
        except RecursionError:
            raise CompileError(Loc(path, 0, 0), "program nested too deeply") from None


def parse_text(text: str, path: str = "<input>") -> list[ast.Item]:
    """Parse one file's text (imports are not followed)."""
    remember_source(path, text)
    with deep_recursion():
        try:
            tree = _lark().parse(text)
        except lark.exceptions.UnexpectedInput as e:
            raise _syntax_error(e, text, path) from None
        return _Builder(path).items(tree)


def read_source(path: str, loc: Loc | None = None) -> str:
    """The text of a source file; errors are reported at `loc` (the import), if given."""
    where = loc or Loc(path, 0, 0)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CompileError(where, f"cannot read '{path}': {e.strerror or e}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors="replace")
        remember_source(path, text)
        line = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        col = len(data[line_start:e.start].decode("utf-8", errors="replace")) + 1
        raise CompileError(Loc(path, line, col), "source is not valid UTF-8") from None


# -- imports -----------------------------------------------------------------------------

class _Program:
    def __init__(self, main: str):
        self.main = main
        self.items: list[ast.Item] = []
        self.files: list[str] = []
        self.seen: set[str] = set()

    def run(self) -> ast.Program:
        self.visit(self.main, None, [])
        return ast.Program(self.items, self.files)

    def visit(self, path: str, at: Loc | None, chain: list[tuple[str, str]]) -> None:
        if len(chain) > MAX_NESTING:
            raise CompileError(at, "imports nested too deeply")
        real = os.path.realpath(path)
        self.seen.add(real)
        items = parse_text(read_source(path, at), path)
        self.files.append(path)
        self.items.extend(items)
        chain = chain + [(real, path)]
        for item in items:
            if not isinstance(item, ast.Import):
                continue
            target = os.path.normpath(os.path.join(os.path.dirname(path), item.path))
            item.resolved = target
            target_real = os.path.realpath(target)
            reals = [r for r, _ in chain]
            if target_real in reals:
                loop = [shown for _, shown in chain[reals.index(target_real):]] + [target]
                raise CompileError(item.loc, f"import cycle: {' -> '.join(loop)}")
            if target_real not in self.seen:
                self.visit(target, item.loc, chain)


# -- syntax errors -------------------------------------------------------------------------

_TOKEN_NAMES = {"NAME": "identifier", "INT": "integer", "CHAR": "character literal",
                "STRING": "string", "$END": "end of file", "INTERRUPT": "'interrupt'"}


def _describe_terminal(name: str) -> str:
    if name in _TOKEN_NAMES:
        return _TOKEN_NAMES[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return name.lower()


def _show(text: str) -> str:
    """A token or character for a message: quoted, with control bytes escaped."""
    if len(text) > 20:
        text = text[:20] + "..."
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"'{shown}'"


def _syntax_error(e: lark.exceptions.UnexpectedInput, text: str, path: str) -> CompileError:
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        loc = Loc(path, e.line, e.column)
        return CompileError(loc, _unlexable(text[e.pos_in_stream:]) or
                            f"unexpected character {_show(e.char)}")
    if isinstance(e, lark.exceptions.UnexpectedToken):
        return _unexpected_token(e, text, path)
    return CompileError(Loc(path, getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1),
                        "syntax error")


def _unlexable(rest: str) -> str | None:
    """Why the text at an error cannot start a token, when it is a known mistake."""
    if rest.startswith("/*"):
        return "unterminated comment"
    if rest.startswith('"'):
        return "unterminated string literal"
    if rest.startswith("'"):
        return "unterminated character literal"
    return None


def _unexpected_token(e: lark.exceptions.UnexpectedToken, text: str, path: str) -> CompileError:
    tok = e.token
    try:
        # LALR merges lookaheads, so e.expected may list tokens that would
        # fail a step later; the interactive parser knows what really fits.
        names = e.interactive_parser.accepts() - {"$END"} or e.expected
    except Exception:
        names = e.expected
    expected = sorted({_describe_terminal(n) for n in names})
    if tok.type == "$END":
        loc, found = _end_of_text(text, path), "end of file"
    else:
        loc, found = Loc(path, tok.line, tok.column), _show(str(tok))
        why = _unlexable(text[tok.start_pos:])
        if why:
            return CompileError(loc, why)
    if "';'" in expected:
        # A missing ';' is best reported where it belongs, after the last token;
        # but `a < b < c` is an unexpected operator, not a missing ';'.
        prev = _previous_token(text, tok)
        starts_statement = tok.type == "$END" or not re.fullmatch(r"[^\w}]+", str(tok)) \
            or prev is None or prev.end_line < tok.line
        if starts_statement:
            at = Loc(path, prev.end_line, prev.end_column) if prev else loc
            return CompileError(at, "expected ';'")
    if len(expected) <= 3:
        options = " or ".join(expected) if len(expected) < 3 else \
            f"{expected[0]}, {expected[1]} or {expected[2]}"
        return CompileError(loc, f"expected {options}, found {found}")
    return CompileError(loc, f"unexpected {found}")


def _end_of_text(text: str, path: str) -> Loc:
    lines = text.split("\n")
    return Loc(path, len(lines), len(lines[-1]) + 1)


def _previous_token(text: str, tok: Token) -> Token | None:
    start = len(text) if tok.type == "$END" else tok.start_pos
    prev = None
    try:
        for t in _lark().lex(text):
            if t.start_pos >= start:
                break
            prev = t
    except lark.exceptions.LarkError:
        pass
    return prev


# -- parse tree to AST -------------------------------------------------------------------------

_ESCAPES = {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, "'": 39, '"': 34}
_DIGITS = {16: "0-9a-fA-F", 2: "01", 10: "0-9"}


class _Builder:
    """Walks lark's tree; one method per grammar rule."""

    def __init__(self, path: str):
        self.path = path
        self.depth = 0

    def loc(self, x: Tree | Token) -> Loc:
        if isinstance(x, Token):
            return Loc(self.path, x.line, x.column)
        return Loc(self.path, x.meta.line, x.meta.column)

    def end_loc(self, t: Tree) -> Loc:
        return Loc(self.path, t.meta.end_line, t.meta.end_column - 1)

    def build(self, t: Tree | Token | None):
        if t is None:
            return None
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise CompileError(self.loc(t), f"program nested too deeply (more than {MAX_NESTING} levels)")
            return getattr(self, t.data)(t)
        finally:
            self.depth -= 1

    # -- items
    def items(self, tree: Tree) -> list[ast.Item]:
        return [self.build(c) for c in tree.children]

    def import_item(self, t):
        tok = t.children[0]
        return ast.Import(self.loc(t), self.string(tok).decode("utf-8", errors="replace"))

    def const_item(self, t):
        name, ty, value = t.children
        return ast.Const(self.loc(t), str(name), self.build(ty), self.build(value))

    def global_item(self, t):
        name, ty, init = t.children
        return ast.Global(self.loc(t), str(name), self.build(ty), self.build(init))

    def struct_item(self, t):
        name, *fields = t.children
        return ast.Struct(self.loc(t), str(name), [self.build(f) for f in fields])

    def field(self, t):
        name, ty = t.children
        return ast.FieldDecl(self.loc(t), str(name), self.build(ty))

    def fn_item(self, t):
        interrupt, name, *params, result, body = t.children
        return ast.Fn(self.loc(t), str(name), [self.build(p) for p in params],
                      self.build(result), self.build(body), interrupt=interrupt is not None)

    def param(self, t):
        name, ty = t.children
        return ast.Param(self.loc(t), str(name), self.build(ty))

    # -- types
    def named_type(self, t):
        return ast.TName(self.loc(t), str(t.children[0]))

    def ptr_type(self, t):
        return ast.TPtr(self.loc(t), self.build(t.children[0]))

    def array_type(self, t):
        elem, size = t.children
        return ast.TArray(self.loc(t), self.build(elem), self.build(size))

    def fn_type(self, t):
        *params, result = t.children
        return ast.TFn(self.loc(t), [self.build(p) for p in params], self.build(result))

    # -- statements
    def block(self, t):
        return ast.Block(self.loc(t), [self.build(s) for s in t.children], self.end_loc(t))

    def var_stmt(self, t):
        name, ty, init = t.children
        return ast.VarStmt(self.loc(t), str(name), self.build(ty), self.build(init))

    def assign_stmt(self, t):
        target, op, value = t.children
        op_text = "=" if op == "=" else str(op)[:-1]
        return ast.Assign(self.loc(op), op_text, self.build(target), self.build(value))

    def if_stmt(self, t):
        # Flatten `else if` chains so long chains do not nest.
        arms, node = [], t
        while True:
            cond, body, rest = node.children
            arms.append((self.build(cond), self.build(body)))
            if isinstance(rest, Tree) and rest.data == "if_stmt":
                node = rest
                continue
            return ast.If(self.loc(t), arms, self.build(rest))

    def while_stmt(self, t):
        cond, body = t.children
        return ast.While(self.loc(t), self.build(cond), self.build(body))

    def for_stmt(self, t):
        name, start, end, body = t.children
        return ast.For(self.loc(t), str(name), self.loc(name), self.build(start),
                       self.build(end), self.build(body))

    def break_stmt(self, t):
        return ast.Break(self.loc(t))

    def continue_stmt(self, t):
        return ast.Continue(self.loc(t))

    def return_stmt(self, t):
        return ast.Return(self.loc(t), self.build(t.children[0]))

    def expr_stmt(self, t):
        return ast.ExprStmt(self.loc(t), self.build(t.children[0]))

    # -- expressions
    def binary(self, t):
        left, op, right = t.children
        return ast.Binary(self.loc(op), str(op), self.build(left), self.build(right))

    def cast(self, t):
        operand, ty = t.children
        return ast.Cast(self.loc(t), self.build(operand), self.build(ty))

    def unary(self, t):
        op, operand = t.children
        return ast.Unary(self.loc(t), str(op), self.build(operand))

    def call(self, t):
        callee, *args = t.children
        return ast.Call(self.loc(t), self.build(callee), [self.build(a) for a in args])

    def index(self, t):
        base, index = t.children
        return ast.Index(self.loc(t), self.build(base), self.build(index))

    def field_access(self, t):
        base, name = t.children
        return ast.FieldAccess(self.loc(t), self.build(base), str(name), name_loc=self.loc(name))

    def name(self, t):
        return ast.Name(self.loc(t), str(t.children[0]))

    def true_lit(self, t):
        return ast.BoolLit(self.loc(t), True)

    def false_lit(self, t):
        return ast.BoolLit(self.loc(t), False)

    def array_lit(self, t):
        return ast.ArrayLit(self.loc(t), [self.build(c) for c in t.children])

    def int_lit(self, t):
        tok = t.children[0]
        return ast.IntLit(self.loc(t), self.integer(tok))

    def char_lit(self, t):
        tok = t.children[0]
        value = self.unescape(tok)
        if len(value) != 1:
            what = "empty character literal" if not value else \
                "character literal must hold exactly one byte"
            raise CompileError(self.loc(tok), what)
        return ast.CharLit(self.loc(t), value[0])

    def str_lit(self, t):
        return ast.StrLit(self.loc(t), self.string(t.children[0]))

    # -- literal spelling
    def integer(self, tok: Token) -> int:
        text = str(tok)
        base, digits = 10, text
        if text[:2] in ("0x", "0X"):
            base, digits = 16, text[2:]
        elif text[:2] in ("0b", "0B"):
            base, digits = 2, text[2:]
        d = _DIGITS[base]
        if not re.fullmatch(f"[{d}]+(_[{d}]+)*", digits):
            raise CompileError(self.loc(tok), f"malformed integer literal '{text}'")
        value = int(digits.replace("_", ""), base)
        if value >= 1 << 64:
            raise CompileError(self.loc(tok), f"integer literal '{text}' is larger than 64 bits")
        return value

    def string(self, tok: Token) -> bytes:
        return self.unescape(tok)

    def unescape(self, tok: Token) -> bytes:
        """The bytes between the quotes of a string or character literal."""
        body = str(tok)[1:-1]
        out = bytearray()
        i = 0
        while i < len(body):
            c = body[i]
            if c != "\\":
                out += c.encode("utf-8")
                i += 1
                continue
            at = Loc(self.path, tok.line, tok.column + 1 + i)
            e = body[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
            elif e == "x":
                hex_digits = body[i + 2:i + 4]
                if not re.fullmatch("[0-9a-fA-F]{2}", hex_digits):
                    raise CompileError(at, "'\\x' needs two hex digits")
                out.append(int(hex_digits, 16))
                i += 4
            else:
                raise CompileError(at, f"unknown escape sequence {_show(chr(92) + e)}")
        return bytes(out)
