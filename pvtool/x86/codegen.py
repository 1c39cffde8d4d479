"""Code generation: IR functions to x86-64 object code.

For each function: `isel.select` fuses patterns, `regalloc.allocate`
gives every vreg a register or a spill slot, `frame.layout` places slots
and saved registers, and `FunctionGen` walks the blocks in order, emitting
through `encode.Asm` and recording line rows and site rows.

Conventions inside a function body:
* rax and r11 are scratch, never allocated: emitters use them to reach
  spilled values, immediates that need a register and fixed-register
  instruction sequences.  Every other register but rsp and rbp is
  allocatable; values live across a call get callee-saved registers.
* Flags never live across an emitter, except cmp -> jcc in `CmpBranch`,
  which emits nothing between the two.
* Bundled code (the pv target's default; see encode.py for the layout)
  returns with `pop r11; and r11, -32; jmp r11` (r11 is free at a return)
  and calls indirectly with `and rax, -32; call rax`.  An interrupt
  return in pv is a direct jump to the `iret` hypercall entry.
* A handler with a TrapFrame is its body plus an entry (`trap_entry`)
  that builds the frame, calls the body on a 16-byte aligned stack and
  returns from the interrupt with the registers the frame then holds.

Public: `generate(module) -> obj.ObjectCode`.
"""
from __future__ import annotations

from typing import Callable

from pvimage import abi

from .. import ir, obj
from ..diagnostics import CompileError
from ..errors import InternalError
from ..intrinsics import INTRINSICS
from ..ir import KERNEL_STACK, SYSCALL_USER_RSP
from ..source import Loc
from ..types import TRAP_FRAME_REGISTERS
from . import isel
from .encode import (BUNDLE, REG_NAMES, REGS, Asm, EncodeError, Mem, Reg, fits_s32, RAX, RBX, RCX, RDX,
                     RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15)
from .frame import FrameError, FrameTooLarge, layout
from .isel import CmpBranch, MLoad, MStore
from .regalloc import allocate

REGS_BY_NAME = dict(zip(REG_NAMES[8], REGS))
ARG_REGS = (RDI, RSI, RDX, RCX, R8, R9)
HYPERCALL_REGS = (RDI, RSI, RDX, R10, R8)
CALLEE_SAVED = (RBX, R12, R13, R14, R15)
# Allocation preference: caller-saved first (free to use), rcx/rdx last of
# those (shifts, division and port I/O want them), then callee-saved.
ALLOCATABLE = [RSI, RDI, R8, R9, R10, RCX, RDX, RBX, R12, R13, R14, R15]
SCRATCH = (RAX, R11)

SWTCH = "__pvk_swtch"
LOCAL = ".L"            # a block's label in the assembler: its IR label after this
HYPERCALL_PAGE = "__hypercall_page"
# The registers of a TrapFrame, lowest address first (the entry pushes them last first).
FRAME_REGS = tuple(REGS_BY_NAME[name] for name in TRAP_FRAME_REGISTERS)
TSS_RSP0 = 4            # TSS.rsp0: the stack the CPU switches to on an entry from CPL 3

CC = {"eq": "e", "ne": "ne", "ult": "b", "ule": "be", "ugt": "a", "uge": "ae",
      "slt": "l", "sle": "le", "sgt": "g", "sge": "ge"}
SWAPPED = {"eq": "eq", "ne": "ne", "ult": "ugt", "ule": "uge", "ugt": "ult", "uge": "ule",
           "slt": "sgt", "sle": "sge", "sgt": "slt", "sge": "sle"}
INVERSE = {"e": "ne", "ne": "e", "b": "ae", "ae": "b", "be": "a", "a": "be",
           "l": "ge", "ge": "l", "le": "g", "g": "le"}
COMMUTATIVE = ("add", "mul", "and", "or", "xor")


class CodegenError(InternalError):
    """IR the back end cannot compile: a broken invariant of an earlier stage
    (or of the back end itself), never the program's fault.  The message
    names the function."""

    def __init__(self, message: str):
        super().__init__("codegen", message)


def signed64(v: int) -> int:
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


def generate(module: ir.Module, registers: list[Reg] | None = None,
             bundled: bool | None = None) -> obj.ObjectCode:
    """Compile every function of `module`; data and files pass through.
    `registers` narrows the allocatable set (tests use it to force spills).
    `bundled` lays the code out by the PV code rules (encode.py); it is the
    default for the pv target, and for native it measures the layout's cost."""
    if bundled is None:
        bundled = module.target == "pv"
    functions, need_swtch = [], False
    for fn in module.functions:
        gen = FunctionGen(fn, registers, bundled)
        try:
            if fn.trap_entry is not None:
                functions.append(trap_entry(fn, bundled))
            functions.append(gen.run())
        except FrameTooLarge as e:
            raise CompileError(fn.loc, f"function '{fn.name}' {e}") from None
        except (isel.SelectError, FrameError, EncodeError) as e:
            raise CodegenError(f"{fn.name}: {e}") from None
        need_swtch |= gen.calls_swtch
    if need_swtch:
        functions.append(swtch_helper(bundled))
    return obj.ObjectCode(functions, module.data, module.files, target=module.target, bundled=bundled)


def swtch_helper(bundled: bool) -> obj.FunctionCode:
    """__pvk_swtch(old: *u64 in rdi, new: u64 in rsi).

    Pushes the callee-saved registers, stores rsp to *old, switches to
    `new` and pops the other task's registers.  A new task's stack, from
    `new` upwards, therefore holds 6 qwords (r15, r14, r13, r12, rbx, rbp:
    zeros will do) and then the address where it starts; make `new` 16-byte
    aligned so the entry function sees rsp = 8 (mod 16) as after a call.
    The entry function must never return."""
    a = Asm(bundled)
    order = (RBP, RBX, R12, R13, R14, R15)
    for r in order:
        a.push(r)
    a.mov(Mem(RDI), RSP)
    a.mov(RSP, RSI)
    for r in reversed(order):
        a.pop(r)
    return_(a)
    return obj.FunctionCode(SWTCH, a.finish(), a.relocs, align=function_align(bundled))


def trap_entry(body: ir.Function, bundled: bool) -> obj.FunctionCode:
    """The entry of a handler with a TrapFrame (docs/language.md 3): complete the CPU's
    frame to a TrapFrame, call the body with it, and return to what the frame then says."""
    entry = body.trap_entry
    if entry.kind not in ir.TRAP_KINDS:
        raise CodegenError(f"{body.name}: unknown trap entry kind {entry.kind!r}")
    a = Asm(bundled)
    if entry.kind == "syscall" and entry.hypercall is None:
        syscall_frame(a)
    if entry.kind != "interrupt_error":
        a.push_imm(0)                    # the error code the CPU did not push
    for r in reversed(FRAME_REGS):
        a.push(r)
    a.cld()                              # the body is a System V function
    a.mov(RBX, RSP)                      # the frame; rbx survives the call
    framed = a.anchor()
    a.and_(RSP, -16)
    a.mov(RDI, RBX)
    a.call(body.name)
    a.mov(RSP, RBX)
    unframed = a.anchor()
    start, end, becomes, kind = resume_frame(a, entry.hypercall)
    code = a.finish()
    sites = [obj.SiteRow(*a.span(start, end), "iret", body.loc, becomes, kind)]
    lines = [obj.LineRow(0, body.loc)] if body.loc is not None else []
    # loc None: compiler-made code, no function of the source (its line row still places it)
    return obj.FunctionCode(entry.name, code, a.relocs, lines, sites, loc=None,
                            align=function_align(bundled), entered_by="trap entry",
                            frame=trap_frame_steps(a.at(framed), a.at(unframed)))


def trap_frame_steps(framed: int, unframed: int) -> list[obj.FrameStep]:
    """The unwinder's view of a trap entry: while the body runs, rbx points at the TrapFrame,
    which holds the interrupted registers and, at its top, the interrupt frame; while the
    frame is being built or taken down, the interrupted context is not described."""
    size = 8 * (len(FRAME_REGS) + 1 + 5)              # the registers, the error code, rip cs rflags rsp ss
    known = [obj.FrameStep(framed, obj.CFA_AT, RBX.n, size), obj.FrameStep(framed, obj.RETURN_AT, 0, 40)]
    known += [obj.FrameStep(framed, obj.SAVED_AT, r.n, size - 8 * k) for k, r in enumerate(FRAME_REGS)]
    return [obj.FrameStep(0, obj.CALLER_UNKNOWN)] + known + [obj.FrameStep(unframed, obj.CALLER_UNKNOWN)]


def syscall_frame(a: Asm) -> None:
    """Native: the CPU arrives from `syscall` at CPL 0 with the user's rsp, rcx = the user's
    rip and r11 = its rflags.  Switch to the kernel stack and push the interrupt frame an
    exception from user mode would have (a PV kernel gets it from the hypervisor)."""
    a.mov(Mem(symbol=SYSCALL_USER_RSP), RSP)
    a.mov(RSP, Mem(symbol=KERNEL_STACK))
    a.push_imm(abi.USER_DS)
    a.push_mem(Mem(symbol=SYSCALL_USER_RSP))
    a.push(R11)
    a.push_imm(abi.USER_CS)
    a.push(RCX)


def resume_frame(a: Asm, hypercall: int | None) -> tuple[int, int, str, int]:
    """With rsp at a TrapFrame: pop its registers, drop the error code and return from the
    interrupt (`iretq`, or in PV a jump to the `hypercall` entry).  Returns the anchors
    around that last instruction, what it is in words and its site kind."""
    for r in FRAME_REGS:
        a.pop(r)
    a.add(RSP, 8)
    start = a.anchor()
    if hypercall is None:
        a.iretq()
        becomes, kind = "", abi.SITE_NATIVE
    else:
        a.jmp_symbol(HYPERCALL_PAGE, hypercall * abi.HYPERCALL_STRIDE)
        becomes, kind = f"hypercall {abi.HYPERCALL_NAMES.get(hypercall, hypercall)}", abi.SITE_HYPERCALL
    return start, a.anchor(), becomes, kind


def return_(a: Asm, popped: Callable[[], None] = lambda: None) -> None:
    """Return to the caller; bundled code masks the return address (r11 is free at a return).
    `popped` runs between a bundled return's pop and its jump (the unwinder is told)."""
    if a.bundled:
        a.pop(R11)
        popped()
        a.masked_jmp(R11)
    else:
        a.ret()


def function_align(bundled: bool) -> int:
    return BUNDLE if bundled else 16


class FunctionGen:
    def __init__(self, fn: ir.Function, registers: list[Reg] | None = None, bundled: bool = False) -> None:
        self.fn = fn
        self.registers = ALLOCATABLE if registers is None else [r for r in ALLOCATABLE if r in registers]
        self.a = Asm(bundled)
        self.lines: list[tuple[int, Loc]] = []        # (anchor, where the code from there comes from)
        self.sites: list[tuple[int, int, str, Loc | None, str, int]] = []   # anchors, op, loc, becomes, kind
        self.open_sites: dict[int, tuple[int, ir.SiteBegin]] = {}              # site -> (anchor, begin)
        self.frame_steps: list[tuple[int, str, int]] = []                       # anchor, event, register
        self.calls_swtch = False

    # -- driver -------------------------------------------------------------

    def run(self) -> obj.FunctionCode:
        fn = self.fn
        self.check()
        self.blocks = isel.select(fn)
        self.alloc = allocate(self.blocks, fn.params, self.registers, isel.CLOBBERS, self.hints())
        self.frame = layout(self.saved_registers(), fn.slots, self.alloc.spill_slots)
        spills = [self.frame.spill(k) for k in range(self.alloc.spill_slots)]
        # Each vreg's location, made once: `where` is then one lookup.
        self.locs = {v: h if type(h) is Reg else spills[h] for v, h in self.alloc.home.items()}
        self.mark(fn.loc)
        self.prologue()
        body = self.a.anchor()
        # Program points (regalloc's numbering) where a variable's register starts or stops holding it.
        start, end = self.alloc.start, self.alloc.end
        marks = sorted({p for v in fn.vars if type(v.home) is ir.VReg and v.home.id in start
                        for p in (start[v.home.id], end[v.home.id], end[v.home.id] + 1) if p},
                       reverse=True)
        points: dict[int, tuple[int, ir.Instr | None]] = {}     # point -> (anchor, its instruction)
        p = 0
        # The position of the last instruction: the last line row has its line, so an
        # instruction of the same line needs no `mark`.
        loc = None
        for k, b in enumerate(self.blocks):
            self.next_label = self.blocks[k + 1].label if k + 1 < len(self.blocks) else None
            self.a.label(LOCAL + b.label)
            p += 1
            if marks and marks[-1] == p:
                points[marks.pop()] = (self.a.anchor(), None)
            term = b.term
            for ins in (*b.instrs, term):
                p += 1
                if marks and marks[-1] == p:
                    points[marks.pop()] = (self.a.anchor(), ins)
                here = ins.loc
                if here is not loc:             # most neighbours share their statement's position
                    if here is not None and (loc is None or here.line != loc.line or here.file != loc.file):
                        self.mark(here)
                    loc = here
                if ins is term:
                    self.terminator(ins)
                    continue
                try:
                    emit = EMITTERS[type(ins)]
                except KeyError:
                    raise self.fail(f"cannot compile {ins!r}") from None
                emit(self, ins)
        if self.open_sites:
            raise self.fail("SiteBegin without SiteEnd")
        a = self.a
        code = a.finish()
        at = a.anchors
        lines = [obj.LineRow(at[k], loc) for k, loc in self.lines]
        sites = [obj.SiteRow(*a.span(start, end), op, loc, becomes, kind)
                 for start, end, op, loc, becomes, kind in self.sites]
        frame = [obj.FrameStep(at[k], event, reg) for k, event, reg in self.frame_steps]
        variables = self.variables({q: (at[k], ins) for q, (k, ins) in points.items()}, at[body], len(code))
        return obj.FunctionCode(fn.name, code, a.relocs, lines, sites, loc=fn.loc,
                                align=function_align(a.bundled), user=fn.user, frame=frame, body=a.at(body),
                                source_name=fn.trap_entry.name if fn.trap_entry is not None else "",
                                entered_by="interrupt" if fn.interrupt else "call",
                                variables=variables, result=fn.result)

    def variables(self, at: dict[int, tuple[int, ir.Instr | None]], body: int,
                  end: int) -> list[obj.Variable]:
        """Where each source variable lives, for the debugger: a stack slot for the whole body,
        or its vreg's register or spill slot over the code of the vreg's live interval, up to
        the end of its last use, or only to that use's first instruction if it destroys the
        register (a call); past it the value is gone and gdb says <optimized out>."""
        out = []
        for v in self.fn.vars:
            places = []
            if type(v.home) is int:
                places.append((body, end, None, self.frame.slot_disp[v.home]))
            elif v.home.id in self.alloc.start:
                vreg = v.home.id
                home = self.alloc.home[vreg]
                last_point = self.alloc.end[vreg]
                last_at, last = at.get(last_point, (end, None))
                start = max(body, at.get(self.alloc.start[vreg], (body, None))[0])
                stop = at.get(last_point + 1, (end, None))[0]
                if type(home) is Reg and last is not None and home in isel.clobbers(last):
                    stop = last_at + 1              # a stop at its first byte still sees the value
                if start < stop:
                    places.append((start, stop, home.n, 0) if type(home) is Reg
                                  else (start, stop, None, self.frame.spill_disp[home]))
            out.append(obj.Variable(v.name, v.type, v.param, places, v.loc.line if v.loc else 0))
        return out

    def check(self) -> None:
        fn = self.fn
        if not fn.blocks:
            raise self.fail("function has no blocks")
        if len(fn.params) > len(ARG_REGS):
            raise self.fail(f"more than {len(ARG_REGS)} parameters")
        if fn.interrupt and fn.params:
            raise self.fail("an interrupt function takes no parameters")
        wrong, message = ((ir.Ret, "an interrupt function must end in IRet, not Ret") if fn.interrupt
                          else (ir.IRet, "IRet outside an interrupt function"))
        for b in fn.blocks:
            if type(b.term) is wrong:
                raise self.fail(message)

    def hints(self) -> dict[int, list[Reg | int]]:
        """Preferred registers by vreg number: parameters where they arrive,
        arguments where the call wants them, copies where their source is."""
        h: dict[int, list[Reg | int]] = {}
        for p, r in zip(self.fn.params, ARG_REGS):
            h.setdefault(p.id, []).append(r)
        Copy, Call, Hypercall, VReg = ir.Copy, ir.Call, ir.Hypercall, ir.VReg
        for b in self.blocks:
            for ins in b.instrs:
                kind = type(ins)
                if kind is Copy:
                    if type(ins.src) is VReg:
                        h.setdefault(ins.dst.id, []).append(ins.src.id)
                elif kind is Call or kind is Hypercall:
                    for v, r in zip(ins.args, ARG_REGS if kind is Call else HYPERCALL_REGS):
                        if type(v) is VReg:
                            h.setdefault(v.id, []).append(r)
        return h

    def saved_registers(self) -> list[Reg]:
        touched = self.alloc.used | self.alloc.clobbered
        if not self.fn.interrupt:
            return [r for r in CALLEE_SAVED if r in touched]
        # A handler preserves every register it touches, the scratch ones too; a call
        # in it clobbers every caller-saved register, so those are saved as well.
        touched |= set(SCRATCH)
        return sorted(touched - {RSP, RBP}, key=lambda r: r.n)

    # -- bookkeeping ----------------------------------------------------------

    def fail(self, message: str) -> CodegenError:
        return CodegenError(f"{self.fn.name}: {message}")

    def mark(self, loc: Loc | None) -> None:
        """A line row whenever the source line changes."""
        if loc is None:
            return
        lines = self.lines
        if lines:
            anchor, last = lines[-1]
            if last is loc or (last.line == loc.line and last.file == loc.file):
                return
            if self.a.anchors[anchor] == len(self.a.code):
                lines.pop()                  # that line produced no code
                if lines and lines[-1][1].line == loc.line and lines[-1][1].file == loc.file:
                    return
        lines.append((self.a.anchor(), loc))

    def site(self, start: int, op: str, loc: Loc | None, becomes: str = "", kind: int = abi.SITE_NATIVE) -> None:
        """A site row for the code emitted since anchor `start`."""
        self.sites.append((start, self.a.anchor(), op, loc, becomes, kind))

    # -- operands -------------------------------------------------------------

    def where(self, v: ir.Operand) -> Reg | Mem | int:
        """The current location of an operand: register, spill slot or immediate."""
        if type(v) is not int:
            try:
                return self.locs[v.id]
            except KeyError:    # never live: a dead definition or an undefined read
                raise self.fail(f"{v!r} has no location") from None
        return v if 0 <= v < 1 << 63 else signed64(v)

    def load_imm(self, r: Reg, v: int) -> None:
        v = signed64(v)
        if v == 0:
            self.a.xor(r, r, size=4)
        elif 0 < v < 1 << 32:
            self.a.mov(r, v, size=4)        # zero-extends
        else:
            self.a.mov(r, v)                # sign-extended imm32, or movabs

    def move(self, dst: Reg | Mem, src: Reg | Mem | int, scratch: Reg = R11) -> None:
        """A 64-bit move between any two locations."""
        if dst is src:
            return
        if type(src) is Reg:                   # the common case first
            self.a.mov(dst, src)
            return
        if dst == src:
            return
        if type(src) is int:
            if type(dst) is Reg:
                self.load_imm(dst, src)
            elif fits_s32(src):
                self.a.mov(dst, src)
            else:
                self.load_imm(scratch, src)
                self.a.mov(dst, scratch)
        elif type(dst) is Mem and type(src) is Mem:
            self.a.mov(scratch, src)
            self.a.mov(dst, scratch)
        else:
            self.a.mov(dst, src)

    def reg(self, v: ir.Operand, scratch: Reg) -> Reg:
        """The operand in a register: its own, or loaded into `scratch`."""
        w = self.where(v)
        if type(w) is Reg:
            return w
        self.move(scratch, w)
        return scratch

    def result(self, dst: ir.VReg | None, src: Reg) -> None:
        if dst is not None:
            loc = self.locs.get(dst.id)
            if loc is not None and loc is not src:    # (most results are computed in place)
                self.move(loc, src)

    def target(self, dst: ir.VReg, scratch: Reg = R11) -> Reg:
        """The register to compute `dst` in: its home, or `scratch` if spilled."""
        w = self.where(dst)
        return w if type(w) is Reg else scratch

    def parallel_move(self, moves: list[tuple[Reg | Mem, Reg | Mem | int]]) -> None:
        """Perform moves that all read before any writes (r11 breaks cycles).
        Memory never appears both as a source and as a destination."""
        moves = [(d, s) for d, s in moves if d != s]
        for d, s in moves:
            if type(d) is Mem:
                self.move(d, s)
        pending = [(d, s) for d, s in moves if type(d) is Reg and type(s) is Reg]
        while pending:
            for k, (d, s) in enumerate(pending):
                if all(s2 != d for _, s2 in pending):
                    self.a.mov(d, s)
                    del pending[k]
                    break
            else:   # only cycles left: park one destination's value in r11
                d = pending[0][0]
                self.a.mov(R11, d)
                pending = [(d2, R11 if s2 == d else s2) for d2, s2 in pending]
        for d, s in moves:
            if type(d) is Reg and type(s) is not Reg:
                self.move(d, s)

    def address(self, addr: isel.Addr) -> Mem:
        """A memory operand for an Addr; may use r11 for the base."""
        if addr.symbol is not None:
            return Mem(symbol=addr.symbol, disp=addr.disp)
        if addr.slot is not None:
            if not 0 <= addr.slot < len(self.frame.slot_disp):
                raise self.fail(f"no stack slot {addr.slot}")
            return self.frame.slot(addr.slot, addr.disp)
        if addr.reg is None:
            v = signed64(addr.disp)
            if fits_s32(v):
                return Mem(None, v)
            self.load_imm(R11, v)
            return Mem(R11)
        base = self.reg(addr.reg, R11)
        if fits_s32(addr.disp):
            return Mem(base, addr.disp)
        if base != R11:
            self.a.mov(R11, base)
        self.load_imm(RAX, addr.disp)
        self.a.add(R11, RAX)
        return Mem(R11)

    # -- prologue and epilogue ---------------------------------------------------

    def frame_step(self, event: str, reg: Reg | None = None) -> None:
        self.frame_steps.append((self.a.anchor(), event, reg.n if reg is not None else 0))

    def prologue(self) -> None:
        a, f = self.a, self.frame
        a.push(RBP)
        self.frame_step(obj.PUSHED_RBP)
        a.mov(RBP, RSP)
        self.frame_step(obj.RBP_FRAME)
        for r in f.saved:
            a.push(r)
            self.frame_step(obj.SAVED, r)
        if f.size:
            a.sub(RSP, f.size)
        end = self.alloc.end
        self.parallel_move([(self.where(p), r) for p, r in zip(self.fn.params, ARG_REGS) if end.get(p.id, 0) > 0])

    def epilogue(self) -> None:
        a, f = self.a, self.frame
        self.frame_step(obj.LEAVING)
        if f.size and f.saved:
            a.lea(RSP, Mem(RBP, -f.saved_area))
        elif f.size:
            a.mov(RSP, RBP)
        for r in reversed(f.saved):
            a.pop(r)
        a.pop(RBP)
        self.frame_step(obj.POPPED_RBP)

    # -- terminators ------------------------------------------------------------

    def terminator(self, t: ir.Instr) -> None:
        a, kind = self.a, type(t)
        if kind is ir.Jump:
            self.jump(t.target)
        elif kind is ir.Branch:
            c = self.where(t.cond)
            if type(c) is int:
                self.jump(t.then if c else t.else_)
                return
            if type(c) is Reg:
                a.test(c, c)
            else:
                a.cmp(c, 0)
            self.branch("ne", t.then, t.else_)
        elif kind is CmpBranch:
            self.branch(self.compare(t.op, t.a, t.b), t.then, t.else_)
        elif kind is ir.Ret:
            if t.value is not None:
                self.move(RAX, self.where(t.value))
            self.epilogue()
            return_(a, popped=lambda: self.frame_step(obj.RETURN_IN, R11))
            self.frame_step(obj.RETURNED)
        elif kind is ir.IRet:
            self.epilogue()
            start = a.anchor()
            if t.hypercall is None:
                a.iretq()
                self.site(start, "iret", t.loc)
            else:
                a.jmp_symbol(HYPERCALL_PAGE, t.hypercall * abi.HYPERCALL_STRIDE)
                name = abi.HYPERCALL_NAMES.get(t.hypercall, str(t.hypercall))
                self.site(start, "iret", t.loc, f"hypercall {name}", abi.SITE_HYPERCALL)
            self.frame_step(obj.RETURNED)
        else:
            raise self.fail(f"unknown terminator {t!r}")

    def jump(self, target: str) -> None:
        if target != self.next_label:
            self.a.jmp(LOCAL + target)

    def branch(self, cc: str, then: str, else_: str) -> None:
        if then == self.next_label:
            self.a.jcc(INVERSE[cc], LOCAL + else_)
        else:
            self.a.jcc(cc, LOCAL + then)
            self.jump(else_)

    def compare(self, op: str, a: ir.Operand, b: ir.Operand) -> str:
        """Emit a 64-bit compare of a with b; return the condition code for `op`."""
        if op not in CC:
            raise self.fail(f"unknown comparison {op}")
        A, B = self.where(a), self.where(b)
        if type(A) is int:
            if type(B) is int:
                self.load_imm(R11, A)
                A = R11
            else:
                A, B, op = B, A, SWAPPED[op]
        if type(A) is Mem and type(B) is Mem:
            self.move(R11, A)
            A = R11
        if type(B) is int and not fits_s32(B):
            self.load_imm(RAX, B)
            B = RAX
        if B == 0 and type(A) is Reg:
            self.a.test(A, A)
        else:
            self.a.cmp(A, B)
        return CC[op]

    # -- instructions ---------------------------------------------------------

    def copy(self, i: ir.Copy) -> None:
        self.move(self.where(i.dst), self.where(i.src))

    def binop(self, i: ir.BinOp) -> None:
        op = i.op
        if op not in ALU_OPS and op != "mul":      # (the common operators first)
            if op in isel.DIVISIONS:
                self.divide(i)
            elif op in isel.SHIFTS:
                self.shift(i)
            else:
                raise self.fail(f"unknown binary operator {op}")
            return
        D, A, B = self.where(i.dst), self.where(i.a), self.where(i.b)
        if B == D and A != D and op in COMMUTATIVE:
            A, B = B, A
        if type(D) is Mem and A == D and op != "mul" and (type(B) is Reg or (type(B) is int and fits_s32(B))):
            self.apply(op, D, B)                      # x = x op y on a spilled x
            return
        if type(D) is Reg and op in ("add", "sub") and type(A) is Reg and type(B) is int \
                and A != D and fits_s32(-B if op == "sub" else B):
            self.a.lea(D, Mem(A, B if op == "add" else -B))
            return
        if op == "mul" and type(B) is int and fits_s32(B) and type(A) is not int:
            R = self.target(i.dst)
            self.a.imul(R, A, B)                      # three-operand form
            self.move(D, R)
            return
        R = D if type(D) is Reg and (B != D or A == D) else R11
        if R is not A:                                # (the moves' own first test, without the call)
            self.move(R, A)
        self.apply(op, R, B)
        if D is not R:
            self.move(D, R)

    def apply(self, op: str, R: Reg | Mem, B: Reg | Mem | int) -> None:
        """R = R op B."""
        if type(B) is int and not fits_s32(B):
            scratch = RAX if R == R11 else R11
            self.load_imm(scratch, B)
            B = scratch
        if op == "mul":
            if type(B) is int:
                self.a.imul(R, R, B)
            else:
                self.a.imul(R, B)
            return
        ALU_OPS[op](self.a, R, B)

    def shift(self, i: ir.BinOp) -> None:
        emit = SHIFT_OPS[i.op]
        if type(i.b) is int:
            D, A = self.where(i.dst), self.where(i.a)
            R = D if type(D) is Reg else R11          # (target(), without asking where() again)
            if R is not A:
                self.move(R, A)
            if i.b % 64:
                emit(self.a, R, i.b % 64)
            if D is not R:
                self.move(D, R)
            return
        self.move(R11, self.where(i.a))
        self.move(RCX, self.where(i.b))
        emit(self.a, R11, RCX)
        self.result(i.dst, R11)

    def divide(self, i: ir.BinOp) -> None:
        self.move(RAX, self.where(i.a))
        B = self.where(i.b)
        if type(B) is int or B == RDX:
            self.move(R11, B)
            B = R11
        signed = i.op in ("sdiv", "srem")
        if signed:
            self.a.cqo()
        else:
            self.a.xor(RDX, RDX, size=4)
        (self.a.idiv if signed else self.a.div)(B)
        self.result(i.dst, RAX if i.op in ("udiv", "sdiv") else RDX)

    def unop(self, i: ir.UnOp) -> None:
        emit = UNARY_OPS.get(i.op)
        if emit is None:
            raise self.fail(f"unknown unary operator {i.op}")
        D, A = self.where(i.dst), self.where(i.a)
        if type(D) is Mem and A == D:
            emit(self.a, D)
            return
        R = self.target(i.dst)
        self.move(R, A)
        emit(self.a, R)
        self.move(D, R)

    def ext(self, i: ir.Ext) -> None:
        if i.bits not in (8, 16, 32):
            raise self.fail(f"cannot extend from {i.bits} bits")
        A = self.where(i.src)
        if type(A) is int:
            v = A % (1 << i.bits)
            if i.signed and v >> (i.bits - 1):
                v -= 1 << i.bits
            self.move(self.where(i.dst), v)
            return
        R = self.target(i.dst)
        self.extend(R, A, i.bits // 8, i.signed)
        self.result(i.dst, R)

    def extend(self, R: Reg, src: Reg | Mem, size: int, signed: bool) -> None:
        """R = the low `size` bytes of src, zero- or sign-extended to 64 bits."""
        a = self.a
        if size == 8:
            a.mov(R, src)
        elif size == 4:
            if signed:
                a.movsxd(R, src)
            else:
                a.mov(R, src, size=4)
        elif signed:
            a.movsx(R, src, size)
        else:
            a.movzx(R, src, size)

    def cmp(self, i: ir.Cmp) -> None:
        cc = self.compare(i.op, i.a, i.b)
        R = self.target(i.dst)
        self.a.setcc(cc, R)
        self.a.movzx(R, R, 1)
        self.result(i.dst, R)

    def load(self, i: MLoad) -> None:
        if i.size not in (1, 2, 4, 8):
            raise self.fail(f"load of {i.size} bytes")
        m = self.address(i.addr)
        R = self.target(i.dst, RAX)
        self.extend(R, m, i.size, i.signed)
        self.result(i.dst, R)

    def store(self, i: MStore) -> None:
        if i.size not in (1, 2, 4, 8):
            raise self.fail(f"store of {i.size} bytes")
        m = self.address(i.addr)
        V = self.where(i.value)
        if type(V) is int:
            if i.size < 8:
                V %= 1 << (8 * i.size)
            elif not fits_s32(V):
                self.load_imm(RAX, V)
                V = RAX
        elif type(V) is Mem:
            self.a.mov(RAX, V)
            V = RAX
        self.a.mov(m, V, size=i.size)

    def addr_of(self, i: ir.AddrOf) -> None:
        R = self.target(i.dst)
        self.a.lea(R, Mem(symbol=i.symbol, disp=i.offset))
        self.result(i.dst, R)

    def slot_addr(self, i: ir.SlotAddr) -> None:
        if not 0 <= i.slot < len(self.frame.slot_disp):
            raise self.fail(f"no stack slot {i.slot}")
        R = self.target(i.dst)
        self.a.lea(R, self.frame.slot(i.slot, i.offset))
        self.result(i.dst, R)

    def call_args(self, args: list[ir.Operand], regs: tuple[Reg, ...], what: str) -> None:
        if len(args) > len(regs):
            raise self.fail(f"{what} with more than {len(regs)} arguments")
        self.parallel_move([(r, self.where(v)) for v, r in zip(args, regs)])

    def call(self, i: ir.Call) -> None:
        self.call_args(i.args, ARG_REGS, f"call of {i.func}")
        self.a.call(i.func)
        self.result(i.dst, RAX)

    def call_indirect(self, i: ir.CallIndirect) -> None:
        self.move(RAX, self.where(i.target))
        self.call_args(i.args, ARG_REGS, "indirect call")
        if self.a.bundled:
            self.a.masked_call(RAX)
        else:
            self.a.call_reg(RAX)
        self.result(i.dst, RAX)

    def hypercall(self, i: ir.Hypercall) -> None:
        if not 0 <= i.nr < abi.PAGE_SIZE // abi.HYPERCALL_STRIDE:
            raise self.fail(f"hypercall number {i.nr} out of range")
        self.call_args(i.args, HYPERCALL_REGS, f"hypercall {i.nr}")
        self.a.call(HYPERCALL_PAGE, i.nr * abi.HYPERCALL_STRIDE)
        self.result(i.dst, RAX)

    def site_begin(self, i: ir.SiteBegin) -> None:
        if i.site in self.open_sites:
            raise self.fail(f"site {i.site} begins twice")
        self.open_sites[i.site] = (self.a.anchor(), i)

    def code_addr(self, i: ir.CodeAddr) -> None:
        R = self.target(i.dst)
        self.a.lea_here(R)
        self.result(i.dst, R)

    def resume(self, i: ir.ResumeFrame) -> None:
        """PV enter_user: the frame's context, through the iret hypercall (the site is the pass's)."""
        if i.hypercall is None:
            raise self.fail("ResumeFrame without a hypercall: enter_user is a machine operation natively")
        self.move(RSP, self.where(i.frame))
        resume_frame(self.a, i.hypercall)

    def site_end(self, i: ir.SiteEnd) -> None:
        if i.site not in self.open_sites:
            raise self.fail(f"SiteEnd {i.site} without SiteBegin")
        start, begin = self.open_sites.pop(i.site)
        self.site(start, begin.op, begin.loc, begin.becomes, begin.kind)

    # -- machine operations ----------------------------------------------------

    def machine_op(self, i: ir.MachineOp) -> None:
        intrinsic = INTRINSICS.get(i.op)
        if intrinsic is None:
            raise self.fail(f"unknown machine operation {i.op}")
        if len(i.args) != len(intrinsic.params):
            raise self.fail(f"{i.op} takes {len(intrinsic.params)} arguments")
        a, op = self.a, i.op
        if op in PLAIN_OPS:
            self.sensitive(i, lambda: PLAIN_OPS[op](a))
        elif op in PORT_OUT:
            self.port_out(i, PORT_OUT[op])
        elif op in PORT_IN:
            self.port_in(i, PORT_IN[op])
        elif op in READ_CR:
            self.read_cr(i, READ_CR[op])
        elif op in WRITE_CR:
            self.write_cr(i, WRITE_CR[op])
        elif op in MEMORY_OPS:
            self.memory_op(i, MEMORY_OPS[op])
        else:
            match op:
                case "pause":
                    a.pause()
                case "save_flags":
                    self.save_flags(i)
                case "restore_flags":
                    self.restore_flags(i)
                case "set_pte":
                    self.set_pte(i)
                case "rdmsr":
                    self.rdmsr(i)
                case "wrmsr":
                    self.wrmsr(i)
                case "rdtsc":
                    self.sensitive(i, a.rdtsc)
                    self.edx_eax_result(i.dst)
                case "cpuid":
                    self.cpuid(i)
                case "swtch":
                    self.call_args(i.args, ARG_REGS, "swtch")
                    a.call(SWTCH)
                    self.calls_swtch = True
                case "syscall":
                    self.system_call(i)
                case "set_kernel_stack":
                    self.set_kernel_stack(i)
                case "load_tr":
                    R = self.reg(i.args[0], R11)
                    self.sensitive(i, lambda: a.ltr(R))
                case "enter_user":
                    self.move(RSP, self.where(i.args[0]))     # the frame's registers come from memory
                    start, end, _, _ = resume_frame(a, None)
                    self.sites.append((start, end, i.op, i.loc, "", abi.SITE_NATIVE))
                case _:
                    raise self.fail(f"no code for machine operation {op}")

    def system_call(self, i: ir.MachineOp) -> None:
        """rax = nr, rdi, rsi, rdx = a, b, c; the result in rax (rcx, r11 clobbered)."""
        self.move(RAX, self.where(i.args[0]))
        self.call_args(i.args[1:], (RDI, RSI, RDX), "syscall")
        self.a.syscall()
        self.result(i.dst, RAX)

    def set_kernel_stack(self, i: ir.MachineOp) -> None:
        """TSS.rsp0 = top (entries from CPL 3 through the IDT) and the syscall entry's stack."""
        T = self.reg(i.args[0], R11)
        V = self.reg(i.args[1], RAX)

        def emit():
            self.a.mov(Mem(T, TSS_RSP0), V)
            self.a.mov(Mem(symbol=KERNEL_STACK), V)
        self.sensitive(i, emit)

    def sensitive(self, i: ir.MachineOp, emit) -> None:
        """Emit the sensitive instruction(s) and record their site row."""
        start = self.a.anchor()
        emit()
        self.site(start, i.op, i.loc)

    def save_flags(self, i: ir.MachineOp) -> None:
        R = self.target(i.dst) if i.dst is not None else R11

        def emit():
            self.a.pushfq()
            self.a.pop(R)
        self.sensitive(i, emit)
        self.result(i.dst, R)

    def restore_flags(self, i: ir.MachineOp) -> None:
        R = self.reg(i.args[0], R11)

        def emit():
            self.a.push(R)
            self.a.popfq()
        self.sensitive(i, emit)

    def port_out(self, i: ir.MachineOp, size: int) -> None:
        self.move(RAX, self.where(i.args[1]))     # value first: the port load clobbers rdx
        self.move(RDX, self.where(i.args[0]))
        self.sensitive(i, lambda: self.a.out(size))

    def port_in(self, i: ir.MachineOp, size: int) -> None:
        self.move(RDX, self.where(i.args[0]))
        self.sensitive(i, lambda: self.a.in_(size))
        if size < 4:
            self.a.movzx(RAX, RAX, size)
        self.result(i.dst, RAX)

    def read_cr(self, i: ir.MachineOp, n: int) -> None:
        R = self.target(i.dst) if i.dst is not None else R11
        self.sensitive(i, lambda: self.a.mov_from_cr(R, n))
        self.result(i.dst, R)

    def write_cr(self, i: ir.MachineOp, n: int) -> None:
        R = self.reg(i.args[0], R11)
        self.sensitive(i, lambda: self.a.mov_to_cr(n, R))

    def memory_op(self, i: ir.MachineOp, emit) -> None:
        R = self.reg(i.args[0], R11)
        self.sensitive(i, lambda: emit(self.a, Mem(R)))

    def set_pte(self, i: ir.MachineOp) -> None:
        P = self.reg(i.args[0], R11)
        V = self.reg(i.args[1], RAX)      # always `mov [r], r`, the form trap-and-emulate decodes
        self.sensitive(i, lambda: self.a.mov(Mem(P), V))

    def rdmsr(self, i: ir.MachineOp) -> None:
        self.move(RCX, self.where(i.args[0]))
        self.sensitive(i, self.a.rdmsr)
        self.edx_eax_result(i.dst)

    def edx_eax_result(self, dst: ir.VReg | None) -> None:
        self.a.shl(RDX, 32)              # the CPU cleared both high halves
        self.a.or_(RAX, RDX)
        self.result(dst, RAX)

    def wrmsr(self, i: ir.MachineOp) -> None:
        self.move(RAX, self.where(i.args[1]))     # value first: msr may sit in rdx
        self.move(RCX, self.where(i.args[0]))
        self.a.mov(RDX, RAX)
        self.a.shr(RDX, 32)
        self.sensitive(i, self.a.wrmsr)

    def cpuid(self, i: ir.MachineOp) -> None:
        self.move(R11, self.where(i.args[1]))     # out pointer survives in r11
        self.move(RAX, self.where(i.args[0]))
        self.a.xor(RCX, RCX, size=4)
        self.sensitive(i, self.a.cpuid)
        for k, r in enumerate((RAX, RBX, RCX, RDX)):
            self.a.mov(Mem(R11, 4 * k), r, size=4)


# How each selected instruction is emitted.
EMITTERS = {
    ir.Copy: FunctionGen.copy, ir.BinOp: FunctionGen.binop, ir.UnOp: FunctionGen.unop,
    ir.Ext: FunctionGen.ext, ir.Cmp: FunctionGen.cmp, MLoad: FunctionGen.load, MStore: FunctionGen.store,
    ir.AddrOf: FunctionGen.addr_of, ir.SlotAddr: FunctionGen.slot_addr, ir.Call: FunctionGen.call,
    ir.CallIndirect: FunctionGen.call_indirect, ir.Hypercall: FunctionGen.hypercall,
    ir.SiteBegin: FunctionGen.site_begin, ir.SiteEnd: FunctionGen.site_end,
    ir.MachineOp: FunctionGen.machine_op, ir.CodeAddr: FunctionGen.code_addr, ir.ResumeFrame: FunctionGen.resume,
}

# Operators by encoder method.
ALU_OPS = {"add": Asm.add, "sub": Asm.sub, "and": Asm.and_, "or": Asm.or_, "xor": Asm.xor}
SHIFT_OPS = {"shl": Asm.shl, "shr": Asm.shr, "sar": Asm.sar}
UNARY_OPS = {"neg": Asm.neg, "not": Asm.not_}

# Machine operations by shape: one sensitive instruction without operands,
# port I/O of a size, control-register moves, an instruction on [reg].
PLAIN_OPS = {"cli": Asm.cli, "sti": Asm.sti, "hlt": Asm.hlt, "wbinvd": Asm.wbinvd}
PORT_OUT = {"outb": 1, "outw": 2, "outl": 4}
PORT_IN = {"inb": 1, "inw": 2, "inl": 4}
READ_CR = {"read_cr0": 0, "read_cr2": 2, "read_cr3": 3, "read_cr4": 4}
WRITE_CR = {"write_cr0": 0, "write_cr3": 3, "write_cr4": 4}
MEMORY_OPS = {"invlpg": Asm.invlpg, "lgdt": Asm.lgdt, "lidt": Asm.lidt, "sgdt": Asm.sgdt, "sidt": Asm.sidt}
