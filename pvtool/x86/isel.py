"""Instruction selection: the IR reshaped into what the x86-64 emitter wants.

Before register allocation a function's blocks are copied into `MBlock`s
and a few IR patterns are fused, so that the fused-away vregs never need
a register:

* `Cmp` whose only use is the block's `Branch`  ->  `CmpBranch` (cmp; jcc)
* `AddrOf`/`SlotAddr` whose only use is the base of a later `Load`/`Store`
  in the same block  ->  a rip-relative or rbp-relative memory operand
* every `Load`/`Store` becomes `MLoad`/`MStore` over an `Addr` (a register
  base, an absolute address, a symbol or a stack slot, plus displacement).

`clobbers()` says which allocatable registers each selected instruction
destroys; codegen's emitters honour exactly these (rax and r11 are never
allocated: they are the emitters' scratch registers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import ir
from .encode import RBX, RCX, RDX, RDI, RSI, R8, R9, R10, Reg

CALLER_SAVED = frozenset({RCX, RDX, RSI, RDI, R8, R9, R10})    # allocatable ones
DIVISIONS = ("udiv", "sdiv", "urem", "srem")
SHIFTS = ("shl", "shr", "sar")

NOTHING: frozenset[Reg] = frozenset()
ONLY_RDX, ONLY_RCX = frozenset({RDX}), frozenset({RCX})
# Registers a machine operation's native sequence destroys (beyond rax, r11).
MACHINE_CLOBBERS = {
    "outb": ONLY_RDX, "outw": ONLY_RDX, "outl": ONLY_RDX,
    "inb": ONLY_RDX, "inw": ONLY_RDX, "inl": ONLY_RDX,
    "rdmsr": frozenset({RCX, RDX}), "wrmsr": frozenset({RCX, RDX}),
    "cpuid": frozenset({RBX, RCX, RDX}),
    "rdtsc": ONLY_RDX,
    "swtch": CALLER_SAVED,
    "syscall": frozenset({RCX, RDX, RSI, RDI}),     # arguments in rdi, rsi, rdx; rcx is the CPU's
}


@dataclass(slots=True)
class Addr:
    """A memory operand: reg + disp, symbol + disp, slot + disp, or absolute disp."""
    reg: ir.VReg | None = None
    symbol: str | None = None
    slot: int | None = None
    disp: int = 0


@dataclass(slots=True)
class MLoad(ir.Instr):
    dst: ir.VReg
    addr: Addr
    size: int
    signed: bool = False

    def uses(self):
        return [self.addr.reg] if self.addr.reg is not None else []


@dataclass(slots=True)
class MStore(ir.Instr):
    addr: Addr
    value: ir.Operand
    size: int

    def uses(self):
        return ([self.addr.reg] if self.addr.reg is not None else []) + [self.value]


@dataclass(slots=True)
class CmpBranch(ir.Instr):
    """if (a OP b) goto then else goto else_."""
    op: str
    a: ir.Operand
    b: ir.Operand
    then: str
    else_: str

    def uses(self):
        return [self.a, self.b]


@dataclass(slots=True)
class MBlock:
    label: str
    instrs: list[ir.Instr]
    term: ir.Instr

    def successors(self) -> list[str]:
        t = self.term
        if isinstance(t, ir.Jump):
            return [t.target]
        if isinstance(t, (ir.Branch, CmpBranch)):
            return [t.then, t.else_]
        return []


class SelectError(Exception):
    pass


def _binop_clobbers(ins: ir.BinOp) -> frozenset[Reg]:
    if ins.op in DIVISIONS:
        return ONLY_RDX
    if ins.op in SHIFTS and type(ins.b) is not int:
        return ONLY_RCX
    return NOTHING


# The kinds of instruction that may destroy allocatable registers, and which
# ones a given instruction destroys; every other kind destroys none.  A table,
# so that register allocation asks only about these kinds.
CLOBBERS: dict[type, Callable[[ir.Instr], frozenset[Reg]]] = {
    ir.BinOp: _binop_clobbers,
    ir.Call: lambda ins: CALLER_SAVED, ir.CallIndirect: lambda ins: CALLER_SAVED,
    ir.Hypercall: lambda ins: CALLER_SAVED,
    ir.MachineOp: lambda ins: MACHINE_CLOBBERS.get(ins.op, NOTHING),
}


def clobbers(ins: ir.Instr) -> frozenset[Reg]:
    """Allocatable registers destroyed by the code emitted for `ins`."""
    of = CLOBBERS.get(type(ins))
    return NOTHING if of is None else of(ins)


ACCESSES = (ir.Load, ir.Store)


def select(fn: ir.Function) -> list[MBlock]:
    """Copy the function's blocks into MBlocks, fusing the patterns above."""
    VReg, operands = ir.VReg, ir.operands
    uses: dict[int, int] = {}                   # VReg.id -> how many reads, how many writes
    defs: dict[int, int] = {}
    accessing: set[str] = set()                 # the blocks with loads or stores
    for b in fn.blocks:
        for ins in b.instrs:
            read, d = operands(ins)
            if type(ins) in ACCESSES:
                accessing.add(b.label)
            for u in read:
                if type(u) is VReg:
                    uses[u.id] = uses.get(u.id, 0) + 1
            if type(d) is VReg:
                defs[d.id] = defs.get(d.id, 0) + 1
        if b.term is not None:
            for u in b.term.uses():
                if type(u) is VReg:
                    uses[u.id] = uses.get(u.id, 0) + 1
    blocks = []
    for b in fn.blocks:
        if b.term is None:
            raise SelectError(f"{fn.name}: block {b.label} has no terminator")
        instrs, term = _fuse_compare(b.instrs, b.term, uses)
        if b.label in accessing:
            instrs = _fuse_addresses(instrs, uses, defs)
        elif instrs is b.instrs:                # (an address is only fused into a load or store)
            instrs = list(instrs)
        blocks.append(MBlock(b.label, instrs, term))
    labels = {b.label for b in blocks}
    for b in blocks:
        for s in b.successors():
            if s not in labels:
                raise SelectError(f"{fn.name}: jump to unknown block {s}")
    return blocks


def _fuse_compare(instrs: list[ir.Instr], term: ir.Instr, uses: dict[int, int]):
    """The block's instructions and terminator, the last Cmp fused into the Branch if it can be."""
    if (type(term) is ir.Branch and instrs and type(instrs[-1]) is ir.Cmp
            and instrs[-1].dst == term.cond and uses[term.cond.id] == 1):
        c = instrs[-1]
        return instrs[:-1], CmpBranch(c.op, c.a, c.b, term.then, term.else_, loc=term.loc or c.loc)
    return instrs, term


def _fuse_addresses(instrs: list[ir.Instr], uses: dict[int, int], defs: dict[int, int]) -> list[ir.Instr]:
    """The block's instructions with loads and stores over Addrs; `instrs` is left as it is."""
    out: list[ir.Instr | None] = []
    pending: dict[int, tuple[Addr, int]] = {}      # foldable address's VReg.id -> (Addr, index in out)
    folded: list[int] = []                         # indexes in out of the addresses folded away

    def addr(base: ir.Operand, offset: int) -> Addr:
        if type(base) is int:
            return Addr(disp=(base + offset) % (1 << 64))
        found = pending.pop(base.id, None) if pending else None
        if found is None:
            return Addr(reg=base, disp=offset)
        a, k = found
        out[k] = None                                 # the address needs no register now
        folded.append(k)
        return Addr(symbol=a.symbol, slot=a.slot, disp=a.disp + offset)

    for ins in instrs:
        kind = type(ins)
        if kind is ir.Load:
            out.append(MLoad(ins.dst, addr(ins.base, ins.offset), ins.size, ins.signed, loc=ins.loc))
        elif kind is ir.Store:
            out.append(MStore(addr(ins.base, ins.offset), ins.value, ins.size, loc=ins.loc))
        elif (kind is ir.AddrOf or kind is ir.SlotAddr) and uses.get(ins.dst.id) == 1 and defs[ins.dst.id] == 1:
            a = (Addr(symbol=ins.symbol, disp=ins.offset) if kind is ir.AddrOf
                 else Addr(slot=ins.slot, disp=ins.offset))
            pending[ins.dst.id] = (a, len(out))
            out.append(ins)
        else:
            out.append(ins)
    return [i for i in out if i is not None] if folded else out
