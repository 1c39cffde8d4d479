"""A reference interpreter for pvtool IR, for tests.

`run(module)` executes `kmain` on a small model machine and returns its
console output and result.  Each IR function is translated to a Python
function (one local per vreg, a dispatch on the block number), which keeps
the compute-bound conformance kernels fast enough to run in tests; the
translation is instruction-for-instruction, so the semantics are the IR's:
64-bit registers, wrapping arithmetic, division faults (#DE) on zero and on
i64 MIN / -1.

The machine: 64 MiB of RAM, real 4-level paging (the boot tables identity-map
the first GiB with 2 MiB pages, as the runtime's do) with a TLB that only
`write_cr3` and `invlpg` flush, a UART at 0x3f8 whose line status (0x3fd)
always reads 0x20, the debug-exit port 0xf4, the interrupt flag for
cli/sti/save_flags/restore_flags, control registers, MSRs, GDTR/IDTR, a
CPUID that reports "GenuineIntel" and a TSC that ticks on every read.
Interrupts are never delivered; `swtch` and hypercalls are not modelled.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from pvimage import abi
from pvtool import ir

M64 = (1 << 64) - 1
SIGN = 1 << 63
RAM = 64 << 20
TEXT_BASE = abi.LOAD_BASE
STACK_TOP = abi.BOOT_STACK_TOP
STACK_LIMIT = STACK_TOP - abi.BOOT_STACK_SIZE
CODE_ADDRESSES = 0xC0DE_0000     # what `CodeAddr` yields: the interpreter has no machine code
BOOT_GDT = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF]


class Fault(Exception):
    """A CPU exception or a machine check: the program went wrong."""


class _Exit(Exception):
    def __init__(self, status: int):
        self.status = status


@dataclass
class Result:
    console: str
    value: int | None          # kmain's return value (None if it wrote port 0xf4 itself)
    exit_status: int           # the byte the startup code writes to port 0xf4
    machine: Machine = field(repr=False)


def run(module: ir.Module, entry: str = "kmain") -> Result:
    m = Machine(module)
    try:
        value = m.call(entry)
    except _Exit as e:
        return Result(m.console.decode("latin-1"), None, e.status, m)
    except RecursionError:
        raise Fault("call depth too large for the interpreter") from None
    return Result(m.console.decode("latin-1"), value, value & 0xFF, m)


def _s64(x: int) -> int:
    return (x ^ SIGN) - SIGN


def _udiv(a: int, b: int) -> int:
    if b == 0:
        raise Fault("#DE: division by zero")
    return a // b


def _urem(a: int, b: int) -> int:
    if b == 0:
        raise Fault("#DE: division by zero")
    return a % b


def _sdiv_parts(a: int, b: int) -> tuple[int, int]:
    a, b = _s64(a), _s64(b)
    if b == 0:
        raise Fault("#DE: division by zero")
    q = abs(a) // abs(b)
    if (a < 0) != (b < 0):
        q = -q
    if q == SIGN:
        raise Fault("#DE: quotient overflow")
    return q & M64, (a - q * b) & M64


def _sdiv(a: int, b: int) -> int:
    return _sdiv_parts(a, b)[0]


def _srem(a: int, b: int) -> int:
    return _sdiv_parts(a, b)[1]


_BINOPS = {
    "add": "({a} + {b}) & M64", "sub": "({a} - {b}) & M64", "mul": "({a} * {b}) & M64",
    "and": "{a} & {b}", "or": "{a} | {b}", "xor": "{a} ^ {b}",
    "shl": "({a} << ({b} & 63)) & M64", "shr": "{a} >> ({b} & 63)",
    "sar": "(_s64({a}) >> ({b} & 63)) & M64",
    "udiv": "_udiv({a}, {b})", "urem": "_urem({a}, {b})",
    "sdiv": "_sdiv({a}, {b})", "srem": "_srem({a}, {b})",
}
_CMPS = {"eq": "==", "ne": "!=", "ult": "<", "ule": "<=", "ugt": ">", "uge": ">=",
         "slt": "<", "sle": "<=", "sgt": ">", "sge": ">="}
_PACK = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


def _python_name(symbol: str) -> str:
    """The Python function for an IR function: symbols may hold '.', ':' and '#' (h.body, con::f)."""
    return "f_" + re.sub(r"\W", lambda m: f"_{ord(m.group()):x}_", symbol)


class Machine:
    def __init__(self, module: ir.Module):
        self.module = module
        self.mem = bytearray(RAM)
        self.console = bytearray()
        self.ports: dict[int, int] = {}
        self.flags_if = 0
        self.cr = {0: 0x80000011, 2: 0, 3: abi.BOOT_PML4, 4: 0x20}
        self.msrs: dict[int, int] = {}
        self.gdtr = (len(BOOT_GDT) * 8 - 1, abi.BOOT_GDT)
        self.idtr = (0, 0)
        self.tsc = 0
        self.kernel_stack = 0
        self.tr = 0
        self.tlb: dict[int, int] = {}
        self.sp = [STACK_TOP]
        self.symbols: dict[str, int] = {}
        self.by_address: dict[int, object] = {}
        self.boot_tables()
        self.layout()
        self.namespace = self.translate_all()

    # -- memory ---------------------------------------------------------------------------

    def boot_tables(self) -> None:
        self.phys_store(abi.BOOT_PML4, 8, abi.BOOT_PDPT | 3)
        self.phys_store(abi.BOOT_PDPT, 8, abi.BOOT_PD | 3)
        for i in range(512):
            self.phys_store(abi.BOOT_PD + 8 * i, 8, (i << 21) | 0x83)
        for i, d in enumerate(BOOT_GDT):
            self.phys_store(abi.BOOT_GDT + 8 * i, 8, d)

    def layout(self) -> None:
        """Functions first (16 bytes apart, like a text section), then data."""
        at = TEXT_BASE
        for f in self.module.functions:
            self.symbols[f.name] = at
            self.by_address[at] = f.name
            at += 16
        for d in self.module.data:
            at = (at + d.align - 1) // d.align * d.align
            self.symbols[d.name] = at
            at += max(d.size, 1)
        if at > abi.FREE_RAM_START:
            raise Fault("image does not fit below 16 MiB")
        for d in self.module.data:
            base = self.symbols[d.name]
            self.mem[base:base + len(d.init)] = d.init
            for r in d.relocs:
                self.phys_store(base + r.offset, 8, (self.symbols[r.symbol] + r.addend) & M64)

    def phys_check(self, pa: int, size: int) -> None:
        if pa + size > RAM:
            raise Fault(f"machine check: physical address {pa:#x} beyond RAM")

    def phys_store(self, pa: int, size: int, value: int) -> None:
        self.phys_check(pa, size)
        _PACK[size].pack_into(self.mem, pa, value & ((1 << (8 * size)) - 1))

    def phys_load(self, pa: int, size: int) -> int:
        self.phys_check(pa, size)
        return _PACK[size].unpack_from(self.mem, pa)[0]

    def walk(self, va: int) -> int:
        """The physical frame of a virtual page, from the page tables at CR3."""
        if va >> 47 not in (0, 0x1FFFF):
            raise Fault(f"#GP: non-canonical address {va:#x}")
        table = self.cr[3] & ~0xFFF & M64
        for level, shift in enumerate((39, 30, 21, 12)):
            entry = self.phys_load(table + ((va >> shift) & 511) * 8, 8)
            if not entry & 1:
                self.cr[2] = va
                raise Fault(f"#PF: {va:#x} not mapped")
            frame = entry & 0x000FFFFFFFFFF000
            if level in (1, 2) and entry & 0x80:
                size = 1 << shift
                return (frame & ~(size - 1)) | (va & (size - 1) & ~0xFFF)
            table = frame
        return table

    def frame(self, va: int) -> int:
        page = va >> 12
        pa = self.tlb.get(page)
        if pa is None:
            pa = self.walk(va)
            self.phys_check(pa, 0x1000)
            self.tlb[page] = pa
        return pa

    def fast_access(self):
        """load/store for the translated code: the common case (a TLB hit
        inside one page) without method calls."""
        tlb, mem, load, store = self.tlb, self.mem, self.load, self.store
        unpack = {n: p.unpack_from for n, p in _PACK.items()}
        pack = {n: p.pack_into for n, p in _PACK.items()}
        masks = {n: (1 << (8 * n)) - 1 for n in _PACK}

        def ld(va, size, signed):
            off = va & 0xFFF
            pa = tlb.get(va >> 12)
            if pa is None or off + size > 0x1000:
                return load(va, size, signed)
            v = mem[pa | off] if size == 1 else unpack[size](mem, pa | off)[0]
            if signed and v >> (8 * size - 1):
                v = (v - (1 << (8 * size))) & M64
            return v

        def st(va, size, value):
            off = va & 0xFFF
            pa = tlb.get(va >> 12)
            if pa is None or off + size > 0x1000:
                return store(va, size, value)
            if size == 1:
                mem[pa | off] = value & 0xFF
            else:
                pack[size](mem, pa | off, value & masks[size])

        return ld, st

    def load(self, va: int, size: int, signed: bool) -> int:
        off = va & 0xFFF
        if off + size <= 0x1000:
            value = self.phys_load(self.frame(va) | off, size)
        else:
            value = int.from_bytes(bytes(self.phys_load(self.frame(va + i) | ((va + i) & 0xFFF), 1)
                                         for i in range(size)), "little")
        if signed and value >> (8 * size - 1):
            value = (value - (1 << (8 * size))) & M64
        return value

    def store(self, va: int, size: int, value: int) -> None:
        off = va & 0xFFF
        if off + size <= 0x1000:
            self.phys_store(self.frame(va) | off, size, value)
            return
        for i, byte in enumerate((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")):
            self.phys_store(self.frame(va + i) | ((va + i) & 0xFFF), 1, byte)

    def read_global(self, name: str, size: int, count: int = 1) -> list[int]:
        """`count` consecutive unsigned `size`-byte values at a global."""
        base = self.symbols[name]
        return [self.load(base + i * size, size, False) for i in range(count)]

    # -- execution ------------------------------------------------------------------------------

    def call(self, name: str, *args: int) -> int | None:
        return self.namespace[_python_name(name)](*args)

    def call_address(self, target: int, *args: int) -> int | None:
        name = self.by_address.get(target)
        if name is None:
            raise Fault(f"#PF: indirect call to {target:#x}, which is not a function")
        return self.call(name, *args)

    def translate_all(self) -> dict:
        ld, st = self.fast_access()
        ns = {"M64": M64, "_s64": _s64, "_udiv": _udiv, "_urem": _urem, "_sdiv": _sdiv,
              "_srem": _srem, "SP": self.sp, "m": self, "ld": ld, "st": st, "Fault": Fault,
              "ops": self.machine_ops()}
        for f in self.module.functions:
            exec(compile(_Translator(f, self.symbols).source(), f"<ir {f.name}>", "exec"), ns)
        return ns

    # -- machine operations ---------------------------------------------------------------------------

    def machine_ops(self) -> dict:
        """Each machine operation of the language by name: what translated code calls."""
        return {"outb": self.op_outb, "outw": self.op_outw, "outl": self.op_outl, "inb": self.op_inb,
                "inw": self.op_inw, "inl": self.op_inl, "cli": self.op_cli, "sti": self.op_sti,
                "hlt": self.op_hlt, "save_flags": self.op_save_flags,
                "restore_flags": self.op_restore_flags, "read_cr0": self.op_read_cr0,
                "read_cr2": self.op_read_cr2, "read_cr3": self.op_read_cr3,
                "read_cr4": self.op_read_cr4, "write_cr0": self.op_write_cr0,
                "write_cr3": self.op_write_cr3, "write_cr4": self.op_write_cr4,
                "invlpg": self.op_invlpg, "set_pte": self.op_set_pte, "lgdt": self.op_lgdt,
                "lidt": self.op_lidt, "sgdt": self.op_sgdt, "sidt": self.op_sidt,
                "rdmsr": self.op_rdmsr, "wrmsr": self.op_wrmsr, "cpuid": self.op_cpuid,
                "rdtsc": self.op_rdtsc, "wbinvd": self.op_wbinvd, "pause": self.op_pause,
                "swtch": self.op_swtch, "syscall": self.op_syscall,
                "set_kernel_stack": self.op_set_kernel_stack, "load_tr": self.op_load_tr,
                "enter_user": self.op_enter_user}

    def op_outb(self, port, v):
        self.out(port, v & 0xFF)

    def op_outw(self, port, v):
        self.out(port, v & 0xFFFF)

    def op_outl(self, port, v):
        self.out(port, v & 0xFFFFFFFF)

    def out(self, port: int, v: int) -> None:
        port &= 0xFFFF
        if port == 0x3F8:
            self.console.append(v & 0xFF)
        elif port == 0xF4:
            raise _Exit(v & 0xFF)
        self.ports[port] = v

    def op_inb(self, port):
        return 0x20 if port == 0x3FD else self.ports.get(port, 0xFF) & 0xFF

    def op_inw(self, port):
        return self.ports.get(port, 0xFFFF) & 0xFFFF

    def op_inl(self, port):
        return self.ports.get(port, 0xFFFFFFFF) & 0xFFFFFFFF

    def op_cli(self):
        self.flags_if = 0

    def op_sti(self):
        self.flags_if = 1

    def op_hlt(self):
        raise Fault("hlt: no interrupt will ever wake the CPU")

    def op_save_flags(self):
        return 0x2 | (self.flags_if << 9)

    def op_restore_flags(self, f):
        self.flags_if = (f >> 9) & 1

    def op_read_cr0(self):
        return self.cr[0]

    def op_read_cr2(self):
        return self.cr[2]

    def op_read_cr3(self):
        return self.cr[3]

    def op_read_cr4(self):
        return self.cr[4]

    def op_write_cr0(self, v):
        self.cr[0] = v

    def op_write_cr3(self, v):
        self.cr[3] = v
        self.tlb.clear()

    def op_write_cr4(self, v):
        self.cr[4] = v

    def op_invlpg(self, va):
        self.tlb.pop(va >> 12, None)

    def op_set_pte(self, p, v):
        self.store(p, 8, v)

    def read_table_reg(self, p: int) -> tuple[int, int]:
        return self.load(p, 2, False), self.load(p + 2, 8, False)

    def write_table_reg(self, p: int, reg: tuple[int, int]) -> None:
        self.store(p, 2, reg[0])
        self.store(p + 2, 8, reg[1])

    def op_lgdt(self, p):
        self.gdtr = self.read_table_reg(p)

    def op_lidt(self, p):
        self.idtr = self.read_table_reg(p)

    def op_sgdt(self, p):
        self.write_table_reg(p, self.gdtr)

    def op_sidt(self, p):
        self.write_table_reg(p, self.idtr)

    def op_rdmsr(self, msr):
        return self.msrs.get(msr, 0)

    def op_wrmsr(self, msr, v):
        self.msrs[msr] = v

    def op_cpuid(self, leaf, out):
        if leaf == 0:
            regs = (0xD, *struct.unpack("<3I", b"GenuineIntel"))
            regs = (regs[0], regs[1], regs[3], regs[2])      # eax, ebx, ecx, edx
        else:
            regs = (0, 0, 0, 0)
        for i, r in enumerate(regs):
            self.store(out + 4 * i, 4, r)

    def op_rdtsc(self):
        self.tsc += 1000
        return self.tsc

    def op_wbinvd(self):
        pass

    def op_pause(self):
        pass

    def op_swtch(self, old, new):
        raise Fault("swtch is not modelled by the IR interpreter")

    # User mode: the kernel stack and the task register are state; there is no CPL 3 here.
    def op_set_kernel_stack(self, tss, top):
        self.store((tss + 4) & M64, 8, top)
        self.kernel_stack = top

    def op_load_tr(self, selector):
        self.tr = selector

    def op_syscall(self, nr, a, b, c):
        raise Fault("syscall (user mode) is not modelled by the IR interpreter")

    def op_enter_user(self, frame):
        raise Fault("enter_user (user mode) is not modelled by the IR interpreter")


class _Translator:
    """Python source for one IR function."""

    def __init__(self, f: ir.Function, symbols: dict[str, int]):
        self.f = f
        self.symbols = symbols
        self.index = {b.label: i for i, b in enumerate(f.blocks)}
        self.slots: list[int] = []
        at = 0
        for s in f.slots:
            at = (at + s.align - 1) // s.align * s.align
            self.slots.append(at)
            at += s.size
        self.frame = (at + 15) // 16 * 16
        self.uses: dict[ir.VReg, int] = {}
        self.preds: dict[str, int] = {}
        self.code_addrs = 0
        for b in f.blocks:
            for i in [*b.instrs, b.term]:
                for u in i.uses():
                    if isinstance(u, ir.VReg):
                        self.uses[u] = self.uses.get(u, 0) + 1
            for succ in b.successors():
                self.preds[succ] = self.preds.get(succ, 0) + 1

    def op(self, x: ir.Operand) -> str:
        return f"v{x.id}" if isinstance(x, ir.VReg) else str(x & M64)

    def source(self) -> str:
        f = self.f
        params = ", ".join(self.op(p) for p in f.params)
        lines = [f"def {_python_name(f.name)}({params}):",
                 f"    sp = SP[0] - {self.frame}",
                 f"    if sp < {STACK_LIMIT}: raise Fault('stack overflow in {f.name}')",
                 "    SP[0] = sp"]
        others = [f"v{i}" for i in range(f.next_vreg) if ir.VReg(i) not in f.params]
        if others:
            lines.append(f"    {' = '.join(others)} = 0")
        lines += ["    b = 0", "    while True:"]
        self.dispatch(lines, 0, len(f.blocks), 2)
        return "\n".join(lines) + "\n"

    def dispatch(self, lines: list[str], lo: int, hi: int, depth: int) -> None:
        pad = "    " * depth
        if hi - lo == 1:
            self.block(lines, self.f.blocks[lo], pad, set())
            return
        mid = (lo + hi) // 2
        lines.append(f"{pad}if b < {mid}:")
        self.dispatch(lines, lo, mid, depth + 1)
        lines.append(f"{pad}else:")
        self.dispatch(lines, mid, hi, depth + 1)

    def block(self, lines: list[str], block: ir.Block, pad: str, chain: set[str]) -> None:
        """A block's code; a jump to a block with no other predecessor
        continues straight into that block's code (a superblock)."""
        chain.add(block.label)
        instrs, term = block.instrs, block.term
        fused = None
        if isinstance(term, ir.Branch) and instrs and isinstance(instrs[-1], ir.Cmp) \
                and instrs[-1].dst == term.cond and self.uses[term.cond] == 1:
            fused, instrs = instrs[-1], instrs[:-1]
        for i in instrs:
            lines.append(pad + self.instr(i))
        if fused is not None:
            cond = self.instr(fused).split(" = int", 1)[1]
            lines += [f"{pad}b = {self.index[term.then]} if {cond} else {self.index[term.else_]}",
                      f"{pad}continue"]
        elif isinstance(term, ir.Jump) and self.preds.get(term.target) == 1 \
                and term.target not in chain and term.target != self.f.blocks[0].label:
            self.block(lines, self.f.block(term.target), pad, chain)
        else:
            lines += [pad + s for s in self.term(term)]

    def address(self, base: ir.Operand, offset: int) -> str:
        if offset == 0:
            return self.op(base)
        return f"({self.op(base)} + {offset}) & M64"

    def instr(self, i: ir.Instr) -> str:
        o = self.op
        if isinstance(i, ir.Copy):
            return f"{o(i.dst)} = {o(i.src)}"
        if isinstance(i, ir.BinOp):
            return f"{o(i.dst)} = " + _BINOPS[i.op].format(a=o(i.a), b=o(i.b))
        if isinstance(i, ir.UnOp):
            return f"{o(i.dst)} = " + (f"(-{o(i.a)}) & M64" if i.op == "neg" else f"{o(i.a)} ^ M64")
        if isinstance(i, ir.Ext):
            mask, top = (1 << i.bits) - 1, 1 << (i.bits - 1)
            if i.signed:
                return f"{o(i.dst)} = ((({o(i.src)} & {mask}) ^ {top}) - {top}) & M64"
            return f"{o(i.dst)} = {o(i.src)} & {mask}"
        if isinstance(i, ir.Cmp):
            a, b = o(i.a), o(i.b)
            if i.op[0] == "s":
                a, b = f"_s64({a})", f"_s64({b})"
            return f"{o(i.dst)} = int({a} {_CMPS[i.op]} {b})"
        if isinstance(i, ir.Load):
            return f"{o(i.dst)} = ld({self.address(i.base, i.offset)}, {i.size}, {i.signed})"
        if isinstance(i, ir.Store):
            return f"st({self.address(i.base, i.offset)}, {i.size}, {o(i.value)})"
        if isinstance(i, ir.AddrOf):
            return f"{o(i.dst)} = {(self.symbols[i.symbol] + i.offset) & M64}"
        if isinstance(i, ir.SlotAddr):
            return f"{o(i.dst)} = sp + {self.slots[i.slot] + i.offset}"
        if isinstance(i, (ir.Call, ir.CallIndirect, ir.MachineOp)):
            args = [o(a) for a in i.args]
            if len(args) > 6 and not isinstance(i, ir.MachineOp):
                raise Fault("more than six call arguments")
            if isinstance(i, ir.Call):
                call = f"{_python_name(i.func)}({', '.join(args)})"
            elif isinstance(i, ir.CallIndirect):
                call = f"m.call_address({', '.join([o(i.target)] + args)})"
            else:
                call = f"ops[{i.op!r}]({', '.join(args)})"
            return call if i.dst is None else f"{o(i.dst)} = {call}"
        if isinstance(i, (ir.SiteBegin, ir.SiteEnd)):
            return "pass"
        if isinstance(i, ir.CodeAddr):
            # No code exists here: a distinct made-up address per instruction stands for it.
            self.code_addrs += 1
            return f"{o(i.dst)} = {CODE_ADDRESSES + (self.code_addrs << 4)}"
        raise Fault(f"the interpreter does not run {type(i).__name__}")

    def term(self, t: ir.Instr | None) -> list[str]:
        if isinstance(t, ir.Jump):
            return [f"b = {self.index[t.target]}", "continue"]
        if isinstance(t, ir.Branch):
            return [f"b = {self.index[t.then]} if {self.op(t.cond)} else {self.index[t.else_]}",
                    "continue"]
        if isinstance(t, ir.Ret):
            value = "None" if t.value is None else self.op(t.value)
            return [f"SP[0] = sp + {self.frame}", f"return {value}"]
        if isinstance(t, ir.IRet):
            return [f"SP[0] = sp + {self.frame}", "return None"]
        raise Fault(f"block without a terminator in {self.f.name}")
