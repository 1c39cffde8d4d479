"""The paravirtualization pass: IR to IR, for `--target pv`.

Every sensitive `MachineOp` is replaced by its cheapest correct paravirtual
form (see docs/abi.md):

* interrupt flag (`cli`, `sti`, `save_flags`, `restore_flags`): loads and
  stores of the shared page's upcall mask; unmasking exits only when an event
  is pending;
* reads of virtual CPU state (`read_cr*`, `sgdt`, `sidt`): shared-page loads;
* `set_pte`, `invlpg`, port writes, `write_cr3` (`new_baseptr`) and
  `set_kernel_stack` (`stack_switch`): appended to the shared-page multicall
  queue (each entry's result field holding the address of the code that
  queued it, for the hypervisor's messages), flushed with one hypercall at
  the next point that could observe them; so a process switch, a new
  address space and the kernel stack for it, is one exit, as in Xen;
* `load_tr`: nothing (the hypervisor keeps the kernel stack, see
  `set_kernel_stack`); `enter_user`: a jump to the `iret` hypercall entry;
* everything else: one hypercall.

In a `user fn` no operation may exit or touch the shared page (user code
cannot): each sensitive one becomes a load through a non-canonical address,
which raises #GP(0) at CPL 3 as the real instruction would.

Each replacement is wrapped in SiteBegin/SiteEnd so the back end records it
in `.pv.sites`.  Interrupt returns, and those of the TrapFrame entries,
become the `iret` hypercall.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pvimage import abi
from .errors import InternalError
from .intrinsics import INTRINSICS
from .ir import (AddrOf, BinOp, Block, Branch, Call, Cmp, CodeAddr, Copy, Ext, Function, Hypercall, Instr,
                 IRet, Jump, Load, MachineOp, Module, Operand, Ret, ResumeFrame, SiteBegin, SiteEnd, SlotAddr,
                 Store, UnOp, VReg)
from .source import Loc

S = abi.SHARED_PAGE
IF_BIT = 9

QUEUED = {"set_pte": abi.HC_SET_PTE, "invlpg": abi.HC_INVLPG,
          "outb": abi.HC_IO_OUT, "outw": abi.HC_IO_OUT, "outl": abi.HC_IO_OUT,
          "write_cr3": abi.HC_NEW_BASEPTR, "set_kernel_stack": abi.HC_STACK_SWITCH}
PORT_SIZE = {"outb": 1, "outw": 2, "outl": 4, "inb": 1, "inw": 2, "inl": 4}
CR_FIELD = {"read_cr0": abi.SH_CR0, "read_cr2": abi.SH_CR2,
            "read_cr3": abi.SH_CR3, "read_cr4": abi.SH_CR4}
DT_FIELD = {"sgdt": abi.SH_GDTR, "sidt": abi.SH_IDTR}
SIMPLE_HYPERCALLS = {"hlt": abi.HC_BLOCK, "lgdt": abi.HC_SET_GDT,
                     "lidt": abi.HC_SET_TRAP_TABLE, "wrmsr": abi.HC_WRMSR, "cpuid": abi.HC_CPUID,
                     "rdtsc": abi.HC_RDTSC, "wbinvd": abi.HC_WBINVD}
NON_CANONICAL = 0x8000_0000_0000_0000     # a load from here raises #GP(0)
MC_RESULT = 8 * 4                         # the result field of a multicall entry
USER_FAULT = "raises #GP in user mode"

# Instructions that only compute in registers: a pending batch cannot be observed by them.
PURE = (Copy, BinOp, UnOp, Ext, Cmp, AddrOf, SlotAddr, CodeAddr)


class ParavirtError(InternalError):
    """An internal invariant broke: a sensitive operation survived the pass."""

    def __init__(self, message: str):
        super().__init__("paravirt", message)


def paravirtualize(module: Module) -> Module:
    """Rewrite `module` in place for the PV target and return it."""
    sensitive = [bool(_sensitive(fn)) for fn in module.functions]
    quiet = quiet_functions(module, [fn for fn, s in zip(module.functions, sensitive) if s and not fn.user])
    for fn, rewrite in zip(module.functions, sensitive):
        if rewrite:
            _Rewriter(fn, quiet).run()
            left = _sensitive(fn)
            if left:
                raise ParavirtError(f"{fn.name}: {left[0].op} was not rewritten")
        else:
            # Most functions: nothing is ever queued, so nothing to flush or rewrite
            # but the interrupt returns.
            for b in fn.blocks:
                if isinstance(b.term, IRet):
                    b.term = _Rewriter.rewrite_terminator(b.term)
        if fn.trap_entry is not None:
            fn.trap_entry.hypercall = abi.HC_IRET
    module.target = "pv"
    return module


def _sensitive(fn: Function) -> list[MachineOp]:
    """The sensitive machine operations of `fn` (all queued ones are sensitive)."""
    return [ins for b in fn.blocks for ins in b.instrs
            if isinstance(ins, MachineOp) and INTRINSICS[ins.op].sensitive]


def is_queued(ins: Instr) -> bool:
    return isinstance(ins, MachineOp) and ins.op in QUEUED


_QUIET = PURE + (Call, Jump, Branch, Ret)      # what a quiet function may hold


def quiet_functions(module: Module, callers: list[Function] | None = None) -> frozenset[str]:
    """The kernel functions that only compute in registers and call each other (a helper that works
    out a table's address, say): a call to one cannot observe a pending batch, so it is no flush
    point.  The largest such set: a function is dropped as soon as it does anything else or calls
    one that does.  With `callers`, only the functions they call, directly or further down, are
    looked at (whether a function is quiet depends on nothing else): the pass needs no more."""
    by_name = {fn.name: fn for fn in module.functions}
    work = list(by_name) if callers is None else [c for fn in callers for c in _callees(fn)]
    calls: dict[str, set[str]] = {}          # the quiet candidates met, and whom they call
    seen: set[str] = set()
    while work:
        name = work.pop()
        if name in seen:
            continue
        seen.add(name)
        fn = by_name.get(name)
        if fn is not None and not (fn.user or fn.interrupt or fn.trap_entry) \
                and all(isinstance(i, _QUIET) for i in fn.instructions()):
            calls[name] = _callees(fn)
            work.extend(calls[name])
    quiet = set(calls)
    while unquiet := {name for name in quiet if not calls[name] <= quiet}:
        quiet -= unquiet
    return frozenset(quiet)


def _callees(fn: Function) -> set[str]:
    return {i.func for i in fn.instructions() if isinstance(i, Call)}


def observes(ins: Instr, quiet: frozenset[str] = frozenset()) -> bool:
    """Could `ins` see whether queued operations have run yet?  (docs/abi.md, flush points)"""
    if isinstance(ins, Call):
        return ins.func not in quiet
    return not (isinstance(ins, PURE) or is_queued(ins) or isinstance(ins, (Jump, Branch)))


def pending_after(ins: Instr, pending: bool, quiet: frozenset[str] = frozenset()) -> bool:
    """The transfer function: can the queue be non-empty after `ins`?  (An
    observer finds it flushed in front of it.)"""
    if is_queued(ins):
        return True
    return pending and not observes(ins, quiet)


def pending_at_entry(fn: Function, quiet: frozenset[str] = frozenset()) -> dict[str, bool]:
    """Forward may-analysis: can the multicall queue be non-empty on entry to each block?"""
    preds: dict[str, list[str]] = {b.label: [] for b in fn.blocks}
    for b in fn.blocks:
        for s in b.successors():
            preds[s].append(b.label)
    out = {b.label: False for b in fn.blocks}
    entry = {b.label: False for b in fn.blocks}
    changed = True
    while changed:
        changed = False
        for b in fn.blocks:
            state = any(out[p] for p in preds[b.label])
            entry[b.label] = state
            for ins in b.instrs:
                state = pending_after(ins, state, quiet)
            if state != out[b.label]:
                out[b.label] = state
                changed = True
    return entry


@dataclass
class _Rewriter:
    fn: Function
    quiet: frozenset[str] = frozenset()        # functions a call to which is no flush point
    blocks: list[Block] = field(default_factory=list)
    cur: Block | None = None
    labels: set[str] = field(default_factory=set)
    loc: Loc | None = None
    next_site: int = 0

    def run(self) -> None:
        if self.fn.user:
            self.run_user()
            return
        self.labels = {b.label for b in self.fn.blocks}
        entry_state = pending_at_entry(self.fn, self.quiet)
        for block in self.fn.blocks:
            self.cur = Block(block.label, [])
            self.blocks.append(self.cur)
            pending = entry_state[block.label]
            for ins in block.instrs:
                self.loc = ins.loc
                if observes(ins, self.quiet) and pending:
                    self.flush()
                    pending = False
                if isinstance(ins, MachineOp) and INTRINSICS[ins.op].sensitive:
                    self.rewrite(ins)
                else:
                    self.emit(ins)
                pending = pending_after(ins, pending, self.quiet)
            self.loc = block.term.loc if block.term else None
            if observes(block.term) and pending:
                self.flush()
            self.cur.term = self.rewrite_terminator(block.term)
        self.fn.blocks = self.blocks

    def run_user(self) -> None:
        """User code: nothing is queued, so nothing is flushed; each sensitive operation faults."""
        for block in self.fn.blocks:
            instrs, block.instrs = block.instrs, []
            self.cur = block
            for ins in instrs:
                self.loc = ins.loc
                if isinstance(ins, MachineOp) and INTRINSICS[ins.op].sensitive:
                    self.site(ins, self.user_fault)
                else:
                    self.emit(ins)

    def user_fault(self, ins: MachineOp) -> tuple[int, str]:
        value = self.tmp()
        self.emit(Load(value, NON_CANONICAL, 0, 8))
        if ins.dst is not None:
            self.emit(Copy(ins.dst, value))    # never reached; keeps the result defined
        return abi.SITE_NO_EXIT, USER_FAULT

    # -- building blocks ---------------------------------------------------
    def emit(self, ins: Instr) -> Instr:
        if ins.loc is None:
            ins.loc = self.loc
        self.cur.instrs.append(ins)
        return ins

    def tmp(self) -> VReg:
        return self.fn.new_vreg()

    def label(self, hint: str) -> str:
        n = len(self.labels)
        while f".pv.{hint}{n}" in self.labels:
            n += 1
        name = f".pv.{hint}{n}"
        self.labels.add(name)
        return name

    def when(self, cond: Operand, body: list[Instr], hint: str) -> None:
        """if cond != 0 { body }: splits the current block; the new blocks follow it."""
        then, cont = self.label(hint), self.label("cont")
        self.cur.term = Branch(cond, then, cont, loc=self.loc)
        then_block = Block(then, [], Jump(cont, loc=self.loc))
        self.blocks.append(then_block)
        self.cur = then_block
        for ins in body:
            self.emit(ins)
        self.cur = Block(cont, [])
        self.blocks.append(self.cur)

    def hypercall(self, nr: int, args: list[Operand] = (), dst: VReg | None = None) -> Hypercall:
        return Hypercall(dst, nr, list(args), loc=self.loc)

    def load(self, offset: int, size: int) -> VReg:
        dst = self.tmp()
        self.emit(Load(dst, S, offset, size))
        return dst

    def op(self, name: str, a: Operand, b: Operand) -> VReg:
        dst = self.tmp()
        self.emit(BinOp(name, dst, a, b))
        return dst

    # -- flushing the multicall queue -------------------------------------------
    def flush(self) -> None:
        """if (queue count != 0) multicall();"""
        count = self.load(abi.SH_MC_COUNT, 4)
        self.when(count, [self.hypercall(abi.HC_MULTICALL)], "flush")

    def enqueue(self, nr: int, args: list[Operand]) -> None:
        count = self.load(abi.SH_MC_COUNT, 4)
        full = self.tmp()
        self.emit(Cmp("uge", full, count, abi.MC_MAX))
        self.when(full, [self.hypercall(abi.HC_MULTICALL), Copy(count, 0, loc=self.loc)], "full")
        entry = self.op("add", self.op("mul", count, abi.MC_ENTRY_SIZE), S + abi.SH_MC_ENTRIES)
        for k, value in enumerate([nr, *args, *[0] * (3 - len(args))]):
            self.emit(Store(entry, 8 * k, value, 8))
        here = self.tmp()
        self.emit(CodeAddr(here))
        self.emit(Store(entry, MC_RESULT, here, 8))
        self.emit(Store(S, abi.SH_MC_COUNT, self.op("add", count, 1), 4))

    # -- the rewrites -------------------------------------------------------------
    def rewrite(self, ins: MachineOp) -> None:
        self.site(ins, self.replace)

    def site(self, ins: MachineOp, replace) -> None:
        """`replace(ins)` between the markers of a new site."""
        site = self.next_site
        self.next_site += 1
        begin = self.emit(SiteBegin(site, ins.op, ""))
        begin.kind, begin.becomes = replace(ins)
        self.emit(SiteEnd(site))

    def replace(self, ins: MachineOp) -> tuple[int, str]:
        """Emit the paravirtual form of `ins`; return its site kind and what it became, in words."""
        op, args, dst = ins.op, ins.args, ins.dst
        if op in QUEUED:
            self.enqueue(QUEUED[op], self.queued_args(op, args))
            return abi.SITE_BATCHED, f"multicall queue entry: {abi.HYPERCALL_NAMES[QUEUED[op]]} (batched)"
        if op == "cli":
            self.emit(Store(S, abi.SH_UPCALL_MASK, 1, 1))
            return abi.SITE_NO_EXIT, "shared-page store: upcall_mask = 1 (no exit)"
        if op == "sti":
            self.set_mask_and_check(0, enabling=1)
            return abi.SITE_NO_EXIT, "shared-page store: upcall_mask = 0; event_check only if pending"
        if op == "restore_flags":
            enabled = self.op("and", self.op("shr", args[0], IF_BIT), 1)
            self.set_mask_and_check(self.op("xor", enabled, 1), enabling=enabled)
            return abi.SITE_NO_EXIT, "shared-page store: upcall_mask = !IF; event_check only if pending"
        if op == "save_flags":
            enabled = self.op("xor", self.load(abi.SH_UPCALL_MASK, 1), 1)
            self.emit(BinOp("or", dst, self.op("shl", enabled, IF_BIT), 2))
            return abi.SITE_NO_EXIT, "shared-page load: IF = !upcall_mask (no exit)"
        if op in CR_FIELD:
            self.emit(Load(dst, S, CR_FIELD[op], 8))
            return abi.SITE_NO_EXIT, "shared-page load: virtual " + op[5:] + " (no exit)"
        if op in DT_FIELD:
            for offset, size in ((0, 8), (8, 2)):
                self.emit(Store(args[0], offset, self.load(DT_FIELD[op] + offset, size), size))
            return abi.SITE_NO_EXIT, f"shared-page copy: virtual {op[1:].upper()}R (no exit)"
        if op in ("inb", "inw", "inl"):
            self.emit(self.hypercall(abi.HC_IO_IN, [args[0], PORT_SIZE[op]], dst))
            return abi.SITE_HYPERCALL, "hypercall io_in"
        if op in ("write_cr0", "write_cr4"):
            self.emit(self.hypercall(abi.HC_WRITE_CR, [int(op[-1]), args[0]]))
            return abi.SITE_HYPERCALL, "hypercall write_cr"
        if op == "load_tr":
            return abi.SITE_NO_EXIT, "nothing: the hypervisor keeps the kernel stack (stack_switch)"
        if op == "enter_user":
            self.emit(ResumeFrame(args[0], abi.HC_IRET))
            return abi.SITE_HYPERCALL, "jump to hypercall iret"
        if op == "rdmsr":
            self.emit(self.hypercall(abi.HC_RDMSR, args))
            self.emit(Load(dst, S, abi.SH_HC_VALUE, 8))
            return abi.SITE_HYPERCALL, "hypercall rdmsr"
        nr = SIMPLE_HYPERCALLS[op]
        self.emit(self.hypercall(nr, args, dst))
        return abi.SITE_HYPERCALL, f"hypercall {abi.HYPERCALL_NAMES[nr]}"

    @staticmethod
    def queued_args(op: str, args: list[Operand]) -> list[Operand]:
        if op in PORT_SIZE:
            return [args[0], PORT_SIZE[op], args[1]]
        if op == "set_kernel_stack":            # the TSS is the native build's; the hypervisor keeps the top
            return list(args[1:])
        return list(args)

    def set_mask_and_check(self, mask: Operand, enabling: Operand) -> None:
        """Store the mask; if that enabled interrupts and an event waits, make the one exit."""
        self.emit(Store(S, abi.SH_UPCALL_MASK, mask, 1))
        pending = self.load(abi.SH_UPCALL_PENDING, 1)
        deliver = pending if isinstance(enabling, int) else self.op("and", pending, enabling)
        self.when(deliver, [self.hypercall(abi.HC_EVENT_CHECK)], "event")

    @staticmethod
    def rewrite_terminator(term: Instr) -> Instr:
        if isinstance(term, IRet):
            return IRet(abi.HC_IRET, loc=term.loc)
        return term
