"""Boot code: its instructions (capstone), its sites, and actually booting it.

Three ways in: QEMU's PVH entry (`_start32`, native), and `_start` entered
directly in 64-bit mode as the runtime does it (Unicorn here, native and
pv)."""
from __future__ import annotations

import io
import struct

import capstone
import pytest
import unicorn
from elftools.elf.elffile import ELFFile
from unicorn import x86_const as ux

from pvimage import abi
from pvtool import boot, elfwrite as elf
from pvtool.link import link
from pvtool.obj import PC32, FunctionCode, ObjectCode, Reloc

from qemu import boot as qemu_boot, requires_qemu


def disasm(fn: FunctionCode, mode: int) -> list[tuple[int, int, str, str]]:
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    insns = [(i.address, i.size, i.mnemonic, i.op_str) for i in md.disasm(fn.code, 0)]
    assert sum(i[1] for i in insns) == len(fn.code), f"{fn.name}: undecodable bytes"
    return insns


def routines(target: str, bundled: bool = False) -> dict[str, FunctionCode]:
    return {f.name: f for f in boot.boot_code(target, bundled).functions}


def without_padding(insns):
    return [i for i in insns if i[2] != "nop"]


def test_start32_is_the_pvh_long_mode_switch():
    insns = disasm(routines("native")["_start32"], capstone.CS_MODE_32)
    assert [m for _, _, m, _ in insns] == [
        "cli", "cld", "mov", "mov", "xor", "rep stosd", "mov", "mov",        # zero, link tables
        "mov", "mov", "mov", "mov", "add", "add", "loop",                    # 512 2-MiB entries
        "lgdt", "mov", "mov", "mov", "mov", "mov", "mov", "xor", "wrmsr",     # GDT, PAE, CR3, LME
        "mov", "mov", "ljmp"]
    ops = [o for _, _, _, o in insns]
    assert "cr4, eax" in ops and "cr3, eax" in ops and "cr0, eax" in ops
    assert insns[-1][3] == f"{abi.KERNEL_CS}:0"                               # selector:offset (unlinked)
    loop = insns[14]
    assert loop[3] == hex(insns[11][0])                                      # loops back to the fill


def test_start64_loads_segments_and_jumps_to_start():
    insns = disasm(routines("native")["_start64"], capstone.CS_MODE_64)
    assert [(m, o) for _, _, m, o in insns[:6]] == [
        ("mov", f"eax, {abi.KERNEL_DS:#x}"), ("mov", "ds, eax"), ("mov", "es, eax"),
        ("mov", "ss, eax"), ("mov", "fs, eax"), ("mov", "gs, eax")]
    assert insns[6][2] == "jmp"
    reloc = routines("native")["_start64"].relocs[-1]
    assert (reloc.kind, reloc.symbol, reloc.addend) == (PC32, "_start", -4)


@pytest.mark.parametrize("bundled", [False, True])
@pytest.mark.parametrize("target", ["native", "pv"])
def test_start_sets_stack_zeroes_bss_calls_kmain(target, bundled):
    fn = routines(target, bundled)["_start"]
    all_insns = disasm(fn, capstone.CS_MODE_64)
    insns = without_padding(all_insns)
    calls = [(a, n) for a, n, m, _ in all_insns if m == "call"]
    assert len(calls) == (1 if target == "native" else 2)
    if bundled:      # the code rules: whole bundles, calls end on a bundle end
        assert fn.align == 32 and all(a // 32 == (a + n - 1) // 32 for a, n, _, _ in all_insns)
        assert all((a + n) % 32 == 0 for a, n in calls)
    else:
        assert insns == all_insns
    body = [(m, o.split(",")[0]) for _, _, m, o in insns]
    first = 1 if target == "native" else 0
    assert body[first:first + 8] == [("cld", ""), ("lea", "rsp"), ("lea", "rdi"), ("lea", "rcx"),
                                     ("sub", "rcx"), ("xor", "eax"), ("rep stosb", "byte ptr [rdi]"),
                                     ("call", insns[first + 7][3])]
    targets = {(r.symbol, r.addend + 4) for r in fn.relocs if r.kind == PC32}
    assert ("__boot_stack", boot.STACK_SIZE) in targets and ("kmain", 0) in targets
    assert {("__bss_start", 0), ("__bss_end", 0)} <= targets
    tail = [m for _, _, m, _ in insns[first + 8:]]
    if target == "native":
        assert insns[0][2] == "cli"
        assert tail == ["mov", "out", "cli", "hlt", "jmp"] and insns[first + 8][3] == "dx, 0xf4"
        assert insns[-1][3] == hex(insns[-3][0])                    # jmp back to cli; hlt
        sites = {s.offset: s.op for s in fn.sites}
        assert sites == {insns[0][0]: "cli", insns[-4][0]: "outb", insns[-3][0]: "cli", insns[-2][0]: "hlt"}
    else:
        assert tail == ["mov", "call", "jmp"] and insns[first + 8][3] == "edi, eax"
        call = next(r for r in fn.relocs if r.symbol == "__hypercall_page")
        assert call.addend + 4 == abi.HC_SHUTDOWN * abi.HYPERCALL_STRIDE
        assert insns[-1][3] == hex(insns[-3][0])                    # loops on the shutdown


SENSITIVE = {"cli", "sti", "hlt", "out", "in", "lgdt", "lidt", "sgdt", "sidt", "wrmsr", "rdmsr",
             "invlpg", "cpuid", "rdtsc", "wbinvd", "pushfq", "popfq", "iretq", "ljmp"}
SITE_MNEMONIC = {"cli": "cli", "hlt": "hlt", "outb": "out", "lgdt": "lgdt", "wrmsr": "wrmsr",
                 "write_cr0": "mov", "write_cr3": "mov", "write_cr4": "mov"}


def is_sensitive(mnemonic: str, ops: str) -> bool:
    return mnemonic in SENSITIVE - {"ljmp"} or (mnemonic == "mov" and "cr" in ops)


def test_native_boot_sites_match_the_instructions():
    seen = set()
    for name, fn in routines("native").items():
        mode = capstone.CS_MODE_32 if name == "_start32" else capstone.CS_MODE_64
        insns = {a: (n, m, o) for a, n, m, o in disasm(fn, mode)}
        sites = {s.offset: s for s in fn.sites}
        for addr, (size, m, o) in insns.items():
            assert is_sensitive(m, o) == (addr in sites), f"{name}+{addr:#x}: {m} {o}"
        for s in fn.sites:
            size, m, o = insns[s.offset]
            assert s.length == size and s.loc is None and s.becomes == ""
            assert SITE_MNEMONIC[s.op] == m
            if s.op.startswith("write_cr"):
                assert o.startswith(f"cr{s.op[-1]},")
            seen.add(s.op)
    assert seen == set(SITE_MNEMONIC)


def test_pv_boot_code_has_nothing_sensitive():
    bc = boot.boot_code("pv")
    assert [f.name for f in bc.functions] == ["_start"] and bc.rodata == []
    for fn in bc.functions:
        assert fn.sites == []
        for _, _, m, o in disasm(fn, capstone.CS_MODE_64):
            assert not is_sensitive(m, o), f"{m} {o}"


def test_boot_data():
    bc = boot.boot_code("native")
    rodata = {d.name: d for d in bc.rodata}
    gdt = struct.unpack("<3Q", rodata["__boot_gdt"].init)
    assert gdt[0] == 0
    assert gdt[1] >> 40 & 0xFF == 0x9B and gdt[1] >> 53 & 1 == 1          # present code, L=1
    assert gdt[2] >> 40 & 0xFF == 0x93                                     # present data, writable
    gdtr = rodata["__boot_gdtr"]
    assert struct.unpack_from("<H", gdtr.init)[0] == abi.BOOT_GDT_LIMIT
    assert [(r.offset, r.symbol) for r in gdtr.relocs] == [(2, "__boot_gdt")]
    scratch = {d.name: d for d in bc.scratch}
    assert scratch["__boot_stack"].size == 64 * 1024
    assert all(d.section == "bss" and d.align == 4096 for d in bc.scratch)


# -- running _start as the runtime enters it (64-bit, paging on, its own stack) -----------------

def kernel(target: str, code: str, relocs: list[Reloc] = (), data=(), bundled: bool = False) -> bytes:
    fn = FunctionCode("kmain", bytes.fromhex(code), list(relocs), align=32 if bundled else 16)
    return elf.write(link(ObjectCode([fn], list(data), [], target=target, bundled=bundled)))


class Machine:
    """Loads the PT_LOAD segments into Unicorn (garbage in memory first) and runs from e_entry."""

    def __init__(self, blob: bytes) -> None:
        self.elf = ELFFile(io.BytesIO(blob))
        self.syms = {s.name: s["st_value"] for s in self.elf.get_section_by_name(".symtab").iter_symbols()}
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc.mem_map(0, 4 << 20)
        self.uc.mem_write(0, b"\xaa" * (4 << 20))        # .bss must not rely on zeroed RAM
        for seg in self.elf.iter_segments():
            if seg["p_type"] == "PT_LOAD":
                self.uc.mem_write(seg["p_vaddr"], seg.data())
        self.exit: tuple[str, int] | None = None
        self.rsp_at_kmain = None
        self.uc.hook_add(unicorn.UC_HOOK_INSN, self.on_out, None, 1, 0, ux.UC_X86_INS_OUT)
        self.uc.hook_add(unicorn.UC_HOOK_INSN, self.on_syscall, None, 1, 0, ux.UC_X86_INS_SYSCALL)
        k = self.syms["kmain"]
        self.uc.hook_add(unicorn.UC_HOOK_CODE, self.on_kmain, None, k, k)

    def on_out(self, uc, port, size, value, _):
        if port == 0xF4:
            self.exit = ("outb", value & 0xFF)
            uc.emu_stop()

    def on_syscall(self, uc, _):
        self.exit = (abi.HYPERCALL_NAMES[uc.reg_read(ux.UC_X86_REG_RAX)], uc.reg_read(ux.UC_X86_REG_RDI))
        uc.emu_stop()

    def on_kmain(self, uc, address, size, _):
        self.rsp_at_kmain = uc.reg_read(ux.UC_X86_REG_RSP)

    def run(self) -> tuple[str, int]:
        self.uc.reg_write(ux.UC_X86_REG_RSP, abi.BOOT_STACK_TOP)
        self.uc.reg_write(ux.UC_X86_REG_RSI, abi.START_INFO)
        self.uc.emu_start(self.elf["e_entry"], 0, count=100_000)
        return self.exit


def read_ticks_code(bundled: bool) -> tuple[str, list[Reloc]]:
    """mov eax, [rip+ticks]; add eax, 7; then ret, or the masked return of bundled code."""
    ret = "41 5b 49 83 e3 e0 41 ff e3" if bundled else "c3"    # pop r11; and r11, -32; jmp r11
    return "8b 05 00000000 83 c0 07" + ret, [Reloc(2, PC32, "ticks", -4)]


@pytest.mark.parametrize("bundled", [False, True])
@pytest.mark.parametrize("target", ["native", "pv"])
def test_start_entered_directly_zeroes_bss_and_exits_with_kmain_result(target, bundled):
    from pvtool.ir import Data
    code, relocs = read_ticks_code(bundled)
    m = Machine(kernel(target, code, relocs, [Data("ticks", "bss", 8, 8)], bundled))
    if target == "pv":
        page = m.syms["__hypercall_page"]
        for nr in range(abi.HC_COUNT):              # what the runtime does at load time
            m.uc.mem_write(page + nr * abi.HYPERCALL_STRIDE, abi.hypercall_stub(nr))
    status = m.run()
    assert status == (("shutdown", 7) if target == "pv" else ("outb", 7))
    top = m.syms["__boot_stack"] + boot.STACK_SIZE
    assert m.rsp_at_kmain == top - 8 and top % 16 == 0          # 16-byte aligned at the call
    assert m.uc.mem_read(m.syms["__boot_stack"], 8) == b"\xaa" * 8    # scratch is left alone


# -- QEMU, through the PVH entry -------------------------------------------------------------

@requires_qemu
@pytest.mark.qemu
def test_qemu_exit_status():
    console, status = qemu_boot(kernel("native", "b8 2a000000 c3"))        # mov eax, 42; ret
    assert (console, status) == ("", 42)


@requires_qemu
@pytest.mark.qemu
def test_qemu_console():
    code = ("66 ba f8 03"            # mov dx, 0x3f8
            "b0 68 ee b0 69 ee"      # mov al, 'h'; out dx, al; mov al, 'i'; out dx, al
            "b0 0a ee"               # mov al, '\n'; out dx, al
            "31 c0 c3")              # xor eax, eax; ret
    assert qemu_boot(kernel("native", code)) == ("hi\n", 0)


@requires_qemu
@pytest.mark.qemu
def test_qemu_data_rodata_bss():
    """A pointer in .data (abs64 data reloc) to a string in .rodata, a counter in .bss."""
    from pvtool.ir import Data, DataReloc
    code = ("48 8b 35 00000000"      # mov rsi, [rip+ptr]
            "66 ba f8 03"            # mov dx, 0x3f8
            "8a 06 84 c0 74 06"      # loop: mov al, [rsi]; test al, al; jz done
            "ee 48 ff c6 eb f4"      # out dx, al; inc rsi; jmp loop
            "8b 05 00000000"         # done: mov eax, [rip+ticks]
            "83 c0 07 c3")           # add eax, 7; ret
    relocs = [Reloc(3, PC32, "ptr", -4), Reloc(25, PC32, "ticks", -4)]
    data = [Data("msg", "rodata", 8, 1, b"pvtool\n\0"),
            Data("ptr", "data", 8, 8, bytes(8), [DataReloc(0, "msg")]),
            Data("ticks", "bss", 8, 8)]
    assert qemu_boot(kernel("native", code, relocs, data)) == ("pvtool\n", 7)
