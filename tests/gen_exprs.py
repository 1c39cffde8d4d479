"""Random PVK expression programs and their values under PVK's semantics.

The differential test (test_differential.py) builds one kernel that prints
many random expressions over every integer type and compares what the
machine prints with what this module computes in Python.  The oracle is
written from docs/language.md, not from the compiler:

- arithmetic wraps modulo 2^width; signed `/` truncates toward zero and `%`
  takes the sign of the dividend; `>>` is arithmetic for signed operands;
  a shift count from the width up to 63 shifts every bit out (§5.3-5.4);
- `e as T` takes the value modulo 2^width(T), extended by the source's sign;
- an integer literal takes its type from its context, and an expression
  made only of literals and arithmetic ("flexible") takes the context's
  type as a whole; with no context (the operand of `as`, a shift count,
  literals compared with literals) it is u64 (§5.2).

Every node is generated for an intended type, and flexible nodes are only
put where the context gives them exactly that type, so a node's value is
known when it is made.  Divisors are kept nonzero and `i64::MIN / -1` is
avoided (both fault); everything else the language defines is fair game.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class IntType:
    name: str
    bits: int
    signed: bool

    @property
    def min(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return (1 << (self.bits - 1 if self.signed else self.bits)) - 1

    def wrap(self, v: int) -> int:
        """v modulo 2^bits, as this type's canonical (signed or not) value."""
        v &= (1 << self.bits) - 1
        if self.signed and v >> (self.bits - 1):
            v -= 1 << self.bits
        return v


INT_TYPES = {t.name: t for t in (
    IntType("u8", 8, False), IntType("u16", 16, False), IntType("u32", 32, False), IntType("u64", 64, False),
    IntType("i8", 8, True), IntType("i16", 16, True), IntType("i32", 32, True), IntType("i64", 64, True))}
U64 = INT_TYPES["u64"]
BOOL = "bool"


@dataclass(frozen=True)
class Expr:
    text: str
    type: str            # an INT_TYPES name or "bool"
    value: int           # canonical: negative for negative signed values, 0/1 for bool
    flexible: bool = False   # literals and arithmetic on them only: typed by the context


@dataclass(frozen=True)
class Var:
    name: str
    type: str
    value: int


@dataclass(frozen=True)
class Case:
    """One printed result: `var rN: TYPE = TEXT;` then its bits as a u64."""
    text: str
    type: str
    value: int

    @property
    def printed(self) -> str:
        return format(self.value & ((1 << 64) - 1), "x")


# -- the oracle -------------------------------------------------------------------------------

def divide(a: int, b: int) -> tuple[int, int]:
    """Quotient and remainder rounding toward zero (x86 idiv, C99)."""
    q = abs(a) // abs(b)
    if (a < 0) != (b < 0):
        q = -q
    return q, a - b * q


def binary(op: str, t: IntType, a: int, b: int) -> int:
    if op == "+":
        return t.wrap(a + b)
    if op == "-":
        return t.wrap(a - b)
    if op == "*":
        return t.wrap(a * b)
    if op in "/%":
        q, r = divide(a, b)
        return t.wrap(q if op == "/" else r)
    if op == "&":
        return t.wrap(a & b)
    if op == "|":
        return t.wrap(a | b)
    if op == "^":
        return t.wrap(a ^ b)
    if op == "<<":
        return t.wrap(a << (b % 64))
    if op == ">>":
        return t.wrap(a >> (b % 64))   # a is canonical, so Python's >> is the right kind
    raise ValueError(op)


def compare(op: str, a: int, b: int) -> int:
    return int({"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op])


def convert(v: int, to: str) -> int:
    return INT_TYPES[to].wrap(v)


# -- the generator ------------------------------------------------------------------------------

ARITH = ("+", "-", "*", "/", "%", "&", "|", "^")
COMPARES = ("==", "!=", "<", "<=", ">", ">=")
CHARS = {"'a'": 97, "'Z'": 90, "'0'": 48, "'\\n'": 10, "'\\0'": 0, "'\\\\'": 92, "'\\''": 39,
         "'\\x41'": 0x41, "'\\xff'": 0xFF}


def interesting(t: IntType, rng: random.Random) -> int:
    """A value near an edge of t (where wrapping and sign bugs live), or a random one."""
    edges = [0, 1, 2, t.max, t.max - 1, t.min, t.min + 1, 1 << (t.bits - 2), 0x7F, 0x80]
    if t.signed:
        edges += [-1, -2, -7, -(1 << (t.bits - 2))]
    pick = rng.random()
    if pick < 0.5:
        return t.wrap(rng.choice(edges))
    if pick < 0.75:
        return t.wrap(rng.randrange(-300, 300))
    return t.wrap(rng.getrandbits(t.bits))


def literal_text(n: int, rng: random.Random) -> str:
    """A nonnegative literal in one of PVK's spellings (decimal, hex, binary, with `_`)."""
    style = rng.random()
    if style < 0.55:
        text = str(n)
    elif style < 0.85:
        text = "0x" + format(n, rng.choice("xX"))
    else:
        text = "0b" + format(n, "b")
    if rng.random() < 0.1 and len(text) > 4:
        cut = rng.randrange(3, len(text) - 1)
        text = text[:cut] + "_" + text[cut:]
    return text


def safe_divisor(t: IntType, a: Expr, b: Expr) -> Expr:
    """b, changed if a / b would fault: by zero, or i64 MIN / -1 (idiv's overflow)."""
    if b.value == 0:
        b = Expr(f"({b.text} | 1)", t.name, b.value | 1, b.flexible)
    if t.name == "i64" and a.value == t.min and b.value == -1:
        b = Expr("3", t.name, 3, True)
    return b


@dataclass
class ExprGen:
    rng: random.Random
    vars: list[Var]
    over_shift: float = 0.1      # share of shift counts masked to 0..63 rather than 0..width-1
    by_type: dict[str, list[Var]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_type = {}
        for v in self.vars:
            self.by_type.setdefault(v.type, []).append(v)

    # leaves

    def literal(self, t: IntType) -> Expr:
        v = interesting(t, self.rng)
        if v < 0:       # `-N`: N may be one past the signed maximum (-128 is an i8)
            return Expr(f"(-{literal_text(-v, self.rng)})", t.name, v, True)
        if v > 0 and not t.signed and self.rng.random() < 0.1:   # `-N` wraps for unsigned types
            return Expr(f"(-{literal_text((1 << t.bits) - v, self.rng)})", t.name, v, True)
        return Expr(literal_text(v, self.rng), t.name, v, True)

    def leaf(self, t: IntType) -> Expr:
        r = self.rng.random()
        if t.name == "u8" and r < 0.08:
            text, value = self.rng.choice(list(CHARS.items()))
            return Expr(text, "u8", value)
        if r < 0.6 and self.by_type.get(t.name):
            v = self.rng.choice(self.by_type[t.name])
            return Expr(v.name, t.name, v.value)
        return self.literal(t)

    # integer-valued nodes

    def int_expr(self, t: IntType, depth: int) -> Expr:
        if depth <= 0 or self.rng.random() < 0.15:
            return self.leaf(t)
        kind = self.rng.choices(["arith", "shift", "unary", "cast", "bool", "call"], [10, 3, 2, 3, 1, 1])[0]
        return getattr(self, "make_" + kind)(t, depth - 1)

    def make_arith(self, t: IntType, depth: int) -> Expr:
        op = self.rng.choice(ARITH)
        a, b = self.int_expr(t, depth), self.int_expr(t, depth)
        if op in "/%":
            b = safe_divisor(t, a, b)
        return Expr(f"({a.text} {op} {b.text})", t.name, binary(op, t, a.value, b.value),
                    a.flexible and b.flexible)

    def make_shift(self, t: IntType, depth: int) -> Expr:
        op = self.rng.choice(("<<", ">>"))
        a = self.int_expr(t, depth)
        count = self.shift_count(t, depth)
        return Expr(f"({a.text} {op} {count.text})", t.name, binary(op, t, a.value, count.value), a.flexible)

    def shift_count(self, t: IntType, depth: int) -> Expr:
        """A count of any integer type, 0..width-1 (now and then 0..63, which §5.4 also defines)."""
        mask = 63 if self.rng.random() < self.over_shift else t.bits - 1
        if self.rng.random() < 0.4:
            k = self.rng.randrange(mask + 1)
            return Expr(str(k), "u64", k, True)
        c = self.untyped_context(self.rng.choice(list(INT_TYPES.values())), depth)
        ct = INT_TYPES[c.type]
        return Expr(f"({c.text} & {mask})", c.type, binary("&", ct, c.value, mask), c.flexible)

    def make_unary(self, t: IntType, depth: int) -> Expr:
        a = self.int_expr(t, depth)
        if self.rng.random() < 0.5:
            return Expr(f"(-{a.text})", t.name, t.wrap(-a.value), a.flexible)
        return Expr(f"(~{a.text})", t.name, t.wrap(~a.value), a.flexible)

    def make_cast(self, t: IntType, depth: int) -> Expr:
        a = self.untyped_context(self.rng.choice(list(INT_TYPES.values())), depth)
        return Expr(f"({a.text} as {t.name})", t.name, convert(a.value, t.name))

    def make_bool(self, t: IntType, depth: int) -> Expr:
        b = self.bool_expr(depth)
        return Expr(f"({b.text} as {t.name})", t.name, b.value)

    def make_call(self, t: IntType, depth: int) -> Expr:
        """Through a function taking and returning t: narrow values cross the ABI both ways."""
        a = self.int_expr(t, depth)
        return Expr(f"id_{t.name}({a.text})", t.name, a.value)

    def untyped_context(self, u: IntType, depth: int) -> Expr:
        """An operand where no type is expected: a flexible one is made again as a u64."""
        a = self.int_expr(u, depth)
        return self.int_expr(U64, depth) if a.flexible else a

    def compound(self, t: IntType, depth: int, name: str) -> tuple[Case, str]:
        """`x = a; x op= b;` on a local, a global array element or, through a
        pointer, an address-taken local; then `var NAME: t = x;`.  The case
        (the value after the update) and that source."""
        a = self.int_expr(t, depth - 1)
        op = self.rng.choice(ARITH + ("<<", ">>"))
        if op in ("<<", ">>"):
            b = self.shift_count(t, depth - 1)
        else:
            b = self.int_expr(t, depth - 1)
            if op in "/%":
                b = safe_divisor(t, a, b)
        where = self.rng.choice(("local", "global", "pointer"))
        if where == "local":
            x, first = name, f"var {name}: {t.name} = {a.text};"
            last = ""
        elif where == "global":
            x = f"s_{t.name}[{self.rng.randrange(2)}]"
            first, last = f"{x} = {a.text};", f" var {name}: {t.name} = {x};"
        else:
            x = f"(*q{name})"
            first = f"var w{name}: {t.name} = {a.text}; var q{name} = &w{name};"
            last = f" var {name}: {t.name} = w{name};"
        case = Case(f"{x} = {a.text}; {x} {op}= {b.text}", t.name, binary(op, t, a.value, b.value))
        return case, f"{first} {x} {op}= {b.text};{last}"

    # bool-valued nodes

    def bool_expr(self, depth: int) -> Expr:
        if depth <= 0:
            return self.make_compare(0)
        kind = self.rng.choices(["compare", "logic", "not", "literal"], [6, 3, 1, 1])[0]
        if kind == "literal":
            v = self.rng.random() < 0.5
            return Expr("true" if v else "false", BOOL, int(v))
        if kind == "not":
            a = self.bool_expr(depth - 1)
            return Expr(f"(!{a.text})", BOOL, 1 - a.value)
        if kind == "logic":
            op = self.rng.choice(("&&", "||"))
            a, b = self.bool_expr(depth - 1), self.bool_expr(depth - 1)
            v = (a.value and b.value) if op == "&&" else (a.value or b.value)
            return Expr(f"({a.text} {op} {b.text})", BOOL, int(bool(v)))
        return self.make_compare(depth - 1)

    def make_compare(self, depth: int) -> Expr:
        op = self.rng.choice(COMPARES)
        if self.rng.random() < 0.1:
            a, b = self.bool_expr(depth - 1), self.bool_expr(depth - 1)
            op = self.rng.choice(("==", "!="))
        else:
            t = self.rng.choice(list(INT_TYPES.values()))
            a, b = self.int_expr(t, depth), self.int_expr(t, depth)
            if a.flexible and b.flexible:     # literals compared with literals are u64
                a, b = self.int_expr(U64, depth), self.int_expr(U64, depth)
        return Expr(f"({a.text} {op} {b.text})", BOOL, compare(op, a.value, b.value))


# -- whole programs ---------------------------------------------------------------------------------

PRELUDE = """\
// Generated by tests/gen_exprs.py (seed {seed}): {count} random expressions,
// each printed in hex as a u64, one per line, then "done".
const COM1: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;

fn putc(c: u8) {{
    while (inb(COM1_LSR) & 0x20) == 0 {{ pause(); }}
    outb(COM1, c);
}}

fn put_hex(v: u64) {{
    var shift: u64 = 60;
    var started = false;
    while true {{
        var d = ((v >> shift) & 0xf) as u8;
        if d != 0 || started || shift == 0 {{
            started = true;
            if d < 10 {{ putc('0' + d); }} else {{ putc('a' + (d - 10)); }}
        }}
        if shift == 0 {{ break; }}
        shift -= 4;
    }}
    putc('\\n');
}}

{identities}
"""


@dataclass
class Program:
    seed: int
    text: str
    cases: list[Case]

    def expected_output(self) -> str:
        return "".join(c.printed + "\n" for c in self.cases) + "done\n"

    def mismatches(self, console: str, limit: int = 10) -> list[str]:
        """One line per case the console got wrong (the expression, its type, expected, got)."""
        got = console.split("\n")
        out = []
        for i, case in enumerate(self.cases):
            line = got[i] if i < len(got) else "<missing>"
            if line != case.printed:
                out.append(f"seed {self.seed} case {i}: {case.type} {case.text}: "
                           f"expected {case.value} (0x{case.printed}), got 0x{line}")
                if len(out) == limit:
                    break
        if not out and console != self.expected_output():
            out.append(f"seed {self.seed}: every value matches but the console ends {console[-80:]!r}")
        return out


def program(seed: int, count: int = 200, per_function: int = 25, depth: int = 4) -> Program:
    """A kernel printing `count` random expressions, `per_function` to a function.

    Each function gets values of every type through parameters (passed
    narrow, so the calling convention's extension rules are exercised),
    locals loaded from global tables, loads through pointers, global array
    elements and struct fields (narrow loads must extend by the type's
    sign), so nothing can be folded away; literal-only subexpressions are
    still folded by the compiler, which tests its constant folder against
    the same oracle.
    """
    rng = random.Random(seed)
    tables = {t: [interesting(INT_TYPES[t], rng) for _ in range(6)] for t in INT_TYPES}
    identities = "\n".join(f"fn id_{t}(x: {t}) -> {t} {{ return x; }}" for t in INT_TYPES)
    lines = [PRELUDE.format(seed=seed, count=count, identities=identities)]
    for t, values in tables.items():
        lines.append(f"var g_{t}: [{t}; {len(values)}] = [{', '.join(map(str, values))}];\n"
                     f"var s_{t}: [{t}; 2];")
    lines.append("struct Mix {\n" + "".join(f"    f_{t}: {t},\n" for t in INT_TYPES) + "}\nvar mix: Mix;")
    cases: list[Case] = []
    calls = []
    constants = ExprGen(rng, [])
    for f in range(0, count, per_function):
        params = [(f"p{i}", rng.choice(list(INT_TYPES)), rng.randrange(6)) for i in range(rng.randint(1, 6))]
        local_vars = [(f"v{i}", t, rng.randrange(6)) for i, t in enumerate(INT_TYPES)]
        local_vars += [(f"v{i + 8}", rng.choice(list(INT_TYPES)), rng.randrange(6)) for i in range(4)]
        pointers = [(f"q{i}", t, rng.randrange(6)) for i, t in enumerate(INT_TYPES)]
        scope = [Var(n, t, tables[t][k]) for n, t, k in params + local_vars]
        scope += [Var(f"(*{n})", t, tables[t][k]) for n, t, k in pointers]          # loads through pointers
        elements = [(t, rng.randrange(6)) for t in INT_TYPES]
        scope += [Var(f"g_{t}[{k}]", t, tables[t][k]) for t, k in elements]          # global array elements
        scope += [Var(f"pm.f_{t}", t, tables[t][5]) for t in INT_TYPES]             # struct fields
        gen = ExprGen(rng, scope)
        sig = ", ".join(f"{n}: {t}" for n, t, _ in params)
        body = [f"    var {n}: {t} = g_{t}[{k}];" for n, t, k in local_vars]
        body += [f"    var {n}: *{t} = &g_{t}[{k}];" for n, t, k in pointers]
        body.append("    var pm = &mix;")
        for i in range(f, min(f + per_function, count)):
            r, t = rng.random(), rng.choice(list(INT_TYPES.values()))
            if r < 0.1:
                case, source = gen.compound(t, depth, f"r{i}")
            else:
                if r < 0.2:
                    e = gen.bool_expr(depth)
                elif r < 0.3:
                    e = constants.int_expr(t, depth)     # all literals: the compiler folds it
                else:
                    e = gen.int_expr(t, depth)
                case, source = Case(e.text, e.type, e.value), f"var r{i}: {e.type} = {e.text};"
            cases.append(case)
            body.append("    " + source)
            body.append(f"    put_hex(r{i} as u64);")
        lines.append(f"fn chunk{f // per_function}({sig}) {{\n" + "\n".join(body) + "\n}")
        calls.append(f"    chunk{f // per_function}({', '.join(f'g_{t}[{k}]' for _, t, k in params)});")
    fill = [f"    mix.f_{t} = g_{t}[5];" for t in INT_TYPES]
    lines.append("fn kmain() -> u64 {\n" + "\n".join(fill + calls)
                 + "\n    putc('d'); putc('o'); putc('n'); putc('e'); putc('\\n');\n    return 0;\n}")
    return Program(seed, "\n\n".join(lines) + "\n", cases)


if __name__ == "__main__":
    import sys
    print(program(int(sys.argv[1]) if len(sys.argv) > 1 else 1).text)
