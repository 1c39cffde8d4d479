"""Source files to syntax trees: reading, lexing, parsing and imports.

`parse_program` reads the main file, follows `import` items depth first
(each file once, paths relative to the importing file) and returns one
`ast.Program` that also carries the text of every file it read.

The grammar is grammar/pvk.lark (LALR(1)).  The parser is hand-written for
speed: a lexer made of one regular expression, then recursive descent with
one method per grammar rule, the binary operators by precedence climbing
over the grammar's table; tests/test_grammar.py holds it to the grammar.  It
checks what the grammar leaves loose (literal spelling, escapes, nesting
depth) as it goes.  On a syntax error, lark runs the grammar itself to say
what was expected.  Every failure is a `CompileError` with a position.
"""
from __future__ import annotations

import os
import re
from bisect import bisect_right
from itertools import accumulate
from pathlib import Path

import lark

from . import ast
from .diagnostics import MAX_NESTING, CompileError, deep_recursion, quoting
from .errors import InternalError
from .source import Loc

# -- public entry points -------------------------------------------------------------------------


def parse_program(path: str) -> ast.Program:
    """Parse `path` and everything it imports; items of the main file come first."""
    return _Program(path).run()


def parse_text(text: str, path: str = "<input>") -> list[ast.Item]:
    """Parse one file's text (imports are not followed)."""
    try:
        return _Parser(_lex(text), path).program()
    except CompileError as e:
        e.sources = {path: text}
        raise


def read_source(path: str, loc: Loc | None = None) -> str:
    """The text of a source file; errors are reported at `loc` (the import), if given."""
    try:
        data = Path(_checked_path(path, loc)).read_bytes()
    except OSError as e:
        raise _cannot_read(path, loc, e.strerror or str(e)) from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        col = len(data[line_start:e.start].decode("utf-8", errors="replace")) + 1
        error = CompileError(Loc(path, line, col), "source is not valid UTF-8")
        error.sources = {path: data.decode("utf-8", errors="replace")}
        raise error from None


def _checked_path(path: str, loc: Loc | None) -> str:
    """`path`, if the system could open it at all."""
    if "\0" in path:
        raise _cannot_read(path, loc, "the path contains a NUL byte")
    return path


def _cannot_read(path: str, loc: Loc | None, why: str) -> CompileError:
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
    return CompileError(loc or Loc(shown, 0, 0), f"cannot read '{shown}': {why}")


# -- imports ----------------------------------------------------------------------------------------

class _Program:
    def __init__(self, main: str):
        self.main = main
        self.items: list[ast.Item] = []
        self.files: list[str] = []
        self.sources: dict[str, str] = {}
        self.seen: dict[str, str] = {}          # real path -> the path it was parsed under

    def run(self) -> ast.Program:
        with quoting(self.sources):
            self.visit(self.main, None, [])
        return ast.Program(self.items, self.files, self.sources)

    def visit(self, path: str, at: Loc | None, chain: list[tuple[str, str]]) -> None:
        if len(chain) > MAX_NESTING:
            raise CompileError(at, "imports nested too deeply")
        real = _real_path(path, at)
        self.seen[real] = path
        text = read_source(path, at)
        self.sources[path] = text
        items = _Parser(_lex(text), path).program()
        self.files.append(path)
        self.items.extend(items)
        chain = chain + [(real, path)]
        for item in items:
            if isinstance(item, ast.Import):
                self.follow(item, path, chain)

    def follow(self, item: ast.Import, importer: str, chain: list[tuple[str, str]]) -> None:
        target = os.path.normpath(os.path.join(os.path.dirname(importer), item.path))
        item.resolved = target
        target_real = _real_path(target, item.loc)
        reals = [r for r, _ in chain]
        if target_real in reals:
            loop = [shown for _, shown in chain[reals.index(target_real):]] + [target]
            raise CompileError(item.loc, f"import cycle: {' -> '.join(loop)}")
        if target_real not in self.seen:
            self.visit(target, item.loc, chain)
        item.resolved = self.seen[target_real]


def _real_path(path: str, at: Loc | None) -> str:
    """The canonical name of a file, to recognise it however it is imported."""
    return os.path.realpath(_checked_path(path, at))


# -- lexing --------------------------------------------------------------------------------------------

KEYWORDS = frozenset(("align", "as", "break", "const", "continue", "else", "false", "fn", "for", "if",
                      "import", "in", "interrupt", "null", "offsetof", "private", "return", "sizeof",
                      "struct", "syscall", "true", "user", "var", "while"))

# One match per token, in two groups: the blanks and comments before it
# (taken possessively: a comment is never re-read as operators), then the
# token: a name or keyword, an integer, a character literal, a string
# literal, an unterminated comment, an operator or punctuation (the longest
# that fits), any other character (an unterminated literal's quote, or a
# character no token starts with), or the end of the text.  Every position
# matches, so the matches tile the text.  INT is loose on purpose: the
# parser checks digits and `_` so `12ab` gets a precise message.
_TOKEN = re.compile(r"""
    ([ \t\r\n\f]*+(?:(?://[^\n]*|/\*[^*]*\*+(?:[^/*][^*]*\*+)*/)[ \t\r\n\f]*+)*+)
    ( [A-Za-z_]\w*
    | [0-9]\w*
    | '(?:[^'\\\n]|\\[^\n])*'
    | "(?:[^"\\\n]|\\[^\n])*"
    | /\*
    | ::|[(){}\[\];:,~]|->|\.\.?|<<=?|>>=?|&[&=]?|\|[|=]?|[-+*/%^!=<>]=?
    | .
    | \Z
    )""", re.VERBOSE | re.DOTALL | re.ASCII)
_OPERATORS = ("::", "(", ")", "{", "}", "[", "]", ";", ":", ",", "~", "->", ".", "..", "<<", "<<=", ">>", ">>=",
              "&", "&&", "&=", "|", "||", "|=", "-", "+", "*", "/", "%", "^", "!", "=", "<", ">",
              "-=", "+=", "*=", "/=", "%=", "^=", "!=", "==", "<=", ">=")
_OWN_KINDS = {**{t: t for t in (*KEYWORDS, *_OPERATORS)}, "": "$END"}
_STOPS = frozenset(("/*", "'", '"'))      # an unterminated comment or literal
_KIND_OF_FIRST = {**dict.fromkeys("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_", "NAME"),
                  **dict.fromkeys("0123456789", "INT"), "'": "CHAR", '"': "STRING"}


class _KindOf(dict):
    """Token text -> kind, for one file.  It starts from _OWN_KINDS, the texts
    that are their own kind.  Any other text's kind follows from its first
    character, worked out the first time the text is met (names and numbers
    repeat), so `map` looks most tokens up without a Python call.  A text
    that is no token (one of _STOPS: a lone quote is what is left of an
    unterminated literal; or a character no token starts with) is an ERROR,
    and `failed` tells whether the file had one."""

    failed = False

    def __missing__(self, text: str) -> str:
        kind = "ERROR" if text in _STOPS else _KIND_OF_FIRST.get(text[0], "ERROR")
        if kind == "ERROR":
            self.failed = True
        self[text] = kind
        return kind


class _Tokens:
    """One file's tokens as parallel lists.  A kind is the token's own text for
    keywords and punctuation, else NAME, INT, CHAR or STRING; the list ends
    with "$END", after an "ERROR" token where the text stopped making sense."""

    def __init__(self, kinds: list[str], texts: list[str], starts: list[int], text: str):
        self.text = text
        self.kinds = kinds
        self.texts = texts
        self.starts = starts
        # Where each line starts, then where the text ends for good (beyond any offset).
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)] + [1 << 62]


def _lex(text: str) -> _Tokens:
    # `split` cuts the text at the groups, (between, blanks, token) per match
    # with `between` always empty, and makes no match object per token; the
    # starts are the running lengths of blanks and tokens.  Only the end of
    # the text matches an empty token ($END); twice if blanks end the text
    # (after them, then as an empty match), once otherwise.  The lexing
    # stops at the first ERROR.
    pieces = _TOKEN.split(text)
    del pieces[::3]
    texts = pieces[1::2]
    starts = list(accumulate(map(len, pieces)))[::2]
    kind_of = _KindOf(_OWN_KINDS)
    kinds = list(map(kind_of.__getitem__, texts))
    if len(texts) > 1 and texts[-2] == "":
        del kinds[-1], texts[-1], starts[-1]
    if kind_of.failed:
        last = kinds.index("ERROR")
        del kinds[last + 1:], texts[last + 1:], starts[last + 1:]
        kinds.append("$END")
        texts.append("")
        starts.append(len(text))
    return _Tokens(kinds, texts, starts, text)


# -- parsing ---------------------------------------------------------------------------------------------

# Binary operators by precedence (docs/language.md 5.1); comparisons do not chain.
_PRECEDENCE = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<": 3, "<=": 3, ">": 3, ">=": 3, "|": 4, "^": 5,
               "&": 6, "<<": 7, ">>": 7, "+": 8, "-": 8, "*": 9, "/": 9, "%": 9}
_COMPARISON = 3
# Every token kind's precedence as a binary operator, 0 for the kinds that are none: the
# operator loop indexes it for every operand it parses, without a default.
_BINDING = dict.fromkeys((*_OWN_KINDS.values(), "NAME", "INT", "CHAR", "STRING", "ERROR"), 0) | _PRECEDENCE
_PREFIX = frozenset(("-", "!", "~", "*", "&"))
_POSTFIX = frozenset(("(", "[", "."))
_ASSIGN = {"=": "=", "+=": "+", "-=": "-", "*=": "*", "/=": "/", "%=": "%", "&=": "&", "|=": "|",
           "^=": "^", "<<=": "<<", ">>=": ">>"}
_ESCAPES = {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, "'": 39, '"': 34}
_DIGITS = {16: re.compile("[0-9a-fA-F]+(?:_[0-9a-fA-F]+)*"), 2: re.compile("[01]+(?:_[01]+)*"),
           10: re.compile("[0-9]+(?:_[0-9]+)*")}
_MAX_DIGITS = {16: 16, 2: 64, 10: 20}     # significant digits of 2**64 - 1
_new_tuple = tuple.__new__                # makes a Loc without the Python-level call of Loc()


class _Stuck(Exception):
    """No grammar rule can take token `at`: a syntax error, described by `_syntax_error`."""

    def __init__(self, at: int):
        super().__init__(at)
        self.at = at


class _Parser:
    """Recursive descent over one file's tokens, one method per grammar rule.

    `depth` counts the syntax-tree levels above what is being parsed; an
    expression or type method leaves the height of the tree it returns in
    `height`, so a tree never gets deeper than MAX_NESTING levels (left-deep
    chains such as `a + b + c` are built in loops, not by recursion).
    Parentheses only group: they add no level."""

    def __init__(self, tokens: _Tokens, path: str):
        self.tokens = tokens
        self.kinds, self.texts, self.starts = tokens.kinds, tokens.texts, tokens.starts
        self.path = path
        self.i = 0
        self.depth = 0
        self.height = 0
        self.item_start = 0
        self.line_starts = tokens.line_starts
        self.line, self.line_start, self.line_end = 1, 0, self.line_starts[1]    # the line of the last `loc`

    def program(self) -> list[ast.Item]:
        items = []
        with deep_recursion():
            try:
                while self.kinds[self.i] != "$END":
                    self.item_start = self.i
                    items.append(self.item())
            except _Stuck as e:
                raise _syntax_error(self.tokens, self.path, e.at, self.item_start) from None
        return items

    # -- tokens
    def loc(self, i: int) -> Loc:
        offset = self.starts[i]
        if not self.line_start <= offset < self.line_end:
            # The parser moves forward: the line of the last call is a good guess, the next
            # line the best one after it (85% of the rest).
            starts = self.line_starts
            line = self.line + 1 if self.line_end <= offset < starts[self.line + 1] else bisect_right(starts, offset)
            self.line, self.line_start, self.line_end = line, starts[line - 1], starts[line]
        return _new_tuple(Loc, (self.path, self.line, offset - self.line_start + 1))

    def stuck(self) -> _Stuck:
        return _Stuck(self.i)

    def expect(self, kind: str) -> int:
        i = self.i
        if self.kinds[i] != kind:
            raise _Stuck(i)
        self.i = i + 1
        return i

    def accept(self, kind: str) -> bool:
        if self.kinds[self.i] == kind:
            self.i += 1
            return True
        return False

    def name(self) -> str:
        return self.texts[self.expect("NAME")]

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.too_deep(self.i)

    def nest(self, height: int, at: int) -> int:
        """Check a tree of `height` levels starting here; returns the height."""
        if self.depth + height > MAX_NESTING:
            raise self.too_deep(at)
        return height

    def too_deep(self, at: int) -> CompileError:
        return CompileError(self.loc(at), f"program nested too deeply (more than {MAX_NESTING} levels)")

    # -- items
    def item(self) -> ast.Item:
        if self.kinds[self.i] == "import":
            return self.import_item()
        if self.accept("private"):
            item = self.declaration()
            item.private = True
            return item
        return self.declaration()

    def declaration(self) -> ast.Const | ast.Global | ast.Struct | ast.Fn:
        match self.kinds[self.i]:
            case "const":
                return self.const_item()
            case "var":
                return self.global_item()
            case "struct":
                return self.struct_item()
            case "user":
                return self.global_item() if self.kinds[self.i + 1] == "var" else self.fn_item()
            case "fn" | "interrupt" | "syscall":
                return self.fn_item()
        raise self.stuck()

    def import_item(self) -> ast.Import:
        at = self.expect("import")
        path_at = self.expect("STRING")
        alias = self.name() if self.accept("as") else None
        self.expect(";")
        try:
            path = self.string(path_at).decode()
        except UnicodeDecodeError:
            raise CompileError(self.loc(path_at), "the import path is not valid UTF-8") from None
        return ast.Import(self.loc(at), path, alias=alias)

    def const_item(self) -> ast.Const:
        self.enter()
        at = self.expect("const")
        name = self.name()
        self.expect(":")
        ty = self.type()
        self.expect("=")
        value = self.expr()
        self.expect(";")
        self.depth -= 1
        return ast.Const(self.loc(at), name, ty, value)

    def global_item(self) -> ast.Global:
        self.enter()
        at = self.i
        user = self.accept("user")
        self.expect("var")
        name, ty = self.name(), self.optional_type()
        align = None
        if self.accept("align"):
            self.expect("(")
            align = self.expr()
            self.expect(")")
        init = self.optional_init()
        self.expect(";")
        self.depth -= 1
        return ast.Global(self.loc(at), name, ty, init, user=user, align=align)

    def optional_type(self) -> ast.TypeExpr | None:
        return self.type() if self.accept(":") else None

    def optional_init(self) -> ast.Expr | None:
        return self.expr() if self.accept("=") else None

    def struct_item(self) -> ast.Struct:
        self.enter()
        at = self.expect("struct")
        name = self.name()
        self.expect("{")
        fields = []
        while not self.accept("}"):
            fields.append(self.field())
            if not self.accept(","):
                self.expect("}")
                break
        self.depth -= 1
        return ast.Struct(self.loc(at), name, fields)

    def field(self) -> ast.FieldDecl:
        self.enter()
        at = self.i
        name = self.name()
        self.expect(":")
        ty = self.type()
        self.depth -= 1
        return ast.FieldDecl(self.loc(at), name, ty)

    def fn_item(self) -> ast.Fn:
        self.enter()
        at = self.i
        interrupt = self.accept("interrupt")
        error_code = interrupt and self.accept("(")
        if error_code:
            word = self.expect("NAME")
            if self.texts[word] != "error_code":
                raise CompileError(self.loc(word), f"expected 'error_code', found {_show(self.texts[word])}")
            self.expect(")")
        syscall = not interrupt and self.accept("syscall")
        user = not (interrupt or syscall) and self.accept("user")
        self.expect("fn")
        name = self.name()
        self.expect("(")
        params = []
        while not self.accept(")"):
            params.append(self.param())
            if not self.accept(","):
                self.expect(")")
                break
        result = self.type() if self.accept("->") else None
        body = self.block()
        end = self.loc(self.i - 1)          # the body's closing brace
        self.depth -= 1
        return ast.Fn(self.loc(at), name, params, result, body, end, interrupt=interrupt,
                      error_code=error_code, syscall=syscall, user=user)

    def param(self) -> ast.Param:
        self.enter()
        at = self.i
        name = self.name()
        self.expect(":")
        ty = self.type()
        self.depth -= 1
        return ast.Param(self.loc(at), name, ty)

    # -- types
    def type(self) -> ast.TypeExpr:
        at = self.i
        match self.kinds[at]:
            case "NAME":
                self.i += 1
                self.height = 1
                name = self.texts[at] if self.kinds[at + 1] != "::" else self.qualified(at)
                return ast.TName(self.loc(at), name)
            case "*":
                self.i += 1
                self.enter()
                target = self.type()
                self.depth -= 1
                self.height = self.nest(self.height + 1, at)
                return ast.TPtr(self.loc(at), target)
            case "[":
                return self.array_type()
            case "fn":
                return self.fn_type()
        raise self.stuck()

    def array_type(self) -> ast.TArray:
        at = self.expect("[")
        self.enter()
        elem = self.type()
        height = self.height
        self.expect(";")
        size = self.expr()
        self.expect("]")
        self.depth -= 1
        self.height = self.nest(max(height, self.height) + 1, at)
        return ast.TArray(self.loc(at), elem, size)

    def fn_type(self) -> ast.TFn:
        at = self.expect("fn")
        self.expect("(")
        self.enter()
        params, height = [], 0
        while not self.accept(")"):
            params.append(self.type())
            height = max(height, self.height)
            if not self.accept(","):
                self.expect(")")
                break
        result = None
        if self.accept("->"):
            result = self.type()
            height = max(height, self.height)
        self.depth -= 1
        self.height = self.nest(height + 1, at)
        return ast.TFn(self.loc(at), params, result)

    # -- statements
    def block(self) -> ast.Block:
        self.enter()
        loc = self.loc(self.expect("{"))     # before the statements: `loc` is cheapest moving forward
        stmts = []
        while self.kinds[self.i] != "}":
            stmts.append(self.stmt())
        self.expect("}")
        self.depth -= 1
        return ast.Block(loc, stmts)

    def stmt(self) -> ast.Stmt:
        match self.kinds[self.i]:
            case "var":
                return self.var_stmt()
            case "if":
                return self.if_stmt()
            case "while":
                return self.while_stmt()
            case "for":
                return self.for_stmt()
            case "break":
                return ast.Break(self.loc(self.jump_stmt()))
            case "continue":
                return ast.Continue(self.loc(self.jump_stmt()))
            case "return":
                return self.return_stmt()
            case "{":
                return self.block()
        return self.expr_or_assign_stmt()

    def var_stmt(self) -> ast.VarStmt:
        self.enter()
        at = self.expect("var")
        name, ty, init = self.name(), self.optional_type(), self.optional_init()
        self.expect(";")
        self.depth -= 1
        return ast.VarStmt(self.loc(at), name, ty, init)

    def expr_or_assign_stmt(self) -> ast.Assign | ast.ExprStmt:
        self.enter()
        at = self.first_token()
        target = self.expr()
        op_at = self.i
        op = self.kinds[op_at]
        if op in _ASSIGN:
            self.i += 1
            value = self.expr()
            self.expect(";")
            self.depth -= 1
            return ast.Assign(self.loc(op_at), _ASSIGN[op], target, value)
        self.expect(";")
        self.depth -= 1
        return ast.ExprStmt(self.loc(at), target)

    def if_stmt(self) -> ast.If:
        # `else if` chains are flat: one If, one arm per condition, no nesting.
        self.enter()
        loc = self.loc(self.expect("if"))
        arms = []
        while True:
            arms.append((self.expr(), self.block()))
            if not self.accept("else"):
                else_ = None
                break
            if not self.accept("if"):
                else_ = self.block()
                break
        self.depth -= 1
        return ast.If(loc, arms, else_)

    def while_stmt(self) -> ast.While:
        self.enter()
        loc = self.loc(self.expect("while"))
        cond = self.expr()
        body = self.block()
        self.depth -= 1
        return ast.While(loc, cond, body)

    def for_stmt(self) -> ast.For:
        self.enter()
        loc = self.loc(self.expect("for"))
        name_at = self.expect("NAME")
        name_loc = self.loc(name_at)
        self.expect("in")
        start = self.expr()
        self.expect("..")
        end = self.expr()
        body = self.block()
        self.depth -= 1
        return ast.For(loc, self.texts[name_at], name_loc, start, end, body)

    def jump_stmt(self) -> int:
        """`break ;` or `continue ;`: the keyword's token."""
        at = self.i
        self.i += 1
        self.expect(";")
        return at

    def return_stmt(self) -> ast.Return:
        self.enter()
        at = self.expect("return")
        value = None if self.kinds[self.i] == ";" else self.expr()
        self.expect(";")
        self.depth -= 1
        return ast.Return(self.loc(at), value)

    # -- expressions
    def first_token(self) -> int:
        """The token an expression starting here is located at: the first after any '('."""
        i = self.i
        while self.kinds[i] == "(":
            i += 1
        return i

    def expr(self, lowest: int = 1, left: ast.Expr | None = None) -> ast.Expr:
        """An operand (`left`, if it has just been parsed) and what follows it joined
        by binary operators of precedence `lowest` or higher."""
        if left is None:
            left = self.cast()
        kinds = self.kinds
        height = self.height
        while True:
            at = self.i
            op = kinds[at]
            precedence = _BINDING[op]
            if precedence < lowest:
                self.height = height
                return left
            self.i = at + 1
            self.enter()
            right = self.cast()
            if _BINDING[kinds[self.i]] > precedence:
                right = self.expr(precedence + 1, right)
            self.depth -= 1
            height = self.nest(max(height, self.height) + 1, at)
            left = ast.Binary(self.loc(at), op, left, right)
            if precedence == _COMPARISON and _BINDING[kinds[self.i]] == _COMPARISON:
                raise self.stuck()

    def cast(self) -> ast.Expr:
        """A unary expression and any `as T` after it (the common cases without calls)."""
        kinds = self.kinds
        start = self.i
        while kinds[start] == "(":
            start += 1
        plain = start == self.i         # no '(': the operand's position is that of `start`
        if kinds[self.i] in _PREFIX:
            operand = self.unary()
        else:
            operand = self.primary()
            if kinds[self.i] in _POSTFIX:
                operand = self.postfix(start, operand, operand.loc if plain else self.loc(start))
        if kinds[self.i] != "as":
            return operand
        return self.casts(start, operand, operand.loc if plain else self.loc(start))

    def casts(self, start: int, operand: ast.Expr, where: Loc) -> ast.Expr:
        """`operand` followed by any number of `as T`; the casts are located at `start`,
        whose position `where` is (the caller often has it at hand)."""
        height = self.height
        while self.accept("as"):
            self.enter()
            target = self.type()
            self.depth -= 1
            height = self.nest(max(height, self.height) + 1, start)
            operand = ast.Cast(where, operand, target)
        self.height = height
        return operand

    def unary(self) -> ast.Expr:
        kinds = self.kinds
        first = self.i
        while kinds[self.i] in _PREFIX:
            self.i += 1
        count = self.i - first
        if self.depth + count > MAX_NESTING:
            raise self.too_deep(first + max(0, MAX_NESTING - self.depth))
        self.depth += count
        start = self.first_token()
        plain = start == self.i
        operand = self.primary()
        if kinds[self.i] in _POSTFIX:
            operand = self.postfix(start, operand, operand.loc if plain else self.loc(start))
        self.depth -= count
        height = self.nest(self.height + count, first)
        for at in range(first + count - 1, first - 1, -1):
            operand = ast.Unary(self.loc(at), kinds[at], operand)
        self.height = height
        return operand

    def postfix(self, start: int, base: ast.Expr, where: Loc) -> ast.Expr:
        """`base`, a primary expression located at `start` (whose position is
        `where`), and the calls, indexes and field accesses after it."""
        kinds = self.kinds
        height = self.height
        while True:
            kind = kinds[self.i]
            if kind == "(":
                self.i += 1
                self.enter()
                args = self.exprs(")")
                self.depth -= 1
                base = ast.Call(where, base, args)
            elif kind == "[":
                self.i += 1
                self.enter()
                index = self.expr()
                self.expect("]")
                self.depth -= 1
                base = ast.Index(where, base, index)
            elif kind == ".":
                name_at = self.i + 1
                self.i += 1
                self.expect("NAME")
                self.height = 0
                base = ast.FieldAccess(where, base, self.texts[name_at], name_loc=self.loc(name_at))
            else:
                self.height = height
                return base
            height = self.nest(max(height, self.height) + 1, start)

    def exprs(self, close: str) -> list[ast.Expr]:
        """A comma-separated list of expressions (a trailing comma allowed), then `close`."""
        items, height = [], 0
        while not self.accept(close):
            items.append(self.expr())
            height = max(height, self.height)
            if not self.accept(","):
                self.expect(close)
                break
        self.height = height
        return items

    def primary(self) -> ast.Expr:
        at = self.i
        self.i = at + 1
        self.height = 1
        match self.kinds[at]:
            case "NAME":
                name = self.texts[at] if self.kinds[at + 1] != "::" else self.qualified(at)
                return ast.Name(self.loc(at), name)
            case "INT":
                text = self.texts[at]
                value = int(text) if len(text) < 20 and text.isdigit() else self.integer(at)
                return ast.IntLit(self.loc(at), value)
            case "(":
                self.i = at
                return self.group()
            case "[":
                self.i = at
                return self.array_lit()
            case "CHAR":
                return ast.CharLit(self.loc(at), self.char(at))
            case "STRING":
                return ast.StrLit(self.loc(at), self.string(at))
            case "true" | "false" as word:
                return ast.BoolLit(self.loc(at), word == "true")
            case "syscall":
                return ast.Name(self.loc(at), "syscall")      # in an expression the keyword names the intrinsic
            case "null":
                return ast.Null(self.loc(at))
            case "sizeof" | "offsetof":
                self.i = at
                return self.type_query()
        self.i = at
        raise self.stuck()

    def qualified(self, at: int) -> str:
        """`m::name`: the module name at token `at`, then `::` and a name (the cursor is past `at`).
        Most names are plain, which the callers see without a call."""
        self.expect("::")
        return f"{self.texts[at]}::{self.texts[self.expect('NAME')]}"

    def type_query(self) -> ast.SizeOf | ast.OffsetOf:
        """`sizeof ( type )` or `offsetof ( type , NAME )`."""
        at = self.i
        word = self.kinds[at]
        self.i += 1
        self.expect("(")
        self.enter()
        target = self.type()
        self.depth -= 1
        if word == "sizeof":
            self.expect(")")
            self.height = 1
            return ast.SizeOf(self.loc(at), target)
        self.expect(",")
        name_at = self.expect("NAME")
        self.expect(")")
        self.height = 1
        return ast.OffsetOf(self.loc(at), target, self.texts[name_at], field_loc=self.loc(name_at))

    def group(self) -> ast.Expr:
        """`( expr )`.  A run of '(' is taken in a loop, each ')' then continuing
        the expression around it, so parentheses nest without recursion."""
        first = self.i
        while self.kinds[self.i] == "(":
            self.i += 1
        start = self.i
        e = self.expr()
        self.expect(")")
        for _ in range(start - first - 1):
            where = self.loc(start)
            e = self.expr(1, self.casts(start, self.postfix(start, e, where), where))
            self.expect(")")
        return e

    def array_lit(self) -> ast.ArrayLit:
        at = self.expect("[")
        self.enter()
        elems = self.exprs("]")
        self.depth -= 1
        self.height = self.nest(self.height + 1, at)
        return ast.ArrayLit(self.loc(at), elems)

    # -- literal spelling
    def integer(self, at: int) -> int:
        """An integer literal's value.  (`primary` takes short plain decimals, most of them, itself.)"""
        text = self.texts[at]
        base, digits = 10, text
        if text[:2] in ("0x", "0X"):
            base, digits = 16, text[2:]
        elif text[:2] in ("0b", "0B"):
            base, digits = 2, text[2:]
        if not _DIGITS[base].fullmatch(digits):
            raise CompileError(self.loc(at), f"malformed integer literal {_show(text)}")
        # Count digits before converting: int() refuses very long decimal strings.
        digits = digits.replace("_", "").lstrip("0") or "0"
        if len(digits) > _MAX_DIGITS[base] or int(digits, base) >> 64:
            raise CompileError(self.loc(at), f"integer literal {_show(text)} is larger than 64 bits")
        return int(digits, base)

    def char(self, at: int) -> int:
        value = self.unescape(at)
        if len(value) != 1:
            what = "empty character literal" if not value else "character literal must hold exactly one byte"
            raise CompileError(self.loc(at), what)
        return value[0]

    def string(self, at: int) -> bytes:
        return self.unescape(at)

    def unescape(self, at: int) -> bytes:
        """The bytes between the quotes of a string or character literal."""
        body = self.texts[at][1:-1]
        if "\\" not in body:
            return body.encode()
        out = bytearray()
        i = 0
        while i < len(body):
            c = body[i]
            if c != "\\":
                out += c.encode()
                i += 1
                continue
            e = body[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
            elif e == "x" and re.fullmatch("[0-9a-fA-F]{2}", body[i + 2:i + 4]):
                out.append(int(body[i + 2:i + 4], 16))
                i += 4
            else:
                where = self.loc(at)
                where = Loc(where.file, where.line, where.col + 1 + i)
                why = "'\\x' needs two hex digits" if e == "x" else f"unknown escape sequence {_show(c + e)}"
                raise CompileError(where, why)
        return bytes(out)


# -- syntax errors ------------------------------------------------------------------------------------

_TOKEN_NAMES = {"NAME": "identifier", "INT": "integer", "CHAR": "character literal", "STRING": "string"}
_GRAMMAR = Path(__file__).with_name("grammar") / "pvk.lark"
_reference: lark.Lark | None = None


def _grammar() -> lark.Lark:
    global _reference
    if _reference is None:
        _reference = lark.Lark(_GRAMMAR.read_text(), parser="lalr", lexer="basic")
    return _reference


def _syntax_error(tokens: _Tokens, path: str, at: int, item_start: int) -> CompileError:
    """The error for token `at`, which no rule takes.  What was expected there
    comes from the grammar's LALR parser, re-run from the start of the item:
    both parsers stop at the first token that cannot continue the program."""
    parser = _Parser(tokens, path)
    kind, start = tokens.kinds[at], tokens.starts[at]
    loc = parser.loc(at)
    if kind == "ERROR":
        return CompileError(loc, _unlexable(tokens.text, start))
    expected = sorted(_describe(name) for name in _grammar_expects(tokens, at, item_start, loc))
    found = "end of file" if kind == "$END" else _show(tokens.texts[at])
    if "';'" in expected and at > 0:
        # A missing ';' is best reported where it belongs, after the last token;
        # but `a < b < c` is an unexpected operator, not a missing ';'.
        before = parser.loc(at - 1)
        starts_statement = kind == "$END" or not re.fullmatch(r"[^\w}]+", tokens.texts[at]) \
            or before.line < loc.line
        if starts_statement:
            return CompileError(Loc(path, before.line, before.col + len(tokens.texts[at - 1])), "expected ';'")
    if len(expected) <= 3:
        options = " or ".join(expected) if len(expected) < 3 else \
            f"{expected[0]}, {expected[1]} or {expected[2]}"
        return CompileError(loc, f"expected {options}, found {found}")
    return CompileError(loc, f"unexpected {found}")


def _grammar_expects(tokens: _Tokens, at: int, item_start: int, loc: Loc) -> set[str]:
    """The terminals lark's parser accepts where it meets token `at`."""
    base = tokens.starts[item_start]
    try:
        _grammar().parse(tokens.text[base:])
    except lark.exceptions.UnexpectedToken as e:
        stop = len(tokens.text) if e.token.type == "$END" else base + e.token.start_pos
        if stop == tokens.starts[at]:
            # LALR merges lookaheads, so e.expected may list tokens that would
            # fail a step later; the interactive parser knows what really fits.
            return set(e.interactive_parser.accepts() - {"$END"} or e.expected)
    except lark.exceptions.LarkError:
        pass
    raise InternalError("parse", f"the parser and grammar/pvk.lark disagree at {loc}")


def _describe(terminal: str) -> str:
    if terminal in _TOKEN_NAMES:
        return _TOKEN_NAMES[terminal]
    pattern = _grammar().get_terminal(terminal).pattern
    return f"'{pattern.value}'" if isinstance(pattern, lark.lexer.PatternStr) else terminal.lower()


def _unlexable(text: str, start: int) -> str:
    """Why no token starts at `start`."""
    if text.startswith("/*", start):
        return "unterminated comment"
    if text.startswith('"', start):
        return "unterminated string literal"
    if text.startswith("'", start):
        return "unterminated character literal"
    return f"unexpected character {_show(text[start])}"


def _show(text: str) -> str:
    """A token or character for a message: quoted, shortened, with control bytes escaped."""
    if len(text) > 20:
        text = text[:20] + "..."
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"'{shown}'"
