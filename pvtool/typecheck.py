"""Name resolution and type checking: the static rules of PVK.

`check` walks a parsed `ast.Program` and annotates it in place (see the
"checker:" fields in pvtool.ast): every expression gets its type and, when
it is a compile-time constant, its value; names get their symbols; calls,
field accesses, globals and locals get what `lower` needs.  The first
violation raises `CompileError`.

Top-level names live in one namespace shared by the files imported plainly
(and the main file); struct names in another.  A `private` item is seen only
in its own file, and the public items of a file imported `as m` only as
`m::name` (see `_Namespace`).  Structs are laid out before anything else;
constants and global types are resolved on first use, so items may refer to
each other in any order (a cycle is an error).  A `user fn` reaches only user
code and data.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import ast
from .diagnostics import CompileError, deep_recursion
from .errors import InternalError, Rules
from .intrinsics import INTRINSICS
from .source import Loc
from .types import (BOOL, BUILTIN, TRAP_FRAME, U8, U64, VOID, ArrayType, BoolType, Field, FnType, IntType,
                    PtrType, StructType, Type, VoidType, align_of, fits, fold_binary, fold_compare,
                    is_aggregate, is_int, is_ptr, is_scalar, parse_type_string, size_of, wrap)

MAX_PARAMS = 6
MAX_OBJECT = 1 << 31        # bytes: keeps every offset a signed 32-bit displacement
ARITH = frozenset(("+", "-", "*", "/", "%", "&", "|", "^"))
SHIFTS = frozenset(("<<", ">>"))
COMPARE = frozenset(("==", "!=", "<", "<=", ">", ">="))
LOGIC = frozenset(("&&", "||"))
_NOT_VALUES = frozenset((VoidType, ArrayType, StructType))    # what a register cannot hold (by class)
MAX_GLOBAL_ALIGN = 4096
HANDLER_TYPE = FnType((), None)        # &h of an interrupt or syscall fn: its entry
TRAP_FRAME_PTR = PtrType(TRAP_FRAME)
# The bounds of the user sections, fixed by the linker (pvtool.link).
LINK_NAMES = ("USER_TEXT_START", "USER_TEXT_END", "USER_DATA_START", "USER_DATA_END")

_INTRINSIC_TYPES = {
    name: (tuple(parse_type_string(p) for p in i.params),
           parse_type_string(i.result) if i.result else None)
    for name, i in INTRINSICS.items()
}


def check(program: ast.Program) -> ast.Program:
    """Check `program`, annotating it in place; returns it.  The parser keeps
    the tree within MAX_NESTING levels, which `deep_recursion` makes room for."""
    with deep_recursion():
        _Checker(program).run()
    program.checked = True
    return program


def error(loc: Loc | None, message: str) -> CompileError:
    return CompileError(loc, message)


def _flexible(e: ast.Expr) -> bool:
    """True if e's type comes from its context: integer literals and
    arithmetic on them only.  (By exact class: asked of every operand, most
    of them names, which a class comparison turns away fastest.)"""
    kind = type(e)
    if kind is ast.IntLit:
        return True
    if kind is ast.Unary:
        return e.op in "-~" and _flexible(e.operand)
    if kind is ast.Binary:
        if e.op in ARITH:
            return _flexible(e.left) and _flexible(e.right)
        return e.op in SHIFTS and _flexible(e.left)
    return False


def _const_fault(e: ast.Expr) -> ast.Binary | None:
    """The division in e that would fault although both its operands are constant."""
    if isinstance(e, ast.Binary):
        if e.op in "/%" and e.left.const is not None and e.right.const is not None and e.const is None:
            return e
        return _const_fault(e.left) or _const_fault(e.right)
    if isinstance(e, (ast.Unary, ast.Cast)):
        return _const_fault(e.operand)
    return None


def _completes(s: ast.Stmt) -> bool:
    """Can control reach the end of s?  (Conservative: conditions are not
    evaluated, except a constant-true `while`.)"""
    match s:
        case ast.Return() | ast.Break() | ast.Continue():
            return False
        case ast.Block():
            # From the end: a body's last statement is the usual one not to complete.
            return all(_completes(x) for x in reversed(s.stmts))
        case ast.If():
            return s.else_ is None or any(_completes(b) for _, b in s.arms) or _completes(s.else_)
        case ast.While():
            return not (s.cond.const == 1 and not _breaks(s.body))
    return True


def _breaks(s: ast.Stmt) -> bool:
    """Does s contain a `break` of the loop around it?"""
    match s:
        case ast.Break():
            return True
        case ast.Block():
            return any(_breaks(x) for x in s.stmts)
        case ast.If():
            return any(_breaks(b) for _, b in s.arms) or (s.else_ is not None and _breaks(s.else_))
    return False


class _Namespace:
    """Top-level names (of values, or of structs) as each file sees them.

    `own[file]` holds every item of the file, private or not; `exports[file]`
    its public ones, reached as `m::name` through `import "file" as m`;
    `shared` the public items of the files imported plainly and of the main
    file, seen unqualified everywhere.  A file's own items come first."""

    def __init__(self, what: str):
        self.what = what          # "" for values, "struct " for structs (in messages)
        self.own: dict[str, dict[str, object]] = {}
        self.exports: dict[str, dict[str, object]] = {}
        self.shared: dict[str, object] = {}

    def define(self, name: str, value: object, item: ast.Node, private: bool, shared: bool,
               first_loc) -> None:
        file = item.loc.file
        own = self.own.setdefault(file, {})
        tables = [own]
        if not private:
            tables.append(self.exports.setdefault(file, {}))
            if shared:
                tables.append(self.shared)
        for table in (own, tables[-1]):
            if name in table:
                raise error(item.loc, f"duplicate definition of {self.what}'{name}' "
                                      f"(first defined at {first_loc(table[name])})")
        for table in tables:
            table[name] = value

    def find(self, name: str, file: str, aliases: dict[str, str], loc: Loc) -> object | None:
        if "::" not in name:
            own = self.own.get(file)
            found = own.get(name) if own else None
            return found if found is not None else self.shared.get(name)
        module, _, short = name.partition("::")
        target = aliases.get(module)
        if target is None:
            raise error(loc, f"unknown module '{module}' (import a file with 'as {module}')")
        found = self.exports.get(target, {}).get(short)
        if found is None and short in self.own.get(target, {}):
            raise error(loc, f"'{short}' is private to {target}")
        return found


class _Checker:
    def __init__(self, program: ast.Program):
        self.program = program
        self.structs: dict[str, tuple[ast.Struct | None, StructType]] = {"TrapFrame": (None, TRAP_FRAME)}
        self.struct_names = _Namespace("struct ")
        self.names = _Namespace("")
        self.aliases: dict[str, dict[str, str]] = {}     # file -> module alias -> imported file
        self.file = program.files[0] if program.files else "<input>"   # whose names are in view
        self.busy: set[int] = set()             # ids of items being resolved (cycle check)
        self.scopes: list[dict[str, ast.Local]] = []
        self.fn: ast.Fn | None = None
        self.loops = 0

    # -- driver ---------------------------------------------------------------------

    def run(self) -> None:
        self.collect()
        for item, st in self.structs.values():
            if item is not None:
                self.layout(item, st)
        items = self.program.items
        for item in items:
            if isinstance(item, ast.Const):
                self.const_value(item.sym)
        for item in items:
            if isinstance(item, ast.Global):
                self.global_type(item.sym)
        for item in items:
            if isinstance(item, ast.Fn):
                self.signature(item)
        for item in items:
            if isinstance(item, ast.Global):
                self.global_init(item)
        self.check_kmain()
        for item in items:
            if isinstance(item, ast.Fn):
                self.function(item)

    def collect(self) -> None:
        items = self.program.items
        imports = [i for i in items if isinstance(i, ast.Import)]
        shared = {self.program.files[0] if self.program.files else "<input>"}
        shared |= {i.resolved or i.path for i in imports if i.alias is None}
        for i in imports:
            if i.alias is not None:
                self.alias(i)
        link_names = _LinkNames(items, shared)
        for item in items:
            if isinstance(item, ast.Import):
                continue
            in_shared = item.loc.file in shared
            if isinstance(item, ast.Struct):
                if item.name in BUILTIN or item.name == TRAP_FRAME.name:
                    raise error(item.loc, f"'{item.name}' is a built-in type")
                st = StructType(link_names.of(item))
                self.struct_names.define(item.name, st, item, item.private, in_shared,
                                         lambda st: self.structs[st.name][0].loc)
                self.structs[st.name] = (item, st)
                continue
            if item.name in INTRINSICS:
                raise error(item.loc, f"'{item.name}' is the name of a machine operation")
            if item.name in LINK_NAMES:
                raise error(item.loc, f"'{item.name}' is a predeclared name")
            if isinstance(item, ast.Const):
                sym = item.sym = ast.ConstSym(item.name, None, item)
            elif isinstance(item, ast.Global):
                sym = item.sym = ast.GlobalSym(item.name, None, item, link_names.of(item))
            else:
                item.link_name = link_names.of(item)
                sym = ast.FnSym(item.name, item)
            self.names.define(item.name, sym, item, item.private, in_shared, lambda sym: sym.item.loc)
        for name in LINK_NAMES:
            self.names.shared.setdefault(name, ast.LinkSym(name))

    def alias(self, i: ast.Import) -> None:
        table = self.aliases.setdefault(i.loc.file, {})
        if i.alias in table:
            raise error(i.loc, f"module name '{i.alias}' is already used in this file")
        table[i.alias] = i.resolved or i.path

    @contextmanager
    def in_file(self, item: ast.Node) -> Iterator[None]:
        """Resolve names as the file of `item` sees them."""
        saved, self.file = self.file, item.loc.file
        try:
            yield
        finally:
            self.file = saved

    def enter(self, key: object, loc: Loc, what: str) -> None:
        if id(key) in self.busy:
            raise error(loc, what)
        self.busy.add(id(key))

    # -- types ---------------------------------------------------------------------------

    def resolve(self, te: ast.TypeExpr, layout: bool = True) -> Type:
        """The type a type expression names.  With `layout`, structs in it are
        laid out first; a pointer's target need not be (`next: *Node`)."""
        match te:
            case ast.TName():
                if te.name in BUILTIN:
                    return BUILTIN[te.name]
                if te.name == TRAP_FRAME.name:
                    return TRAP_FRAME
                st = self.struct_names.find(te.name, self.file, self.aliases.get(self.file, {}), te.loc)
                if st is not None:
                    if layout:
                        self.layout(self.structs[st.name][0], st)
                    return st
                raise error(te.loc, f"unknown type '{te.name}'")
            case ast.TPtr():
                return PtrType(self.resolve(te.target, layout=False))
            case ast.TArray():
                elem = self.resolve(te.elem, layout)
                count = self.const_int(te.size, U64, "array size")
                if count <= 0:
                    raise error(te.size.loc, f"array size must be positive, not {count}")
                if layout and count * size_of(elem) >= MAX_OBJECT:
                    raise error(te.loc, "array is too large (2 GiB or more)")
                return ArrayType(elem, count)
            case ast.TFn():
                return self.fn_type(te.params, te.result, te.loc)
        raise InternalError("typecheck", f"not a type: {type(te).__name__}")

    def fn_type(self, params: list[ast.TypeExpr], result: ast.TypeExpr | None, loc: Loc) -> FnType:
        if len(params) > MAX_PARAMS:
            raise error(loc, f"a function takes at most {MAX_PARAMS} parameters, not {len(params)}")
        ptypes = []
        for p in params:
            t = self.resolve(p, layout=False)
            if not is_scalar(t):
                raise error(p.loc, f"parameter of type {t}: structs and arrays are passed by pointer")
            ptypes.append(t)
        rtype = None
        if result is not None:
            rtype = self.resolve(result, layout=False)
            if not is_scalar(rtype):
                raise error(result.loc, f"cannot return a value of type {rtype}; return a pointer")
        return FnType(tuple(ptypes), rtype)

    def layout(self, item: ast.Struct, st: StructType) -> None:
        """C layout: fields in order, each at its natural alignment."""
        if st.info.fields is not None:
            return
        self.enter(item, item.loc, f"struct '{item.name}' contains itself")
        with self.in_file(item):
            self.lay_out_fields(item, st)

    def lay_out_fields(self, item: ast.Struct, st: StructType) -> None:
        if not item.fields:
            raise error(item.loc, f"struct '{item.name}' has no fields")
        fields: list[Field] = []
        offset, align = 0, 1
        for fd in item.fields:
            if any(f.name == fd.name for f in fields):
                raise error(fd.loc, f"duplicate field '{fd.name}' in struct '{item.name}'")
            t = self.resolve(fd.type_expr)
            a = align_of(t)
            offset = (offset + a - 1) // a * a
            fields.append(Field(fd.name, t, offset))
            offset += size_of(t)
            align = max(align, a)
        st.info.size = (offset + align - 1) // align * align
        st.info.align = align
        st.info.fields = fields
        if st.info.size >= MAX_OBJECT:
            raise error(item.loc, f"struct '{item.name}' is too large (2 GiB or more)")

    # -- constants and globals -----------------------------------------------------------

    def const_int(self, e: ast.Expr, t: Type, what: str) -> int:
        self.expect(e, t, what)
        if e.const is None:
            fault = _const_fault(e)
            if fault is not None:
                raise error(fault.loc, f"{what}: division by zero or overflow in '{fault.op}'")
            raise error(e.loc, f"{what} must be a constant expression")
        return e.const

    def const_value(self, sym: ast.ConstSym) -> None:
        if sym.type is not None:
            return
        item = sym.item
        self.enter(item, item.loc, f"constant '{item.name}' depends on itself")
        with self.in_file(item):
            t = self.resolve(item.type_expr)
            if not (is_int(t) or t == BOOL):
                raise error(item.type_expr.loc,
                            f"constant '{item.name}' must have an integer or bool type, not {t}")
            sym.value = self.const_int(item.value, t, f"value of constant '{item.name}'")
        sym.type = t

    def global_type(self, sym: ast.GlobalSym) -> Type:
        if sym.type is not None:
            return sym.type
        item = sym.item
        self.enter(item, item.loc, f"the type of '{item.name}' depends on itself")
        with self.in_file(item):
            sym.type = self.declared_type(item)
        return sym.type

    def declared_type(self, item: ast.Global) -> Type:
        if item.align is not None:
            n = self.const_int(item.align, U64, "alignment")
            if n <= 0 or n & (n - 1) or n > MAX_GLOBAL_ALIGN:
                raise error(item.align.loc, f"alignment must be a power of two up to {MAX_GLOBAL_ALIGN}, not {n}")
            item.alignment = n
        if item.type_expr is not None:
            t = self.resolve(item.type_expr)
        elif item.init is None:
            raise error(item.loc, f"'{item.name}' needs a type or an initialiser")
        elif isinstance(item.init, ast.ArrayLit):
            raise error(item.init.loc, f"'{item.name}' needs a type: write var {item.name}: [T; N] = [...]")
        else:
            t = self.value(item.init)
        return t

    def global_init(self, item: ast.Global) -> None:
        if item.init is not None:
            with self.in_file(item):
                item.value = self.static_value(item.init, item.sym.type, f"initialiser of '{item.name}'")

    def static_value(self, e: ast.Expr, t: Type, what: str) -> ast.StaticValue:
        """The value a global starts with: fixed before the program runs."""
        if isinstance(e, ast.ArrayLit):
            if not isinstance(t, ArrayType):
                raise error(e.loc, f"{what}: an array literal cannot initialise a {t}")
            if len(e.elems) > t.count:
                raise error(e.elems[t.count].loc, f"{what}: too many elements for {t}")
            e.type = t
            return [self.static_value(x, t.elem, what) for x in e.elems]
        if is_aggregate(t):
            raise error(e.loc, f"{what}: a {t} can only be initialised with an array literal")
        self.expect(e, t, what)
        if e.const is not None:
            return e.const
        addr = self.address_constant(e)
        if addr is None:
            raise error(e.loc, f"{what} must be a constant, a string, an address or an array literal")
        return addr

    def address_constant(self, e: ast.Expr) -> ast.AddrValue | int | None:
        if isinstance(e, ast.StrLit):
            return ast.AddrValue(None, 0, e.value)
        if isinstance(e, ast.Cast) and (e.type == U64 or isinstance(e.type, (PtrType, FnType))):
            # These casts keep every bit: `0 as *T`, `&g as u64`.
            if e.operand.const is not None:
                return e.operand.const
            return self.address_constant(e.operand)
        if isinstance(e, ast.Unary) and e.op == "&":
            return self.static_lvalue(e.operand)
        if isinstance(e, ast.Name) and isinstance(e.sym, ast.LinkSym):
            return ast.AddrValue(e.name, 0)
        return None

    def static_lvalue(self, e: ast.Expr) -> ast.AddrValue | None:
        if isinstance(e, ast.Name) and isinstance(e.sym, (ast.GlobalSym, ast.FnSym)):
            return ast.AddrValue(e.sym.link_name, 0)
        if isinstance(e, ast.Index) and isinstance(e.base.type, ArrayType) and e.index.const is not None:
            base = self.static_lvalue(e.base)
            if base is not None:
                base.offset += e.index.const * size_of(e.type)
            return base
        if isinstance(e, ast.FieldAccess) and not e.deref:
            base = self.static_lvalue(e.base)
            if base is not None:
                base.offset += e.offset
            return base
        return None

    # -- functions ------------------------------------------------------------------------

    def signature(self, fn: ast.Fn) -> None:
        if len(fn.params) > MAX_PARAMS:
            raise error(fn.params[MAX_PARAMS].loc,
                        f"'{fn.name}' has {len(fn.params)} parameters; at most {MAX_PARAMS} are allowed")
        self.file = fn.loc.file             # a top-level pass: nothing to restore
        fn.type = self.fn_type([p.type_expr for p in fn.params], fn.result, fn.loc)
        if fn.handler:
            self.handler_signature(fn)

    def handler_signature(self, fn: ast.Fn) -> None:
        """No result; no parameter (plain `interrupt fn` only) or one frame: *TrapFrame."""
        what = f"{fn.kind_name} '{fn.name}'"
        if fn.result is not None:
            raise error(fn.result.loc, f"{what} cannot return a value")
        if len(fn.params) > 1:
            raise error(fn.params[1].loc, f"{what} takes one parameter, frame: *TrapFrame")
        if fn.params and fn.type.params[0] != TRAP_FRAME_PTR:
            p = fn.params[0]
            raise error(p.type_expr.loc, f"the parameter of {what} must be a *TrapFrame, "
                                         f"not {fn.type.params[0]}")
        if not fn.params and (fn.error_code or fn.syscall):
            raise error(fn.loc, f"{what} needs a parameter frame: *TrapFrame")

    def check_kmain(self) -> None:
        main = self.program.files[0] if self.program.files else "<input>"
        sym = self.names.shared.get("kmain") or self.names.own.get(main, {}).get("kmain")
        if sym is None:
            raise error(Loc(main, 1, 1), "the program has no 'fn kmain() -> u64'")
        if not isinstance(sym, ast.FnSym) or sym.item.handler or sym.item.user or sym.item.private \
                or sym.type != FnType((), U64):
            raise error(sym.item.loc, "'kmain' must be declared 'fn kmain() -> u64'")

    def function(self, fn: ast.Fn) -> None:
        self.file = fn.loc.file             # a top-level pass: nothing to restore
        self.fn, self.loops = fn, 0
        self.scopes = [{}]
        for p, t in zip(fn.params, fn.type.params):
            p.sym = self.declare(p.name, t, p.loc)
        for s in fn.body.stmts:
            _STATEMENTS[type(s)](self, s)
        self.scopes = []
        if fn.result is not None and _completes(fn.body):
            raise error(fn.end, f"'{fn.name}' can reach the end of its body without returning a value")
        self.fn = None

    def declare(self, name: str, t: Type, loc: Loc) -> ast.Local:
        scope = self.scopes[-1]
        if name in scope:
            raise error(loc, f"'{name}' is already declared in this scope (at {scope[name].loc})")
        local = ast.Local(name, t, loc)
        scope[name] = local
        return local

    def lookup(self, name: str, loc: Loc) -> ast.Symbol | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return self.top_level(name, loc)

    def top_level(self, name: str, loc: Loc) -> ast.Symbol | None:
        """The item `name` refers to in this file, if no local has the name."""
        sym = self.names.find(name, self.file, self.aliases.get(self.file, {}), loc)
        if sym is not None and self.fn is not None and self.fn.user:
            self.user_may_use(sym, name, loc)
        return sym

    def user_may_use(self, sym: ast.Symbol, name: str, loc: Loc) -> None:
        """User code reaches user fns and vars, constants and link-time names only."""
        if isinstance(sym, ast.FnSym) and not sym.item.user:
            raise error(loc, f"user fn '{self.fn.name}' cannot use kernel function '{name}'")
        if isinstance(sym, ast.GlobalSym) and not sym.item.user:
            raise error(loc, f"user fn '{self.fn.name}' cannot use kernel variable '{name}'")

    # -- statements --------------------------------------------------------------------------

    def block(self, s: ast.Block) -> None:
        self.scopes.append({})
        for x in s.stmts:
            _STATEMENTS[type(x)](self, x)
        self.scopes.pop()

    def while_stmt(self, s: ast.While) -> None:
        self.expect(s.cond, BOOL, "condition")
        self.loop(s.body)

    def jump_stmt(self, s: ast.Break | ast.Continue) -> None:
        if self.loops == 0:
            word = "break" if isinstance(s, ast.Break) else "continue"
            raise error(s.loc, f"'{word}' outside a loop")

    def var_stmt(self, s: ast.VarStmt) -> None:
        t = self.resolve(s.type_expr) if s.type_expr is not None else None
        what = f"initialiser of '{s.name}'"
        if s.init is None:
            if t is None:
                raise error(s.loc, f"'{s.name}' needs a type or an initialiser")
        elif isinstance(s.init, ast.ArrayLit):
            if t is None:
                raise error(s.init.loc, f"'{s.name}' needs a type: write var {s.name}: [T; N] = [...]")
            self.array_init(s.init, t, what)
        elif t is not None:
            if is_aggregate(t):
                raise error(s.init.loc, f"{what}: cannot copy a whole {t}; initialise its elements or fields")
            self.expect(s.init, t, what)
        else:
            t = self.value(s.init)
        s.sym = self.declare(s.name, t, s.loc)

    def array_init(self, e: ast.ArrayLit, t: Type, what: str) -> None:
        if not isinstance(t, ArrayType):
            raise error(e.loc, f"{what}: an array literal cannot initialise a {t}")
        if len(e.elems) > t.count:
            raise error(e.elems[t.count].loc, f"{what}: too many elements for {t}")
        e.type = t
        for x in e.elems:
            if isinstance(x, ast.ArrayLit):
                self.array_init(x, t.elem, what)
            elif is_aggregate(t.elem):
                raise error(x.loc, f"{what}: cannot copy a whole {t.elem}; initialise its elements or fields")
            else:
                self.expect(x, t.elem, what)

    def assign(self, s: ast.Assign) -> None:
        tt = self.expr(s.target)
        self.require_lvalue(s.target, "assign to")
        if is_aggregate(tt):
            raise error(s.target.loc, f"cannot assign a whole {tt}; assign its elements or fields")
        if s.op == "=":
            self.expect(s.value, tt, "assigned value")
            return
        if s.op in SHIFTS:
            tr = self.value(s.value)
            if not is_int(tt) or not is_int(tr):
                raise error(s.loc, f"operator '{s.op}=' needs integer operands, found {tt} and {tr}")
        elif is_ptr(tt) and s.op in "+-":
            self.expect(s.value, U64, "pointer offset")
        else:
            tr = self.value(s.value, tt)
            self.arith_types(s.op + "=", tt, tr, s.loc)

    def if_stmt(self, s: ast.If) -> None:
        for cond, body in s.arms:
            self.expect(cond, BOOL, "condition")
            self.block(body)
        if s.else_ is not None:
            self.block(s.else_)

    def for_stmt(self, s: ast.For) -> None:
        t, _ = self.operands(s.start, s.end, None)
        if not is_int(t) or s.end.type != t:
            raise error(s.start.loc, f"range bounds must be integers of one type, found {t} and {s.end.type}")
        self.scopes.append({})
        s.sym = self.declare(s.name, t, s.name_loc)
        self.loop(s.body)
        self.scopes.pop()

    def loop(self, body: ast.Block) -> None:
        self.loops += 1
        self.block(body)
        self.loops -= 1

    def return_stmt(self, s: ast.Return) -> None:
        result = self.fn.type.result
        if s.value is None:
            if result is not None:
                raise error(s.loc, f"'{self.fn.name}' must return a {result}")
            return
        if result is None:
            raise error(s.value.loc, f"'{self.fn.name}' does not return a value")
        self.expect(s.value, result, "return value")

    def expr_stmt(self, s: ast.ExprStmt) -> None:
        t = self.expr(s.expr)
        if is_aggregate(t):
            raise error(s.expr.loc, f"a {t} value cannot be used as a statement")

    # -- expressions ---------------------------------------------------------------------------

    def expr(self, e: ast.Expr, want: Type | None = None) -> Type:
        """Check e; `want` is the type its context would like (it decides the
        type of integer literals only).  Aggregates and VOID are allowed."""
        t = e.type = _EXPRESSIONS[type(e)](self, e, want)
        return t

    def char_lit(self, e: ast.CharLit, want: Type | None) -> Type:
        e.const = e.value
        return U8

    def bool_lit(self, e: ast.BoolLit, want: Type | None) -> Type:
        e.const = int(e.value)
        return BOOL

    def str_lit(self, e: ast.StrLit, want: Type | None) -> Type:
        return PtrType(U8)

    def null(self, e: ast.Null, want: Type | None) -> Type:
        if not isinstance(want, (PtrType, FnType)):
            where = f" (a {want} is expected here)" if want is not None else ""
            raise error(e.loc, f"null needs a pointer type from its context{where}")
        e.const = 0
        return want

    def size_of(self, e: ast.SizeOf, want: Type | None) -> Type:
        e.const = size_of(self.resolve(e.target))
        return U64

    def offset_of(self, e: ast.OffsetOf, want: Type | None) -> Type:
        st = self.resolve(e.target)
        if not isinstance(st, StructType):
            raise error(e.target.loc, f"offsetof needs a struct type, not {st}")
        f = st.info.field(e.field)
        if f is None:
            raise error(e.field_loc, f"struct '{st.name}' has no field '{e.field}'")
        e.const = f.offset
        return U64

    def array_lit(self, e: ast.ArrayLit, want: Type | None) -> Type:
        raise error(e.loc, "an array literal can only initialise an array variable")

    def value(self, e: ast.Expr, want: Type | None = None) -> Type:
        """Check e as a value that fits in a register.  (Most expressions are
        checked here: it dispatches itself rather than call `expr`.)"""
        t = e.type = _EXPRESSIONS[type(e)](self, e, want)
        if type(t) in _NOT_VALUES:
            raise self.not_a_value(e, t)
        return t

    def not_a_value(self, e: ast.Expr, t: Type) -> CompileError:
        if t is VOID:
            return error(e.loc, "this call returns no value")
        return error(e.loc, f"a {t} cannot be used as a value (use & or index it)")

    def expect(self, e: ast.Expr, t: Type, what: str) -> None:
        """Check e as a value of type t (which fits in a register).  Like `value`,
        it dispatches itself: half the values checked are expected ones."""
        got = e.type = _EXPRESSIONS[type(e)](self, e, t)
        if got is not t:
            if type(got) in _NOT_VALUES:
                raise self.not_a_value(e, got)
            if got != t:
                raise error(e.loc, f"{what}: expected {t}, found {got}")

    def operands(self, left: ast.Expr, right: ast.Expr, want: Type | None,
                 ptr_offset: bool = False) -> tuple[Type, Type]:
        """Types of two operands that must agree: a literal side takes the other side's type."""
        if (_flexible(left) or type(left) is ast.Null) and not (_flexible(right) or type(right) is ast.Null):
            tr = self.value(right, want)
            tl = self.value(left, tr if is_int(tr) or type(left) is ast.Null else want)
        else:
            tl = self.value(left, want)
            hint = U64 if ptr_offset and is_ptr(tl) else tl
            tr = self.value(right, hint if is_int(hint) or type(right) is ast.Null else None)
        return tl, tr

    def arith_types(self, op: str, tl: Type, tr: Type, loc: Loc) -> Type:
        if tl is tr and is_int(tl):         # the common case, settled by the last test below
            return tl
        if is_ptr(tr) and op[0] in "+-":
            raise error(loc, f"pointer arithmetic is written p {op[0]} n, with n a u64")
        if not is_int(tl) or not is_int(tr):
            raise error(loc, f"operator '{op}' needs integer operands, found {tl} and {tr}")
        if tl != tr:
            raise error(loc, f"operands of '{op}' have different types: {tl} and {tr}")
        return tl

    def int_lit(self, e: ast.IntLit, want: Type | None, negated: bool = False) -> Type:
        t = want if type(want) is IntType else U64
        # A literal is never negative, and every integer type holds 0..127 (most literals).
        ok = e.value < 128 or fits(e.value, t) or (negated and t.signed and e.value == 1 << (t.bits - 1))
        if not ok:
            raise error(e.loc, f"integer literal {e.value} does not fit in {t}")
        e.const = e.value
        return t

    def name(self, e: ast.Name, want: Type | None) -> Type:
        for scope in reversed(self.scopes):     # `lookup` without a call: most names are locals
            if e.name in scope:
                e.sym = local = scope[e.name]
                return local.type
        sym = self.top_level(e.name, e.loc)
        if sym is None:
            if e.name in INTRINSICS:
                raise error(e.loc, f"machine operation '{e.name}' can only be called")
            raise error(e.loc, f"unknown name '{e.name}'")
        e.sym = sym
        if isinstance(sym, ast.GlobalSym):
            return self.global_type(sym)
        if isinstance(sym, ast.ConstSym):
            self.const_value(sym)
            e.const = sym.value
            return sym.type
        if isinstance(sym, ast.LinkSym):
            return U64
        raise error(e.loc, f"function '{e.name}' is not a value; write &{e.name} for its address")

    def unary(self, e: ast.Unary, want: Type | None) -> Type:
        op, x = e.op, e.operand
        if op == "&":
            return self.address_of(e)
        if op == "*":
            t = self.value(x)
            if not is_ptr(t):
                raise error(e.loc, f"cannot dereference a value of type {t}")
            return t.target
        if op == "!":
            self.expect(x, BOOL, "operand of '!'")
            if x.const is not None:
                e.const = 1 - x.const
            return BOOL
        if op == "-" and isinstance(x, ast.IntLit):
            t = x.type = self.int_lit(x, want, negated=True)
        else:
            t = self.value(x, want)
        if not is_int(t):
            raise error(e.loc, f"operator '{op}' needs an integer operand, found {t}")
        if x.const is not None:
            e.const = wrap(-x.const if op == "-" else ~x.const, t)
        return t

    def address_of(self, e: ast.Unary) -> Type:
        x = e.operand
        if isinstance(x, ast.Name):
            sym = self.lookup(x.name, x.loc)
            if isinstance(sym, ast.FnSym):
                t = HANDLER_TYPE if sym.item.handler else sym.type
                x.sym, x.type = sym, t
                return t
        t = self.expr(x)
        self.require_lvalue(x, "take the address of")
        if isinstance(x, ast.Name) and isinstance(x.sym, ast.Local):
            x.sym.addr_taken = True
        return PtrType(t)

    def require_lvalue(self, e: ast.Expr, doing: str) -> None:
        kind = type(e)              # the exact class: most targets are names, then fields
        if kind is ast.Name:
            if type(e.sym) is ast.ConstSym:
                raise error(e.loc, f"cannot {doing} constant '{e.name}'")
            if type(e.sym) is ast.LinkSym:
                raise error(e.loc, f"cannot {doing} '{e.name}', an address the linker fixes")
            return
        if kind is ast.FieldAccess:
            if not e.deref:
                self.require_lvalue(e.base, doing)
            return
        if kind is ast.Index:
            if isinstance(e.base.type, ArrayType):
                self.require_lvalue(e.base, doing)
            return
        if kind is ast.Unary and e.op == "*":
            return
        raise error(e.loc, f"cannot {doing} this expression")

    def binary(self, e: ast.Binary, want: Type | None) -> Type:
        op, l, r = e.op, e.left, e.right
        if op in LOGIC:
            self.expect(l, BOOL, f"left operand of '{op}'")
            self.expect(r, BOOL, f"right operand of '{op}'")
            if l.const is not None and r.const is not None:
                e.const = int(bool(l.const and r.const) if op == "&&" else bool(l.const or r.const))
            return BOOL
        if op in COMPARE:
            tl, tr = self.operands(l, r, None)
            if tl != tr:
                raise error(e.loc, f"operands of '{op}' have different types: {tl} and {tr}")
            ordered = is_int(tl) or is_ptr(tl)
            if not (ordered or (op in ("==", "!=") and isinstance(tl, (BoolType, FnType)))):
                raise error(e.loc, f"operator '{op}' cannot compare values of type {tl}")
            if l.const is not None and r.const is not None:
                e.const = int(fold_compare(op, l.const, r.const))
            return BOOL
        if op in SHIFTS:
            tl = self.value(l, want)
            tr = self.value(r)
            if not is_int(tl) or not is_int(tr):
                raise error(e.loc, f"operator '{op}' needs integer operands, found {tl} and {tr}")
        else:
            tl, tr = self.operands(l, r, want, ptr_offset=op in "+-")
            if is_ptr(tl) and op in "+-":
                if tr != U64:
                    raise error(r.loc, f"pointer offset: expected u64, found {tr}")
                return tl
            self.arith_types(op, tl, tr, e.loc)
        if l.const is not None and r.const is not None:
            e.const = fold_binary(op, tl, l.const, r.const)
        return tl

    def cast(self, e: ast.Cast, want: Type | None) -> Type:
        s = self.value(e.operand)
        t = self.resolve(e.target)
        if not _convertible(s, t):
            raise error(e.loc, f"cannot convert {s} to {t}")
        if e.operand.const is not None and is_int(t):
            e.const = wrap(e.operand.const, t)
        return t

    def call(self, e: ast.Call, want: Type | None) -> Type:
        callee = e.callee
        ftype: FnType | None = None
        name = "this function"
        if isinstance(callee, ast.Name):
            name = f"'{callee.name}'"
            sym = self.lookup(callee.name, callee.loc)
            if sym is None and callee.name in INTRINSICS:
                if callee.name == "swtch" and self.fn is not None and self.fn.user:
                    raise error(callee.loc, f"user fn '{self.fn.name}' cannot use 'swtch' (it runs kernel code)")
                e.intrinsic = INTRINSICS[callee.name]
                params, result = _INTRINSIC_TYPES[callee.name]
                ftype = FnType(params, result)
            elif sym is None:
                raise error(callee.loc, f"unknown function '{callee.name}'")
            elif isinstance(sym, ast.FnSym):
                if sym.item.handler:
                    raise error(e.loc, f"{sym.item.kind_name} '{callee.name}' cannot be called")
                e.func, callee.sym, callee.type = sym, sym, sym.type
                ftype = sym.type
        if ftype is None:
            t = self.value(callee)
            if not isinstance(t, FnType):
                raise error(e.loc, f"cannot call a value of type {t}")
            ftype = t
        if len(e.args) != len(ftype.params):
            n = len(ftype.params)
            raise error(e.loc, f"{name} takes {n} argument{'s' if n != 1 else ''}, {len(e.args)} given")
        for i, (a, p) in enumerate(zip(e.args, ftype.params)):
            self.expect(a, p, f"argument {i + 1} of {name}")
        return ftype.result if ftype.result is not None else VOID

    def index(self, e: ast.Index, want: Type | None) -> Type:
        bt = self.expr(e.base)
        if isinstance(bt, ArrayType):
            elem = bt.elem
        elif is_ptr(bt):
            elem = bt.target
        else:
            raise error(e.loc, f"cannot index a value of type {bt}")
        self.expect(e.index, U64, "index")
        if isinstance(bt, ArrayType) and e.index.const is not None and e.index.const >= bt.count:
            raise error(e.index.loc, f"index {e.index.const} is out of bounds for {bt}")
        return elem

    def field_access(self, e: ast.FieldAccess, want: Type | None) -> Type:
        bt = self.expr(e.base)
        st = bt
        if is_ptr(bt) and isinstance(bt.target, StructType):
            st, e.deref = bt.target, True
        if not isinstance(st, StructType):
            raise error(e.name_loc, f"a {bt} has no field '{e.name}'")
        f = st.info.field(e.name)
        if f is None:
            raise error(e.name_loc, f"struct '{st.name}' has no field '{e.name}'")
        e.offset = f.offset
        return f.type


# How each kind of expression is checked: (checker, expression, wanted type) -> its type.
# A table rather than a match statement: this is the checker's hottest dispatch.
_EXPRESSIONS = Rules("typecheck", "not an expression:", {
    ast.Name: _Checker.name, ast.IntLit: _Checker.int_lit, ast.Binary: _Checker.binary,
    ast.FieldAccess: _Checker.field_access, ast.Index: _Checker.index, ast.Call: _Checker.call,
    ast.Cast: _Checker.cast, ast.Unary: _Checker.unary, ast.CharLit: _Checker.char_lit,
    ast.BoolLit: _Checker.bool_lit, ast.StrLit: _Checker.str_lit, ast.ArrayLit: _Checker.array_lit,
    ast.Null: _Checker.null, ast.SizeOf: _Checker.size_of, ast.OffsetOf: _Checker.offset_of,
})
# How each kind of statement is checked: (checker, statement) -> None.
_STATEMENTS = Rules("typecheck", "not a statement:", {
    ast.Assign: _Checker.assign, ast.VarStmt: _Checker.var_stmt, ast.If: _Checker.if_stmt,
    ast.Return: _Checker.return_stmt, ast.For: _Checker.for_stmt, ast.While: _Checker.while_stmt,
    ast.ExprStmt: _Checker.expr_stmt, ast.Block: _Checker.block, ast.Break: _Checker.jump_stmt,
    ast.Continue: _Checker.jump_stmt,
})


def _convertible(s: Type, t: Type) -> bool:
    if s == t:
        return True
    if is_int(t):
        return is_int(s) or s == BOOL or (t == U64 and isinstance(s, (PtrType, FnType)))
    if is_ptr(t):
        return is_ptr(s) or s == U64
    if isinstance(t, FnType):
        return isinstance(s, FnType) or s == U64
    return False


class _LinkNames:
    """The symbol of each global and function in the image: its own name when no
    other item has it, else (for a private item or one of a file imported `as m`)
    the name qualified by its file's stem, `console::buf`, made unique."""

    def __init__(self, items: list[ast.Item], shared: set[str]):
        self.shared = shared
        self.count: dict[str, int] = {}
        for item in items:
            if not isinstance(item, ast.Import):
                self.count[item.name] = self.count.get(item.name, 0) + 1
        self.taken: set[str] = set(self.count)

    def of(self, item: ast.Const | ast.Global | ast.Struct | ast.Fn) -> str:
        if self.count[item.name] == 1 or (not item.private and item.loc.file in self.shared):
            return item.name
        base = f"{Path(item.loc.file).stem}::{item.name}"
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}#{k}"
        self.taken.add(name)
        return name
