"""Checked syntax trees to IR (see pvtool.ir for the model it follows).

Each function becomes an `ir.Function`: scalar locals and parameters whose
address is never taken are virtual registers; other locals, arrays and
structs get stack slots.  Globals become `ir.Data` objects (string literals
are deduplicated read-only `.str.N` objects).  Narrow integers are kept
canonical with `Ext` after every operation that can break the form; `&&`,
`||` and conditions become branches.  Every instruction carries the `Loc`
of the source construct it implements.  A handler with a TrapFrame becomes
its body, `name.body`, with an `ir.TrapEntry` named `name`; `user` items go
to the user sections (their string literals too).  The compiler-provided
globals of the native system-call entry are added when a program has one
or calls `set_kernel_stack`.

The program must have passed `pvtool.typecheck.check`: lowering reads the
annotations the checker leaves on the tree.
"""
from __future__ import annotations

from . import ast, ir
from .diagnostics import deep_recursion
from .errors import InternalError, Rules
from .source import Loc
from .types import VOID, ArrayType, IntType, PtrType, Type, align_of, is_aggregate, is_int, size_of

MASK = (1 << 64) - 1
UNROLL_ZERO = 64        # bytes: zero larger slots with a loop
TRAP_KINDS = {(True, False, False): "interrupt", (True, True, False): "interrupt_error",
              (False, False, True): "syscall"}   # (interrupt, error_code, syscall) -> TrapEntry.kind

_ARITH = {"+": "add", "-": "sub", "*": "mul", "&": "and", "|": "or", "^": "xor", "<<": "shl"}
_SIGNED_ARITH = {"/": "sdiv", "%": "srem", ">>": "sar"}         # the rest depend on the sign
_UNSIGNED_ARITH = {"/": "udiv", "%": "urem", ">>": "shr"}
_NEEDS_EXT = frozenset(("add", "sub", "mul", "shl", "sdiv", "srem", "neg"))
_CMP_EQ = {"==": "eq", "!=": "ne"}
_CMP_SIGNED = {"<": "slt", "<=": "sle", ">": "sgt", ">=": "sge"}
_CMP_UNSIGNED = {"<": "ult", "<=": "ule", ">": "ugt", ">=": "uge"}


def lower(program: ast.Program) -> ir.Module:
    """The IR of a checked program."""
    if not program.checked:
        raise InternalError("lower", "the program has not been type-checked")
    with deep_recursion():
        return _Module(program).run()


def _imm(value: int) -> int:
    return value & MASK


def _signed(t: Type | None) -> bool:
    return isinstance(t, IntType) and t.signed


class _Module:
    def __init__(self, program: ast.Program):
        self.program = program
        self.strings: dict[tuple[bytes, bool], str] = {}
        self.string_data: list[ir.Data] = []
        self.kernel_stack = False          # the syscall entry's globals are needed

    def run(self) -> ir.Module:
        data, functions = [], []
        for item in self.program.items:
            if isinstance(item, ast.Global):
                data.append(self.global_data(item))
            elif isinstance(item, ast.Fn):
                functions.append(_Function(self, item).run())
        if self.kernel_stack:
            data += [ir.Data(name, "bss", 8, 8) for name in (ir.SYSCALL_USER_RSP, ir.KERNEL_STACK)]
        return ir.Module(functions, data + self.string_data, list(self.program.files))

    def string(self, value: bytes, loc: Loc | None = None, user: bool = False) -> str:
        """The name of the read-only copy of a string literal (one per distinct text);
        user code has its own copies, in its own pages."""
        key = (value, user)
        if key not in self.strings:
            name = f".{'ustr' if user else 'str'}.{len(self.strings)}"
            self.strings[key] = name
            init = value + b"\0"
            section = "user" if user else "rodata"
            self.string_data.append(ir.Data(name, section, len(init), 1, init, loc=loc))
        return self.strings[key]

    def global_data(self, item: ast.Global) -> ir.Data:
        t = item.sym.type
        name, size, align = item.sym.link_name, size_of(t), max(align_of(t), item.alignment)
        if item.value is None and not item.user:
            return ir.Data(name, "bss", size, align, loc=item.loc, type=t)
        buf = bytearray(size)
        relocs: list[ir.DataReloc] = []
        if item.value is not None:
            self.serialize(item.value, t, buf, 0, relocs, item.loc)
        if item.user:              # .user.data holds its zeros too: one section, one segment
            return ir.Data(name, "user", size, align, bytes(buf), relocs, loc=item.loc, type=t)
        if not relocs and not any(buf):
            return ir.Data(name, "bss", size, align, loc=item.loc, type=t)
        return ir.Data(name, "data", size, align, bytes(buf), relocs, loc=item.loc, type=t)

    def serialize(self, v: ast.StaticValue, t: Type, buf: bytearray, at: int,
                  relocs: list[ir.DataReloc], loc: Loc) -> None:
        if isinstance(v, list):
            step = size_of(t.elem)
            modulus = 1 << (8 * step)
            for i, x in enumerate(v):
                where = at + i * step
                if isinstance(x, int):      # most elements: written here, without a call each
                    buf[where:where + step] = (x % modulus).to_bytes(step, "little")
                else:
                    self.serialize(x, t.elem, buf, where, relocs, loc)
        elif isinstance(v, ast.AddrValue):
            symbol = v.symbol if v.symbol is not None else self.string(v.string, loc)
            relocs.append(ir.DataReloc(at, symbol, v.offset))
        else:
            n = size_of(t)
            buf[at:at + n] = (v % (1 << (8 * n))).to_bytes(n, "little")


class _Function:
    """Lowers one function; `cur` is the block being filled."""

    def __init__(self, module: _Module, fn: ast.Fn):
        self.module = module
        self.fn = fn
        self.f = ir.Function(fn.link_name, [], [], returns_value=fn.result is not None,
                             interrupt=fn.interrupt and not fn.params, loc=fn.loc, user=fn.user,
                             result=fn.type.result)
        if fn.handler and fn.params:
            self.f.name = f"{fn.link_name}.body"
            kind = TRAP_KINDS[fn.interrupt, fn.error_code, fn.syscall]
            self.f.trap_entry = ir.TrapEntry(fn.link_name, kind)
            module.kernel_stack |= fn.syscall
        self.home: dict[ast.Local, ir.VReg | int] = {}     # vreg, or slot index
        self.loops: list[tuple[str, str]] = []             # (continue target, break target)
        self.labels = 0
        self.loc = fn.loc
        self.cur: ir.Block | None = None
        # Whether a block may be unreachable: one holding code after a jump or return, the
        # side of a constant condition not taken, or an empty block jumps now skip.  Lowering
        # makes no other, and most functions none: they need no search for them.
        self.unreachable = False

    def run(self) -> ir.Function:
        self.start("entry")
        for p in self.fn.params:
            v = self.f.new_vreg()
            self.f.params.append(v)
            self.loc = p.loc
            if is_aggregate(p.sym.type) or p.sym.addr_taken:
                self.allocate(p.sym, param=True)
                self.store_local(p.sym, v)
            else:
                self.home[p.sym] = v
                self.f.vars.append(ir.Var(p.name, p.sym.type, v, True, p.loc))
        self.block(self.fn.body)
        self.loc = self.fn.end
        for b in self.f.blocks:
            if b.term is None:
                b.term = self.return_term(None)
        self.thread_jumps()
        if self.unreachable:
            self.drop_unreachable()
        return self.f

    # -- blocks ------------------------------------------------------------------------

    def label(self, hint: str) -> str:
        self.labels += 1
        return f"{hint}{self.labels}"

    def start(self, label: str) -> None:
        self.cur = ir.Block(label, [])
        self.f.blocks.append(self.cur)

    def start_dead(self) -> None:
        """A block for code after a jump or return: nothing jumps there."""
        self.start(self.label("dead"))
        self.unreachable = True

    def emit(self, instr: ir.Instr) -> ir.Instr:
        instr.loc = self.loc
        if self.cur is None:
            self.start_dead()
        self.cur.instrs.append(instr)
        return instr

    def terminate(self, term: ir.Instr) -> None:
        """End the current block.  Code that follows before the next `start`
        (code after return/break) lands in a fresh block, dropped later if
        nothing jumps there."""
        term.loc = self.loc
        if self.cur is None:
            self.start_dead()
        self.cur.term = term
        self.cur = None

    def jump(self, target: str) -> None:
        self.terminate(ir.Jump(target))

    def return_term(self, value: ir.Operand | None) -> ir.Instr:
        if self.f.interrupt:
            t = ir.IRet()
        elif self.fn.result is not None:
            t = ir.Ret(0 if value is None else value)
        else:
            t = ir.Ret(None)
        t.loc = self.loc
        return t

    def thread_jumps(self) -> None:
        """Skip blocks that hold nothing but a jump (joins of empty arms, loop exits)."""
        forward = {b.label: b.term.target for b in self.f.blocks[1:]
                   if not b.instrs and isinstance(b.term, ir.Jump)}
        if not forward:
            return
        self.unreachable = True             # the blocks skipped, unless something else reaches them

        def final(label: str) -> str:
            if label not in forward:        # most blocks hold code
                return label
            seen = set()
            while label in forward and label not in seen:
                seen.add(label)
                label = forward[label]
            return label

        for b in self.f.blocks:
            if isinstance(b.term, ir.Jump):
                b.term.target = final(b.term.target)
            elif isinstance(b.term, ir.Branch):
                b.term.then, b.term.else_ = final(b.term.then), final(b.term.else_)

    def drop_unreachable(self) -> None:
        by_label = {b.label: b for b in self.f.blocks}
        seen, work = {"entry"}, ["entry"]
        while work:
            for s in by_label[work.pop()].successors():
                if s not in seen:
                    seen.add(s)
                    work.append(s)
        self.f.blocks = [b for b in self.f.blocks if b.label in seen]

    # -- locals ------------------------------------------------------------------------------

    def allocate(self, local: ast.Local, param: bool = False) -> None:
        if local in self.home:
            return
        t = local.type
        if is_aggregate(t):
            size = (size_of(t) + 7) // 8 * 8          # whole words, for zeroing
            self.home[local] = self.f.new_slot(size, max(align_of(t), 8))
        elif local.addr_taken:
            self.home[local] = self.f.new_slot(size_of(t), align_of(t))
        else:
            self.home[local] = self.f.new_vreg()
        self.f.vars.append(ir.Var(local.name, t, self.home[local], param, local.loc))

    def slot_addr(self, slot: int) -> ir.VReg:
        dst = self.f.new_vreg()
        self.emit(ir.SlotAddr(dst, slot))
        return dst

    def store_local(self, local: ast.Local, v: ir.Operand) -> None:
        home = self.home[local]
        if isinstance(home, ir.VReg):
            self.emit(ir.Copy(home, v))
        else:
            self.emit(ir.Store(self.slot_addr(home), 0, v, size_of(local.type)))

    def zero_local(self, local: ast.Local) -> None:
        home = self.home[local]
        if isinstance(home, ir.VReg):
            self.emit(ir.Copy(home, 0))
            return
        if not is_aggregate(local.type):
            self.store_local(local, 0)
            return
        size = self.f.slots[home].size
        base = self.slot_addr(home)
        if size <= UNROLL_ZERO:
            for off in range(0, size, 8):
                self.emit(ir.Store(base, off, 0, 8))
            return
        p, c = self.f.new_vreg(), self.f.new_vreg()
        head, body, done = self.label("zero"), self.label("zerobody"), self.label("zerodone")
        self.emit(ir.Copy(p, base))
        self.jump(head)
        self.start(head)
        self.emit(ir.BinOp("sub", c, p, base))
        self.emit(ir.Cmp("ult", c, c, size))
        self.terminate(ir.Branch(c, body, done))
        self.start(body)
        self.emit(ir.Store(p, 0, 0, 8))
        self.emit(ir.BinOp("add", p, p, 8))
        self.jump(head)
        self.start(done)

    def store_array(self, lit: ast.ArrayLit, base: ir.Operand, at: int) -> None:
        step = size_of(lit.type.elem)
        for i, x in enumerate(lit.elems):
            if isinstance(x, ast.ArrayLit):
                self.store_array(x, base, at + i * step)
            else:
                self.emit(ir.Store(base, at + i * step, self.rvalue(x), step))

    # -- statements -----------------------------------------------------------------------------

    def block(self, s: ast.Block) -> None:
        """Each statement is lowered at its own position (set here, not in a call per
        statement); the code after the block is at its caller's again."""
        saved = self.loc
        for x in s.stmts:
            self.loc = x.loc
            _STATEMENTS[type(x)](self, x)
        self.loc = saved

    def var_stmt(self, s: ast.VarStmt) -> None:
        local = s.sym
        value = None
        if s.init is not None and not isinstance(s.init, ast.ArrayLit):
            value = self.rvalue(s.init)
        self.allocate(local)
        if value is not None:
            self.store_local(local, value)
            return
        self.zero_local(local)
        if isinstance(s.init, ast.ArrayLit):
            self.store_array(s.init, self.slot_addr(self.home[local]), 0)

    def assign(self, s: ast.Assign) -> None:
        target, t = s.target, s.target.type
        if isinstance(target, ast.Name) and isinstance(self.home.get(target.sym), ir.VReg):
            reg = self.home[target.sym]
            if s.op == "=":
                self.emit(ir.Copy(reg, self.rvalue(s.value)))
            else:
                self.arith(s.op, reg, self.rvalue(s.value), t, s.value.type, dst=reg)
            return
        base, off = self.address(target)
        if s.op == "=":
            value = self.rvalue(s.value)
        else:
            old = self.load(base, off, t)
            value = self.arith(s.op, old, self.rvalue(s.value), t, s.value.type)
        self.emit(ir.Store(base, off, value, size_of(t)))

    def if_stmt(self, s: ast.If) -> None:
        join = self.label("join")
        for i, (cond, body) in enumerate(s.arms):
            last = i == len(s.arms) - 1 and s.else_ is None
            then, other = self.label("then"), join if last else self.label("else")
            self.branch(cond, then, other)
            self.start(then)
            self.block(body)
            self.jump(join)
            if other != join:
                self.start(other)
        if s.else_ is not None:
            self.block(s.else_)
            self.jump(join)
        self.start(join)

    def while_stmt(self, s: ast.While) -> None:
        head, body, done = self.label("while"), self.label("body"), self.label("done")
        self.jump(head)
        self.start(head)
        self.branch(s.cond, body, done)
        self.start(body)
        self.loop_body(s.body, head, done)
        self.start(done)

    def for_stmt(self, s: ast.For) -> None:
        """A hidden counter runs from start to end (evaluated once); the loop
        variable is a copy, so the body may change it freely."""
        t = s.sym.type
        head, body, step, done = (self.label(h) for h in ("for", "body", "step", "done"))
        counter, end = self.f.new_vreg(), self.f.new_vreg()
        self.emit(ir.Copy(counter, self.rvalue(s.start)))
        self.emit(ir.Copy(end, self.rvalue(s.end)))
        self.allocate(s.sym)
        self.jump(head)
        self.start(head)
        c = self.f.new_vreg()
        self.emit(ir.Cmp("slt" if _signed(t) else "ult", c, counter, end))
        self.terminate(ir.Branch(c, body, done))
        self.start(body)
        self.store_local(s.sym, counter)
        self.loop_body(s.body, step, done)
        self.start(step)
        # counter < end <= max of t, so counter + 1 cannot wrap.
        self.emit(ir.BinOp("add", counter, counter, 1))
        self.jump(head)
        self.start(done)

    def loop_body(self, body: ast.Block, cont: str, brk: str) -> None:
        self.loops.append((cont, brk))
        self.block(body)
        self.loops.pop()
        self.jump(cont)

    def return_stmt(self, s: ast.Return) -> None:
        value = self.rvalue(s.value) if s.value is not None else None
        self.terminate(self.return_term(value))

    def break_stmt(self, s: ast.Break) -> None:
        self.jump(self.loops[-1][1])

    def continue_stmt(self, s: ast.Continue) -> None:
        self.jump(self.loops[-1][0])

    def expr_stmt(self, s: ast.ExprStmt) -> None:
        e = s.expr
        if e.const is None:
            self.loc = e.loc
            if isinstance(e, ast.Call):
                self.call(e)        # whether or not it returns a value
            else:
                self.rvalue(e)

    # -- conditions ---------------------------------------------------------------------------------

    def branch(self, e: ast.Expr, yes: str, no: str) -> None:
        """Jump to `yes` if the bool e is true, else to `no`."""
        saved, self.loc = self.loc, e.loc
        if e.const is not None:
            self.unreachable = True         # the other side may be
            self.jump(yes if e.const else no)
        elif isinstance(e, ast.Unary) and e.op == "!":
            self.branch(e.operand, no, yes)
        elif isinstance(e, ast.Binary) and e.op in ("&&", "||"):
            mid = self.label("and" if e.op == "&&" else "or")
            if e.op == "&&":
                self.branch(e.left, mid, no)
            else:
                self.branch(e.left, yes, mid)
            self.start(mid)
            self.branch(e.right, yes, no)
        else:
            self.terminate(ir.Branch(self.rvalue(e), yes, no))
        self.loc = saved

    # -- expressions ----------------------------------------------------------------------------------

    def rvalue(self, e: ast.Expr) -> ir.Operand:
        """The value of a scalar expression, as a vreg or an immediate.  A
        register-allocated local is returned as its own vreg (nothing in an
        expression can assign to it)."""
        if e.const is not None:
            return e.const & MASK           # as _imm does: a third of the operands, so no call
        if type(e) is ast.Name:             # most of the rest: a local, often in a vreg
            home = self.home.get(e.sym)
            if isinstance(home, ir.VReg):
                return home
        saved, self.loc = self.loc, e.loc
        value = _VALUES[type(e)](self, e)
        self.loc = saved
        return value

    def name(self, e: ast.Name) -> ir.Operand:
        """A name that is no register-allocated local (`rvalue` returns those itself)."""
        if isinstance(e.sym, ast.LinkSym):         # an address the linker fixes
            dst = self.f.new_vreg()
            self.emit(ir.AddrOf(dst, e.name))
            return dst
        return self.load(*self.address(e), e.type)

    def element(self, e: ast.Index | ast.FieldAccess) -> ir.Operand:
        return self.load(*self.address(e), e.type)

    def string_literal(self, e: ast.StrLit) -> ir.Operand:
        dst = self.f.new_vreg()
        self.emit(ir.AddrOf(dst, self.module.string(e.value, e.loc, self.fn.user)))
        return dst

    def unary(self, e: ast.Unary) -> ir.Operand:
        op, t = e.op, e.type
        if op == "&":
            return self.materialize(*self.address(e.operand))
        if op == "*":
            return self.load(*self.address(e), t)
        a = self.rvalue(e.operand)
        dst = self.f.new_vreg()
        if op == "!":
            self.emit(ir.BinOp("xor", dst, a, 1))
        elif op == "-":
            self.emit(ir.UnOp("neg", dst, a))
            self.ext(dst, t)
        else:
            self.emit(ir.UnOp("not", dst, a))
            if not _signed(t):
                self.ext(dst, t)          # ~ of a sign-extended value stays sign-extended
        return dst

    def binary(self, e: ast.Binary) -> ir.Operand:
        op = e.op
        if op in ("&&", "||"):
            dst = self.f.new_vreg()
            yes, no, join = self.label("true"), self.label("false"), self.label("bool")
            self.branch(e, yes, no)
            for label, value in ((yes, 1), (no, 0)):
                self.start(label)
                self.emit(ir.Copy(dst, value))
                self.jump(join)
            self.start(join)
            return dst
        a, b = self.rvalue(e.left), self.rvalue(e.right)
        if op in _CMP_EQ or op in _CMP_SIGNED:
            t = e.left.type
            cmp = _CMP_EQ.get(op) or (_CMP_SIGNED if _signed(t) else _CMP_UNSIGNED)[op]
            dst = self.f.new_vreg()
            self.emit(ir.Cmp(cmp, dst, a, b))
            return dst
        return self.arith(op, a, b, e.left.type, e.right.type)

    def arith(self, op: str, a: ir.Operand, b: ir.Operand, t: Type, tb: Type,
              dst: ir.VReg | None = None) -> ir.VReg:
        """a OP b for a of type t (b of type tb), into dst (a fresh vreg by default)."""
        dst = dst or self.f.new_vreg()
        if isinstance(t, PtrType):
            scale = size_of(t.target)
            if scale != 1:
                scaled = self.f.new_vreg()
                self.emit(ir.BinOp("mul", scaled, b, scale))
                b = scaled
            self.emit(ir.BinOp("add" if op == "+" else "sub", dst, a, b))
            return dst
        if op in _ARITH:
            name = _ARITH[op]
        else:
            name = (_SIGNED_ARITH if _signed(t) else _UNSIGNED_ARITH)[op]
        self.emit(ir.BinOp(name, dst, a, b))
        if name in _NEEDS_EXT:
            self.ext(dst, t)
        return dst

    def ext(self, dst: ir.VReg, t: Type) -> None:
        if isinstance(t, IntType) and t.bits < 64:       # a narrow integer
            self.emit(ir.Ext(dst, dst, t.bits, t.signed))

    def cast(self, e: ast.Cast) -> ir.Operand:
        s, t = e.operand.type, e.type
        v = self.rvalue(e.operand)
        if not (is_int(s) and is_int(t)) or t.bits == 64:
            return v                       # every other conversion keeps the bits
        if (t.bits > s.bits and not s.signed) or (t.bits >= s.bits and s.signed == t.signed):
            return v                       # already canonical for t
        dst = self.f.new_vreg()
        self.emit(ir.Ext(dst, v, t.bits, t.signed))
        return dst

    def call(self, e: ast.Call) -> ir.Operand | None:
        target = None
        if e.intrinsic is None and e.func is None:
            target = self.rvalue(e.callee)
        args = [self.rvalue(a) for a in e.args]
        result = None if e.type == VOID else e.type
        dst = None if result is None else self.f.new_vreg()
        if e.intrinsic is not None:
            self.emit(ir.MachineOp(e.intrinsic.name, dst, args))
            self.module.kernel_stack |= e.intrinsic.name == "set_kernel_stack"
            if dst is not None:
                self.ext(dst, result)      # the result of `in` is canonical from here on
        elif e.func is not None:
            self.emit(ir.Call(dst, e.func.link_name, args))
        else:
            self.emit(ir.CallIndirect(dst, target, args))
        return dst

    # -- memory -----------------------------------------------------------------------------------------

    def load(self, base: ir.Operand, off: int, t: Type) -> ir.VReg:
        dst = self.f.new_vreg()
        self.emit(ir.Load(dst, base, off, size_of(t), _signed(t)))
        return dst

    def materialize(self, base: ir.Operand, off: int) -> ir.Operand:
        if off == 0:
            return base
        if isinstance(base, int):
            return _imm(base + off)
        dst = self.f.new_vreg()
        self.emit(ir.BinOp("add", dst, base, _imm(off)))
        return dst

    def address(self, e: ast.Expr) -> tuple[ir.Operand, int]:
        """Where an lvalue lives: a base operand plus a constant byte offset."""
        saved, self.loc = self.loc, e.loc
        match e:
            case ast.Name():
                if isinstance(e.sym, ast.Local):
                    where = self.slot_addr(self.home[e.sym]), 0
                else:
                    dst = self.f.new_vreg()
                    self.emit(ir.AddrOf(dst, e.sym.link_name))
                    where = dst, 0
            case ast.FieldAccess():
                if e.deref:
                    where = self.rvalue(e.base), e.offset
                else:
                    base, off = self.address(e.base)
                    where = base, off + e.offset
            case ast.Index():
                where = self.index_address(e)
            case ast.Unary(op="*"):
                where = self.rvalue(e.operand), 0
            case _:
                raise InternalError("lower", f"not an lvalue: {type(e).__name__}")
        self.loc = saved
        return where

    def index_address(self, e: ast.Index) -> tuple[ir.Operand, int]:
        if isinstance(e.base.type, ArrayType):
            base, off = self.address(e.base)
        else:
            base, off = self.rvalue(e.base), 0
        size = size_of(e.type)
        if e.index.const is not None:
            delta = _imm(e.index.const * size)
            delta = delta - (1 << 64) if delta >> 63 else delta
            if -(1 << 31) <= off + delta < 1 << 31:
                return base, off + delta
        index = self.rvalue(e.index)
        if size != 1:
            scaled = self.f.new_vreg()
            self.emit(ir.BinOp("mul", scaled, index, size))
            index = scaled
        dst = self.f.new_vreg()
        self.emit(ir.BinOp("add", dst, base, index))
        return dst, off


# How each kind of expression yields its value: (function lowerer, expression) -> operand.
# A table rather than a match statement: this is lowering's hottest dispatch.
_VALUES = Rules("lower", "no value for", {
    ast.Name: _Function.name, ast.Binary: _Function.binary, ast.Index: _Function.element,
    ast.FieldAccess: _Function.element, ast.Cast: _Function.cast, ast.Call: _Function.call,
    ast.Unary: _Function.unary, ast.StrLit: _Function.string_literal,
})
# How each kind of statement is lowered: (function lowerer, statement) -> None.
_STATEMENTS = Rules("lower", "not a statement:", {
    ast.Assign: _Function.assign, ast.VarStmt: _Function.var_stmt, ast.If: _Function.if_stmt,
    ast.Return: _Function.return_stmt, ast.For: _Function.for_stmt, ast.While: _Function.while_stmt,
    ast.ExprStmt: _Function.expr_stmt, ast.Block: _Function.block, ast.Break: _Function.break_stmt,
    ast.Continue: _Function.continue_stmt,
})
