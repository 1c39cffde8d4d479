"""The intermediate representation: three-address code over basic blocks.

This module owns the data types shared by the middle and back end:
`lower` produces a `Module`, `paravirt` rewrites it (IR to IR), and the
x86-64 back end consumes it.  It holds no logic beyond small helpers and
`dump`, the readable listing.

Model
-----
* Every value is a 64-bit virtual register (`VReg`) or an immediate (a plain
  Python `int`, taken modulo 2**64).  Narrow integer types are kept
  *canonical* in registers: a u8/u16/u32 value is zero-extended to 64 bits,
  an i8/i16/i32 value sign-extended.  `lower` inserts an `Ext` after every
  operation whose 64-bit result may leave that form (add, sub, mul, shl, neg,
  not, sdiv, srem; loads and casts say their extension themselves).  So all
  arithmetic, comparisons and divisions work on whole registers.
* Virtual registers are not SSA: a local variable is one vreg assigned many
  times.  Locals whose address is taken, arrays and structs live in stack
  `Slot`s and are reached with `SlotAddr` + `Load`/`Store`.
* Every machine operation of the language (`cli`, `outb`, `set_pte`, ...)
  is one `MachineOp`, so the paravirtualization pass finds and rewrites all
  of them in one place.  The pass produces `Hypercall`s, plain `Load`s and
  `Store`s on the shared page, and `SiteBegin`/`SiteEnd` markers around each
  rewritten operation so the back end can record the site's code range.
* A handler that sees the interrupted context (`interrupt fn h(frame:
  *TrapFrame)`, `syscall fn`) is an ordinary function, its body, with a
  `TrapEntry`: the back end adds the entry code that builds the TrapFrame,
  calls the body and returns from the interrupt.
* `user fn`s are Functions with `user` set and `user var`s Data in the
  "user" section: the linker puts them in their own pages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

from pvimage import abi

from .source import Loc
from .types import Type


@dataclass(unsafe_hash=True, slots=True)
class VReg:
    """A virtual register, by number.  Never changed once made, so hashable;
    not frozen only because a frozen dataclass takes twice as long to make."""
    id: int

    def __repr__(self) -> str:
        return f"%{self.id}"


Operand = Union[VReg, int]

BINOPS = ("add", "sub", "mul", "udiv", "sdiv", "urem", "srem",
          "and", "or", "xor", "shl", "shr", "sar")
UNOPS = ("neg", "not")
CMPOPS = ("eq", "ne", "ult", "ule", "ugt", "uge", "slt", "sle", "sgt", "sge")


@dataclass(slots=True)
class Instr:
    loc: Loc | None = field(default=None, kw_only=True)

    def uses(self) -> list[Operand]:
        return []

    def defs(self) -> list[VReg]:
        dst = getattr(self, "dst", None)
        return [dst] if isinstance(dst, VReg) else []


@dataclass(slots=True)
class Copy(Instr):
    """dst = src (src may be an immediate)."""
    dst: VReg
    src: Operand

    def uses(self):
        return [self.src]


@dataclass(slots=True)
class BinOp(Instr):
    """dst = a OP b on 64-bit registers; shifts take the count modulo 64."""
    op: str
    dst: VReg
    a: Operand
    b: Operand

    def uses(self):
        return [self.a, self.b]


@dataclass(slots=True)
class UnOp(Instr):
    op: str
    dst: VReg
    a: Operand

    def uses(self):
        return [self.a]


@dataclass(slots=True)
class Ext(Instr):
    """dst = src truncated to `bits` (8, 16 or 32), then zero- or sign-extended to 64."""
    dst: VReg
    src: Operand
    bits: int
    signed: bool

    def uses(self):
        return [self.src]


@dataclass(slots=True)
class Cmp(Instr):
    """dst = 1 if (a OP b) else 0."""
    op: str
    dst: VReg
    a: Operand
    b: Operand

    def uses(self):
        return [self.a, self.b]


@dataclass(slots=True)
class Load(Instr):
    """dst = size bytes at base+offset, zero- or sign-extended.  An int base is an absolute address."""
    dst: VReg
    base: Operand
    offset: int
    size: int
    signed: bool = False

    def uses(self):
        return [self.base]


@dataclass(slots=True)
class Store(Instr):
    """size bytes at base+offset = low bytes of value.  An int base is an absolute address."""
    base: Operand
    offset: int
    value: Operand
    size: int

    def uses(self):
        return [self.base, self.value]


@dataclass(slots=True)
class AddrOf(Instr):
    """dst = address of a symbol (global, string literal, function) plus offset."""
    dst: VReg
    symbol: str
    offset: int = 0


@dataclass
class SlotAddr(Instr):
    """dst = address of stack slot `slot` (an index into Function.slots) plus offset."""
    dst: VReg
    slot: int
    offset: int = 0


@dataclass
class Call(Instr):
    """dst = func(args...), System V AMD64; at most six arguments."""
    dst: VReg | None
    func: str
    args: list[Operand]

    def uses(self):
        return list(self.args)


@dataclass
class CallIndirect(Instr):
    """dst = (*target)(args...), System V AMD64."""
    dst: VReg | None
    target: Operand
    args: list[Operand]

    def uses(self):
        return [self.target, *self.args]


@dataclass
class MachineOp(Instr):
    """One machine operation of the language (see pvtool.intrinsics), e.g. op='outb', args=[port, value]."""
    op: str
    dst: VReg | None
    args: list[Operand]

    def uses(self):
        return list(self.args)


@dataclass
class Hypercall(Instr):
    """dst = hypercall `nr`(args...) through the hypercall page (PV images only).

    Arguments go in rdi, rsi, rdx, r10, r8; the result comes back in rax.
    The back end treats it as a call (caller-saved registers are clobbered)."""
    dst: VReg | None
    nr: int
    args: list[Operand]

    def uses(self):
        return list(self.args)


@dataclass
class SiteBegin(Instr):
    """Start of the code that implements one rewritten machine operation."""
    site: int      # unique within the function
    op: str        # the machine operation it replaces
    becomes: str   # short description of the paravirtual form, e.g. "shared-page store"
    kind: int = 0  # pvimage.abi.SITE_*: what the replacement is (no exit, hypercall, batched)


@dataclass
class SiteEnd(Instr):
    site: int


@dataclass
class CodeAddr(Instr):
    """dst = the address of the code here (`lea dst, [rip]`): where a multicall entry was queued."""
    dst: VReg


@dataclass
class ResumeFrame(Instr):
    """Leave to the context in the TrapFrame at `frame`: rsp = frame, pop the 15 registers,
    drop the error code, then `iretq`, or a jump to the hypercall entry `hypercall` (set by
    the paravirt pass).  Never returns (`enter_user` in a PV build)."""
    frame: Operand
    hypercall: int | None = None

    def uses(self):
        return [self.frame]


# -- terminators ------------------------------------------------------------

@dataclass
class Jump(Instr):
    target: str


@dataclass
class Branch(Instr):
    """Go to `then` if cond != 0, else to `else_`."""
    cond: Operand
    then: str
    else_: str

    def uses(self):
        return [self.cond]


@dataclass
class Ret(Instr):
    value: Operand | None = None

    def uses(self):
        return [] if self.value is None else [self.value]


@dataclass
class IRet(Instr):
    """Return from an interrupt handler: `iretq` natively; with `hypercall` set
    (by the paravirt pass) the back end restores registers and jumps to that
    hypercall-page entry instead."""
    hypercall: int | None = None


Terminator = Union[Jump, Branch, Ret, IRet]


def operands(ins: Instr | Terminator) -> tuple[Sequence[Operand], Operand | None]:
    """What `ins` reads and what it writes (its `dst`, or None): the back end's walks over every
    instruction ask this, so the commonest kinds answer without a call of their own."""
    kind = type(ins)
    if kind is BinOp:
        return (ins.a, ins.b), ins.dst
    if kind is Copy:
        return (ins.src,), ins.dst
    return ins.uses(), getattr(ins, "dst", None)


@dataclass
class Block:
    label: str
    instrs: list[Instr]
    term: Terminator | None = None

    def successors(self) -> list[str]:
        if isinstance(self.term, Jump):
            return [self.term.target]
        if isinstance(self.term, Branch):
            return [self.term.then, self.term.else_]
        return []


@dataclass
class Slot:
    size: int
    align: int


TRAP_KINDS = ("interrupt", "interrupt_error", "syscall")
# The compiler-provided globals of the native syscall entry: the user's rsp while it switches
# stacks, and the stack it switches to (set by `set_kernel_stack`).
SYSCALL_USER_RSP = "__syscall_user_rsp"
KERNEL_STACK = "__kernel_stack"


@dataclass
class TrapEntry:
    """The entry of a handler whose body is the Function holding this: the symbol the IDT
    (or LSTAR) names, and how the CPU arrives: 'interrupt' (no error code pushed),
    'interrupt_error' (the CPU pushed one) or 'syscall'.  `hypercall` is set by the
    paravirt pass: the entry returns by a jump to that hypercall-page entry, not iretq."""
    name: str
    kind: str
    hypercall: int | None = None


@dataclass
class Var:
    """A parameter or local of the source and where `lower` keeps it, for debuggers (DWARF)."""
    name: str
    type: Type
    home: VReg | int               # its vreg, or its stack slot
    param: bool = False
    loc: Loc | None = None


@dataclass
class Function:
    name: str
    params: list[VReg]
    blocks: list[Block]            # blocks[0] is the entry
    slots: list[Slot] = field(default_factory=list)
    returns_value: bool = False
    interrupt: bool = False        # an `interrupt fn`: saves every register it touches, ends in IRet
    loc: Loc | None = None
    user: bool = False             # a `user fn`: placed in .user.text
    trap_entry: TrapEntry | None = None   # this is the body of a handler with a TrapFrame
    next_vreg: int = 0             # first unused vreg id
    vars: list[Var] = field(default_factory=list)     # the source's variables, parameters first
    result: Type | None = None     # the source's result type

    def new_vreg(self) -> VReg:
        v = VReg(self.next_vreg)
        self.next_vreg += 1
        return v

    def new_slot(self, size: int, align: int) -> int:
        self.slots.append(Slot(size, align))
        return len(self.slots) - 1

    def block(self, label: str) -> Block:
        for b in self.blocks:
            if b.label == label:
                return b
        raise KeyError(label)

    def instructions(self) -> Iterator[Instr]:
        for b in self.blocks:
            yield from b.instrs
            if b.term is not None:
                yield b.term


@dataclass
class DataReloc:
    """An absolute 64-bit pointer to `symbol`+addend stored at `offset` in a Data object."""
    offset: int
    symbol: str
    addend: int = 0


@dataclass
class Data:
    """A global object.  section: 'rodata' (string literals), 'data' (initialised), 'bss', or
    'user' (a `user var` or a string of user code, initialised or zero: .user.data)."""
    name: str
    section: str
    size: int
    align: int
    init: bytes = b""              # empty for bss; else exactly `size` bytes
    relocs: list[DataReloc] = field(default_factory=list)
    loc: Loc | None = None
    type: Type | None = None       # a global's source type (for debuggers); None for string literals


@dataclass
class Module:
    functions: list[Function]
    data: list[Data]
    files: list[str] = field(default_factory=list)   # every source file, main file first
    target: str = "native"                           # 'native' or 'pv' (set by paravirt)


# -- the listing ----------------------------------------------------------------------------------------

def dump(m: Module) -> str:
    """A readable listing, for debugging and `pvtool build --emit-ir`: data
    objects, then each function's slots and blocks, one instruction a line,
    with `; file:line` wherever the source line changes."""
    out = [f"; {m.target} module of {', '.join(m.files) or '(no files)'}"]
    for d in m.data:
        out.append(_data_line(d))
    for f in m.functions:
        out.append("")
        out.extend(_function_lines(f))
    return "\n".join(out)


_COMMENT_COLUMN = 40


def _commented(text: str, loc: Loc | None) -> str:
    if loc is None:
        return text
    return f"{text.ljust(_COMMENT_COLUMN - 1)} ; {loc.file}:{loc.line}"


def _data_line(d: Data) -> str:
    text = f"data {d.name}: {d.section}, {d.size} bytes, align {d.align}"
    if d.section == "rodata" and d.init.endswith(b"\0") and d.init.count(0) == 1:
        text += f" = {_quoted(d.init[:-1])}"
    elif d.init:
        shown = d.init[:16].hex(" ")
        text += f" = {shown}{' ...' if len(d.init) > 16 else ''}"
    if d.relocs:
        text += " (" + ", ".join(f"at {r.offset}: {_symbol(r.symbol, r.addend)}" for r in d.relocs) + ")"
    return _commented(text, d.loc)


_ESCAPES = {0: "\\0", 9: "\\t", 10: "\\n", 13: "\\r", 34: '\\"', 92: "\\\\"}


def _quoted(data: bytes) -> str:
    return '"' + "".join(_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\x{b:02x}") for b in data) + '"'


def _function_lines(f: Function) -> list[str]:
    kind = "interrupt fn" if f.interrupt else "user fn" if f.user else "fn"
    result = " -> value" if f.returns_value else ""
    lines = [_commented(f"{kind} {f.name}({', '.join(map(_operand, f.params))}){result}", f.loc)]
    if f.trap_entry is not None:
        e = f.trap_entry
        exit_ = "iretq" if e.hypercall is None else f"hypercall {_hypercall(e.hypercall)}"
        lines.append(f"  ; body of {e.kind} entry {e.name} (returns through {exit_})")
    for n, slot in enumerate(f.slots):
        lines.append(f"  slot{n}: {slot.size} bytes, align {slot.align}")
    for b in f.blocks:
        lines.append(f"  {b.label}:")
        shown = None
        for i in [*b.instrs, *([b.term] if b.term is not None else [])]:
            where = i.loc if i.loc is not None and (i.loc.file, i.loc.line) != shown else None
            if where is not None:
                shown = (where.file, where.line)
            lines.append(_commented("    " + _instr_text(i), where))
    return lines


def _operand(v: Operand) -> str:
    if isinstance(v, VReg):
        return f"%{v.id}"
    v = v - (1 << 64) if v >= 1 << 63 else v          # immediates are held modulo 2**64
    return str(v) if -4096 < v < 4096 else (f"-{-v:#x}" if v < 0 else f"{v:#x}")


def _symbol(name: str, offset: int) -> str:
    return name if offset == 0 else f"{name}{offset:+d}"


def _memory(base: Operand, offset: int) -> str:
    return f"[{_operand(base)}{offset:+d}]" if offset else f"[{_operand(base)}]"


def _args(args: list[Operand]) -> str:
    return ", ".join(map(_operand, args))


def _instr_text(i: Instr) -> str:
    match i:
        case Copy():
            return f"%{i.dst.id} = copy {_operand(i.src)}"
        case BinOp() | Cmp():
            op = i.op if isinstance(i, BinOp) else f"cmp {i.op}"
            return f"%{i.dst.id} = {op} {_operand(i.a)}, {_operand(i.b)}"
        case UnOp():
            return f"%{i.dst.id} = {i.op} {_operand(i.a)}"
        case Ext():
            return f"%{i.dst.id} = {'s' if i.signed else 'z'}ext{i.bits} {_operand(i.src)}"
        case Load():
            kind = f"{'i' if i.signed else 'u'}{8 * i.size}"
            return f"%{i.dst.id} = load.{kind} {_memory(i.base, i.offset)}"
        case Store():
            return f"store.{8 * i.size} {_memory(i.base, i.offset)}, {_operand(i.value)}"
        case AddrOf():
            return f"%{i.dst.id} = addr {_symbol(i.symbol, i.offset)}"
        case SlotAddr():
            return f"%{i.dst.id} = addr {_symbol(f'slot{i.slot}', i.offset)}"
        case Call() | CallIndirect() | MachineOp() | Hypercall():
            return _call_text(i)
        case SiteBegin():
            return f"site {i.site} begin, {abi.SITE_KINDS.get(i.kind, i.kind)}: {i.op} -> {i.becomes}"
        case SiteEnd():
            return f"site {i.site} end"
        case CodeAddr():
            return f"%{i.dst.id} = code address"
        case ResumeFrame():
            via = "iretq" if i.hypercall is None else f"hypercall {_hypercall(i.hypercall)}"
            return f"resume frame {_operand(i.frame)} through {via}"
        case Jump():
            return f"jump {i.target}"
        case Branch():
            return f"branch {_operand(i.cond)}, {i.then}, {i.else_}"
        case Ret():
            return "ret" if i.value is None else f"ret {_operand(i.value)}"
        case IRet():
            return "iret" if i.hypercall is None else f"iret through hypercall {_hypercall(i.hypercall)}"
    return type(i).__name__.lower()


def _call_text(i: Call | CallIndirect | MachineOp | Hypercall) -> str:
    match i:
        case Call():
            text = f"call {i.func}({_args(i.args)})"
        case CallIndirect():
            text = f"call *{_operand(i.target)}({_args(i.args)})"
        case MachineOp():
            text = f"machine {i.op}({_args(i.args)})"
        case _:
            text = f"hypercall {_hypercall(i.nr)}({_args(i.args)})"
    return text if i.dst is None else f"%{i.dst.id} = {text}"


def _hypercall(nr: int) -> str:
    return abi.HYPERCALL_NAMES.get(nr, str(nr))
