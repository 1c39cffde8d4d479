"""Run back-end output on a bare Unicorn x86-64 CPU, without the real linker.

`Machine` places FunctionCode and ir.Data objects at fixed addresses,
resolves their relocations itself (a mini-linker), provides a fake
hypercall page whose stubs record their arguments, and calls functions
with System V arguments.  Every call checks what the ABI promises: the
callee-saved registers survive, rsp comes back, and every function is
entered with rsp = 8 (mod 16).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn import x86_const as X

from pvimage import abi
from pvtool import ir, obj

LOW = 0x1000              # start-info and shared page (PV code reads them), then the GDT
GDT = abi.BOOT_GDT
CODE = 0x100000
HYPERCALL_PAGE = 0x200000
RETURN = 0x201000          # return address of every call: stops the run
STACK_TOP = 0x400000
RAM = 0x400000             # free memory for tests
RAM_SIZE = 0x100000
DATA = 0x800000            # up to 8 MiB of globals
DATA_SIZE = 0x800000
KERNEL_CS, KERNEL_DS = 0x08, 0x10

REG = {name: getattr(X, "UC_X86_REG_" + name.upper()) for name in (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "eflags")}
GPRS = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
CALLEE_SAVED = ("rbx", "rbp", "r12", "r13", "r14", "r15")
ARGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


class HarnessError(Exception):
    pass


@dataclass
class HypercallRecord:
    nr: int
    args: tuple[int, ...]     # rdi, rsi, rdx, r10, r8


@dataclass
class Machine:
    functions: list[obj.FunctionCode]
    data: list[ir.Data] = field(default_factory=list)
    symbols: dict[str, int] = field(default_factory=dict)
    hypercalls: list[HypercallRecord] = field(default_factory=list)
    outs: list[tuple[int, int, int | None]] = field(default_factory=list)  # (port, size, value); in: None
    misaligned: list[str] = field(default_factory=list)               # functions entered with bad rsp
    console: bytes = b""                                              # for on_hypercall handlers
    in_value: int = 0x5a
    hypercall_result: int = 0
    kernel_ram: bool = False     # also map 16-64 MiB, the RAM kernels may use freely
    on_hypercall: Callable[[Machine, int, tuple[int, ...]], int] | None = None   # -> rax

    def __post_init__(self) -> None:
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        for base, size in ((LOW, 0x7000), (CODE, 0x100000), (DATA, DATA_SIZE),
                           (HYPERCALL_PAGE, 0x2000), (STACK_TOP - 0x100000, 0x100000), (RAM, RAM_SIZE)):
            uc.mem_map(base, size)
        if self.kernel_ram:
            uc.mem_map(abi.FREE_RAM_START, abi.FREE_RAM_END - abi.FREE_RAM_START)
        gdt = struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
        uc.mem_write(GDT, gdt)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, len(gdt) - 1, 0))
        uc.mem_write(HYPERCALL_PAGE, b"\xc3" * 0x1000)     # every stub: ret
        uc.mem_write(RETURN, b"\xf4")
        self.symbols.setdefault("__hypercall_page", HYPERCALL_PAGE)
        self._place()
        self._link()
        uc.hook_add(UC_HOOK_CODE, self._on_hypercall, None, HYPERCALL_PAGE, HYPERCALL_PAGE + 0xFFF)
        for f in self.functions:
            uc.hook_add(UC_HOOK_CODE, self._on_entry, f.name, self.symbols[f.name], self.symbols[f.name])
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)

    # -- mini-linker ----------------------------------------------------------

    def _place(self) -> None:
        at = CODE
        for f in self.functions:
            at = (at + f.align - 1) // f.align * f.align
            self.symbols[f.name] = at
            at += len(f.code)
        if at > CODE + 0x100000:
            raise HarnessError("code does not fit in 1 MiB")
        at = DATA
        for d in self.data:
            at = (at + d.align - 1) // d.align * d.align
            self.symbols[d.name] = at
            at += d.size
        if at > DATA + DATA_SIZE:
            raise HarnessError("data does not fit in 8 MiB")

    def _link(self) -> None:
        for f in self.functions:
            code = bytearray(f.code)
            base = self.symbols[f.name]
            for r in f.relocs:
                self._patch(code, r.offset, r.kind, r.symbol, r.addend, base + r.offset)
            self.uc.mem_write(base, bytes(code))
        for d in self.data:
            init = bytearray(d.init or bytes(d.size))
            for r in d.relocs:
                self._patch(init, r.offset, obj.ABS64, r.symbol, r.addend, 0)
            self.uc.mem_write(self.symbols[d.name], bytes(init))

    def _patch(self, buf: bytearray, off: int, kind: str, symbol: str, addend: int, place: int) -> None:
        if symbol not in self.symbols:
            raise HarnessError(f"undefined symbol {symbol}")
        s = self.symbols[symbol] + addend
        if kind == obj.PC32:
            struct.pack_into("<i", buf, off, s - place)
        elif kind == obj.ABS32:
            struct.pack_into("<I", buf, off, s)
        elif kind == obj.ABS32S:
            struct.pack_into("<i", buf, off, s)
        elif kind == obj.ABS64:
            struct.pack_into("<Q", buf, off, s)
        else:
            raise HarnessError(f"unknown relocation {kind}")

    # -- hooks ------------------------------------------------------------------

    def _on_entry(self, uc, address, size, name) -> None:
        if uc.reg_read(X.UC_X86_REG_RSP) % 16 != 8:
            self.misaligned.append(name)

    def _on_hypercall(self, uc, address, size, _) -> None:
        off = address - HYPERCALL_PAGE
        if off % abi.HYPERCALL_STRIDE:
            raise HarnessError(f"jump into the middle of a hypercall stub at {address:#x}")
        if uc.reg_read(X.UC_X86_REG_RSP) % 16 != 8:
            self.misaligned.append(f"hypercall {off // abi.HYPERCALL_STRIDE}")
        args = tuple(self.reg(r) for r in ("rdi", "rsi", "rdx", "r10", "r8"))
        self.hypercalls.append(HypercallRecord(off // abi.HYPERCALL_STRIDE, args))
        nr = off // abi.HYPERCALL_STRIDE
        result = self.hypercall_result if self.on_hypercall is None else self.on_hypercall(self, nr, args)
        uc.reg_write(X.UC_X86_REG_RAX, result % (1 << 64))

    def _on_in(self, uc, port, size, _) -> int:
        self.outs.append((port, size, None))
        return self.in_value & ((1 << (8 * size)) - 1)

    def _on_out(self, uc, port, size, value, _) -> None:
        self.outs.append((port, size, value))

    # -- running ------------------------------------------------------------------

    def reg(self, name: str) -> int:
        return self.uc.reg_read(REG[name])

    def set_reg(self, name: str, value: int) -> None:
        self.uc.reg_write(REG[name], value % (1 << 64))

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.uc.mem_read(addr, n))

    def write(self, addr: int, data: bytes) -> None:
        self.uc.mem_write(addr, data)

    def read_u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def sentinels(self) -> dict[str, int]:
        """Recognisable values in every general register."""
        values = {r: 0x1111_0000_0000_0000 * (k + 1) % (1 << 64) + k for k, r in enumerate(GPRS)}
        for r, v in values.items():
            self.set_reg(r, v)
        return values

    def _run(self, start: int, limit: int) -> None:
        self.uc.emu_start(start, RETURN, count=limit)
        if self.reg("rip") != RETURN:
            raise HarnessError(f"did not return within {limit} instructions (rip={self.reg('rip'):#x})")

    def call(self, name: str, *args: int, limit: int = 2_000_000) -> int:
        """Call `name` with up to six integer arguments; return rax.  Raises
        HarnessError if a callee-saved register or rsp is not preserved."""
        if len(args) > 6:
            raise HarnessError("at most six arguments")
        before = self.sentinels()
        for r, v in zip(ARGS, args):
            self.set_reg(r, v)
        sp = STACK_TOP - 64
        self.write(sp - 8, struct.pack("<Q", RETURN))
        self.set_reg("rsp", sp - 8)
        self._run(self.symbols[name], limit)
        if self.reg("rsp") != sp:
            raise HarnessError(f"{name}: rsp {self.reg('rsp'):#x} after return, want {sp:#x}")
        for r in CALLEE_SAVED:
            if self.reg(r) != before[r]:
                raise HarnessError(f"{name}: callee-saved {r} not preserved")
        return self.reg("rax")

    def interrupt(self, name: str, limit: int = 2_000_000) -> dict[str, int]:
        """Enter interrupt handler `name` through a CPU-style frame and let it
        iretq back.  Returns the sentinel values the registers held before."""
        before = self.sentinels()
        self.set_reg("eflags", 0x2)
        sp = STACK_TOP - 64                      # 16-byte aligned, as the CPU aligns it
        frame = struct.pack("<QQQQQ", RETURN, KERNEL_CS, 0x202, sp, KERNEL_DS)
        self.write(sp - len(frame), frame)
        self.set_reg("rsp", sp - len(frame))
        self._run(self.symbols[name], limit)
        if self.reg("rsp") != sp:
            raise HarnessError(f"{name}: rsp {self.reg('rsp'):#x} after iretq, want {sp:#x}")
        if not self.reg("eflags") & 0x200:
            raise HarnessError(f"{name}: iretq did not restore rflags")
        return before
