"""The PVK syntax tree, and the annotations the checker adds to it.

The parser builds these nodes, each with the `Loc` of its first token (binary
and assignment operators carry the operator's position).  `pvtool.typecheck`
fills in the fields marked "checker:" (types, resolved symbols, constant
values, field offsets); `pvtool.lower` reads them.  Those fields, and the
others set after a node is made, are no constructor parameters (init=False):
a keyword-only default costs a dictionary lookup per node made.  `dump`
prints a tree without positions, for tests.  The classes have slots: a
program has tens of thousands of nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Union

from .intrinsics import Intrinsic
from .source import Loc
from .types import FnType, Type


@dataclass(eq=False, slots=True)
class Node:
    loc: Loc


# -- type expressions (as written) --------------------------------------------

@dataclass(eq=False, slots=True)
class TName(Node):
    name: str


@dataclass(eq=False, slots=True)
class TPtr(Node):
    target: TypeExpr


@dataclass(eq=False, slots=True)
class TArray(Node):
    elem: TypeExpr
    size: Expr


@dataclass(eq=False, slots=True)
class TFn(Node):
    params: list[TypeExpr]
    result: TypeExpr | None


TypeExpr = Union[TName, TPtr, TArray, TFn]


# -- symbols (checker) -----------------------------------------------------------

@dataclass(eq=False, slots=True)
class Local:
    """A parameter, `var` or `for` variable of one function."""
    name: str
    type: Type
    loc: Loc
    addr_taken: bool = False   # `&x` appears somewhere: it must live in memory


@dataclass(eq=False, slots=True)
class GlobalSym:
    name: str
    type: Type | None
    item: Global
    link_name: str = ""        # the symbol in the image (the name, unless it must be told apart)


@dataclass(eq=False, slots=True)
class ConstSym:
    name: str
    type: Type | None
    item: Const
    value: int | None = None


@dataclass(eq=False, slots=True)
class FnSym:
    """A function's symbol.  It reads its type and link name from the item, which
    does not point back: no reference cycle keeps a whole body alive (see
    pvtool.driver.collector_paused)."""
    name: str
    item: Fn

    @property
    def type(self) -> FnType | None:
        """A handler's is its body's (frame: *TrapFrame); &handler is a fn()."""
        return self.item.type

    @property
    def link_name(self) -> str:
        return self.item.link_name


@dataclass(eq=False, slots=True)
class LinkSym:
    """A predeclared u64 whose value the linker fixes (USER_TEXT_START, ...): an address."""
    name: str


Symbol = Union[Local, GlobalSym, ConstSym, FnSym, LinkSym]


# -- expressions -------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class Expr(Node):
    # checker: the expression's type, and its value if it is a compile-time
    # constant (integers and bools; signed values are negative Python ints).
    type: Type | None = field(default=None, init=False, repr=False)
    const: int | None = field(default=None, init=False, repr=False)


@dataclass(eq=False, slots=True)
class IntLit(Expr):
    value: int


@dataclass(eq=False, slots=True)
class CharLit(Expr):
    value: int


@dataclass(eq=False, slots=True)
class StrLit(Expr):
    value: bytes          # without the terminating NUL


@dataclass(eq=False, slots=True)
class BoolLit(Expr):
    value: bool


@dataclass(eq=False, slots=True)
class ArrayLit(Expr):
    elems: list[Expr]


@dataclass(eq=False, slots=True)
class Name(Expr):
    name: str             # `m::x` for a name imported with `import "..." as m`
    sym: Symbol | None = field(default=None, init=False, repr=False)   # checker


@dataclass(eq=False, slots=True)
class Null(Expr):
    """`null`: the null pointer, of the pointer type its context expects."""


@dataclass(eq=False, slots=True)
class SizeOf(Expr):
    target: TypeExpr


@dataclass(eq=False, slots=True)
class OffsetOf(Expr):
    target: TypeExpr
    field: str
    field_loc: Loc | None = field(default=None, kw_only=True, repr=False)


@dataclass(eq=False, slots=True)
class Unary(Expr):
    op: str               # '-', '!', '~', '*' (deref), '&' (address of)
    operand: Expr


@dataclass(eq=False, slots=True)
class Binary(Expr):
    op: str
    left: Expr
    right: Expr


@dataclass(eq=False, slots=True)
class Cast(Expr):
    operand: Expr
    target: TypeExpr


@dataclass(eq=False, slots=True)
class Call(Expr):
    callee: Expr
    args: list[Expr]
    # checker: exactly one of these is set for a direct call; neither for an
    # indirect call through a function pointer.
    intrinsic: Intrinsic | None = field(default=None, init=False, repr=False)
    func: FnSym | None = field(default=None, init=False, repr=False)


@dataclass(eq=False, slots=True)
class Index(Expr):
    base: Expr
    index: Expr


@dataclass(eq=False, slots=True)
class FieldAccess(Expr):
    base: Expr
    name: str
    name_loc: Loc | None = field(default=None, kw_only=True, repr=False)
    # checker: byte offset of the field, and whether `base` is a pointer to the struct
    offset: int = field(default=0, init=False, repr=False)
    deref: bool = field(default=False, init=False, repr=False)


# -- statements ------------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class Block(Node):
    stmts: list[Stmt]


@dataclass(eq=False, slots=True)
class VarStmt(Node):
    name: str
    type_expr: TypeExpr | None
    init: Expr | None
    sym: Local | None = field(default=None, init=False, repr=False)   # checker


@dataclass(eq=False, slots=True)
class Assign(Node):
    op: str               # '=' or the operator of a compound assignment ('+', '<<', ...)
    target: Expr
    value: Expr


@dataclass(eq=False, slots=True)
class If(Node):
    arms: list[tuple[Expr, Block]]    # `if` and every `else if`
    else_: Block | None


@dataclass(eq=False, slots=True)
class While(Node):
    cond: Expr
    body: Block


@dataclass(eq=False, slots=True)
class For(Node):
    name: str
    name_loc: Loc
    start: Expr
    end: Expr
    body: Block
    sym: Local | None = field(default=None, init=False, repr=False)   # checker


@dataclass(eq=False, slots=True)
class Break(Node):
    pass


@dataclass(eq=False, slots=True)
class Continue(Node):
    pass


@dataclass(eq=False, slots=True)
class Return(Node):
    value: Expr | None


@dataclass(eq=False, slots=True)
class ExprStmt(Node):
    expr: Expr


Stmt = Union[Block, VarStmt, Assign, If, While, For, Break, Continue, Return, ExprStmt]


# -- items --------------------------------------------------------------------------------

@dataclass(eq=False, slots=True)
class Import(Node):
    path: str             # as written
    resolved: str = field(default="", init=False, repr=False)   # the path the file was parsed under
    alias: str | None = field(default=None, repr=False)   # `import "..." as alias;`


@dataclass(eq=False, slots=True)
class Const(Node):
    name: str
    type_expr: TypeExpr
    value: Expr
    sym: ConstSym | None = field(default=None, init=False, repr=False)
    private: bool = field(default=False, init=False, repr=False)


@dataclass(eq=False, slots=True)
class Global(Node):
    name: str
    type_expr: TypeExpr | None
    init: Expr | None
    sym: GlobalSym | None = field(default=None, init=False, repr=False)
    # checker: the initial value, see StaticValue
    value: StaticValue | None = field(default=None, init=False, repr=False)
    private: bool = field(default=False, init=False, repr=False)
    user: bool = field(default=False, kw_only=True, repr=False)          # `user var`
    align: Expr | None = field(default=None, kw_only=True, repr=False)   # `align(N)` as written
    alignment: int = field(default=0, init=False, repr=False)          # checker: N, or 0



@dataclass(eq=False, slots=True)
class FieldDecl(Node):
    name: str
    type_expr: TypeExpr


@dataclass(eq=False, slots=True)
class Struct(Node):
    name: str
    fields: list[FieldDecl]
    private: bool = field(default=False, init=False, repr=False)


@dataclass(eq=False, slots=True)
class Param(Node):
    name: str
    type_expr: TypeExpr
    sym: Local | None = field(default=None, init=False, repr=False)


@dataclass(eq=False, slots=True)
class Fn(Node):
    name: str
    params: list[Param]
    result: TypeExpr | None
    body: Block
    end: Loc                       # the body's closing brace: where falling off its end returns
    interrupt: bool = False        # `interrupt fn` or `interrupt(error_code) fn`
    # checker: the signature, and the symbol in the image (the name, unless it must be told apart)
    type: FnType | None = field(default=None, init=False, repr=False)
    link_name: str = field(default="", init=False, repr=False)
    error_code: bool = field(default=False, kw_only=True, repr=False)   # `interrupt(error_code) fn`
    syscall: bool = field(default=False, kw_only=True, repr=False)      # `syscall fn`
    user: bool = field(default=False, kw_only=True, repr=False)         # `user fn`
    private: bool = field(default=False, init=False, repr=False)

    @property
    def handler(self) -> bool:
        """Entered by the CPU (or the hypervisor), never called."""
        return self.interrupt or self.syscall

    @property
    def kind_name(self) -> str:
        """How the function is declared, for messages: 'fn', 'interrupt fn', ..."""
        if self.syscall:
            return "syscall fn"
        if self.interrupt:
            return "interrupt(error_code) fn" if self.error_code else "interrupt fn"
        return "user fn" if self.user else "fn"


Item = Union[Import, Const, Global, Struct, Fn]


@dataclass(eq=False, slots=True)
class Program:
    items: list[Item]
    files: list[str]       # main file first, then imports in the order first met
    sources: dict[str, str] = field(default_factory=dict, repr=False)   # each file's text, for errors
    checked: bool = field(default=False, init=False, repr=False)


# -- static initial values (checker -> lower) -------------------------------------------

@dataclass
class AddrValue:
    """The address of a global, function or string literal, plus a byte offset."""
    symbol: str | None     # None for a string literal
    offset: int = 0
    string: bytes | None = None


StaticValue = Union[int, AddrValue, list]   # a list for arrays (missing elements are zero)


# -- printing -----------------------------------------------------------------------------

def dump(node: object) -> str:
    """An s-expression of the tree without positions or checker annotations
    (the fields declared with repr=False)."""
    if isinstance(node, list):
        return "[" + " ".join(dump(n) for n in node) + "]"
    if isinstance(node, tuple):
        return "(" + " ".join(dump(n) for n in node) + ")"
    if not isinstance(node, (Node, Program)):
        return repr(node)
    parts = [type(node).__name__]
    for f in fields(node):
        value = getattr(node, f.name)
        if f.repr and not isinstance(value, Loc):
            parts.append(dump(value))
    return "(" + " ".join(parts) + ")"
