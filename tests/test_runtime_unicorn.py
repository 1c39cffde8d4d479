"""What Unicorn 2.1.4 really does, measured: the facts runtime/ is built on.

Each test is one experiment on a bare Unicorn x86-64 CPU with paging on.
If an upgrade of Unicorn changes one of these, this file says which design
decision in runtime/ has to change with it.
"""
from __future__ import annotations

import struct

import pytest
from unicorn import (UC_ARCH_X86, UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_HOOK_CODE, UC_HOOK_INSN,
                     UC_HOOK_INTR, UC_HOOK_MEM_INVALID, UC_MEM_WRITE_PROT, UC_MODE_64, UC_PROT_ALL,
                     UC_PROT_READ, Uc, UcError)
from unicorn import x86_const as U

from runtime.engine import Engine

CODE = 0x100000
ALIAS = 0x40000000          # virtual window -> FRAME
FRAME = 0x1400000
END = (1 << 64) - 1


def machine(code: bytes, uc: Uc | None = None) -> Uc:
    """64 MiB, identity map of the first GiB (2 MiB pages) plus ALIAS -> FRAME via a 4 KiB page."""
    uc = uc or Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 64 << 20)
    uc.mem_write(0x3000, struct.pack("<2Q", 0x4000 | 3, 0))
    uc.mem_write(0x4000, struct.pack("<2Q", 0x5000 | 3, 0x6000 | 3))
    uc.mem_write(0x5000, b"".join(struct.pack("<Q", (k << 21) | 0x83) for k in range(512)))
    uc.mem_write(0x6000, struct.pack("<Q", 0x7000 | 3))
    uc.mem_write(0x7000, struct.pack("<Q", FRAME | 3))
    uc.reg_write(U.UC_X86_REG_CR3, 0x3000)
    uc.reg_write(U.UC_X86_REG_CR4, uc.reg_read(U.UC_X86_REG_CR4) | 0x20)
    uc.reg_write(U.UC_X86_REG_CR0, uc.reg_read(U.UC_X86_REG_CR0) | 0x80000001)
    uc.reg_write(U.UC_X86_REG_RSP, 0x80000)
    uc.mem_write(CODE, code)
    return uc


MOV_RAX_ALIAS = b"\x48\xc7\xc0" + struct.pack("<I", ALIAS)      # mov rax, ALIAS
STORE = b"\x48\xc7\x00\x34\x12\x00\x00"                           # mov qword [rax], 0x1234
LOAD_RBX = b"\x48\x8b\x18"                                        # mov rbx, [rax]
HLT = b"\xf4"


def test_physical_permissions_apply_through_guest_paging_and_hooks_see_physical_addresses():
    uc = machine(MOV_RAX_ALIAS + STORE + HLT)
    uc.mem_protect(FRAME, 0x1000, UC_PROT_READ)
    seen = []
    uc.hook_add(UC_HOOK_MEM_INVALID, lambda uc, access, addr, size, value, _: seen.append((access, addr)) or False)
    with pytest.raises(UcError):
        uc.emu_start(CODE, END)
    assert seen == [(UC_MEM_WRITE_PROT, FRAME)]                   # physical, not ALIAS
    assert uc.reg_read(U.UC_X86_REG_RIP) == CODE + len(MOV_RAX_ALIAS)   # RIP at the store


def test_a_write_protect_hook_can_emulate_the_store_and_skip_it():
    uc = machine(MOV_RAX_ALIAS + STORE + LOAD_RBX + HLT)
    uc.mem_protect(FRAME, 0x1000, UC_PROT_READ)

    def emulate(uc, access, addr, size, value, _):
        uc.mem_write(addr, value.to_bytes(size, "little"))
        uc.reg_write(U.UC_X86_REG_RIP, uc.reg_read(U.UC_X86_REG_RIP) + len(STORE))
        return True
    uc.hook_add(UC_HOOK_MEM_INVALID, emulate)
    uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RBX) == 0x1234


def test_mem_protect_inside_a_hook_takes_effect_at_once():
    out = b"\xe6\x80"                                             # out 0x80, al
    uc = machine(MOV_RAX_ALIAS + STORE + out + STORE + HLT)
    uc.hook_add(UC_HOOK_INSN, lambda uc, port, size, value, _: uc.mem_protect(FRAME, 0x1000, UC_PROT_READ),
                None, 1, 0, U.UC_X86_INS_OUT)
    with pytest.raises(UcError):                                   # the second store, TLB entry and all
        uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RIP) == CODE + len(MOV_RAX_ALIAS + STORE + out)


def test_writing_rip_in_a_code_hook_skips_the_instruction():
    cli_rbx = b"\xfa\x48\xc7\xc3\x05\x00\x00\x00"                  # cli; mov rbx, 5
    uc = machine(cli_rbx + HLT)
    uc.reg_write(U.UC_X86_REG_RFLAGS, 0x202)
    uc.hook_add(UC_HOOK_CODE, lambda uc, addr, size, _: uc.reg_write(U.UC_X86_REG_RIP, addr + size),
                None, CODE, CODE)
    uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RFLAGS) & 0x200               # cli never ran
    assert uc.reg_read(U.UC_X86_REG_RBX) == 5


def test_syscall_hook_sees_rip_at_syscall_resumes_after_it_and_leaves_rcx_r11():
    code = b"\x48\xc7\xc1\x11\x00\x00\x00" + b"\x0f\x05" + HLT     # mov rcx, 0x11; syscall; hlt
    uc = machine(code)
    seen = []

    def hook(uc, _):
        seen.append(uc.reg_read(U.UC_X86_REG_RIP))
        uc.reg_write(U.UC_X86_REG_RAX, 42)
    uc.hook_add(UC_HOOK_INSN, hook, None, 1, 0, U.UC_X86_INS_SYSCALL)
    uc.emu_start(CODE, END)
    assert seen == [CODE + 7]
    assert uc.reg_read(U.UC_X86_REG_RAX) == 42 and uc.reg_read(U.UC_X86_REG_RCX) == 0x11
    assert uc.reg_read(U.UC_X86_REG_RIP) == CODE + len(code)       # hlt ran: emu_start returned


@pytest.mark.parametrize("insn", [U.UC_X86_INS_RDMSR, U.UC_X86_INS_WRMSR, U.UC_X86_INS_RDTSC])
def test_msr_and_tsc_instructions_cannot_be_hooked(insn):
    uc = machine(HLT)
    with pytest.raises(UcError):
        uc.hook_add(UC_HOOK_INSN, lambda uc, _: 0, None, 1, 0, insn)


def test_exceptions_reach_the_interrupt_hook_and_ud_is_an_error():
    uc = machine(b"\x31\xc9\xf7\xf1")                              # xor ecx, ecx; div ecx
    seen = []
    uc.hook_add(UC_HOOK_INTR, lambda uc, intno, _: seen.append(intno) or uc.emu_stop())
    uc.emu_start(CODE, END)
    assert seen == [0]
    uc = machine(b"\x0f\x0b")                                      # ud2
    with pytest.raises(UcError):
        uc.emu_start(CODE, END)


def test_tlb_is_stale_until_flushed_with_uc_ctl():
    uc = machine(MOV_RAX_ALIAS + LOAD_RBX + b"\xe6\x80" + b"\x48\x8b\x08" + HLT)   # ...; mov rcx, [rax]
    uc.mem_write(FRAME, struct.pack("<Q", 0x11))
    uc.mem_write(FRAME + 0x10000, struct.pack("<Q", 0x22))

    def remap(flush):
        def hook(uc, port, size, value, _):
            uc.mem_write(0x7000, struct.pack("<Q", (FRAME + 0x10000) | 3))
            if flush:
                uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        return hook
    for flush, expect in ((False, 0x11), (True, 0x22)):
        uc.mem_write(0x7000, struct.pack("<Q", FRAME | 3))
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        h = uc.hook_add(UC_HOOK_INSN, remap(flush), None, 1, 0, U.UC_X86_INS_OUT)
        uc.emu_start(CODE, END)
        uc.hook_del(h)
        assert uc.reg_read(U.UC_X86_REG_RCX) == expect


def test_qemus_page_flush_empties_that_page_alone():
    """mmu.py flushes one page for a guest's invlpg through QEMU's own function (Engine.flush_page):
    the page's new mapping is seen at once, its neighbour's stays stale, as after a native invlpg."""
    engine = Engine()
    if engine.flush_page is None:
        pytest.skip("the engine found no CPU object here (no live register file): it flushes globally")
    load_rdx, load_rcx, load_rsi = (b"\x48\x8b\x90" + struct.pack("<I", 0x1000), b"\x48\x8b\x08",
                                    b"\x48\x8b\xb0" + struct.pack("<I", 0x1000))
    uc = machine(MOV_RAX_ALIAS + LOAD_RBX + load_rdx + b"\xe6\x80" + load_rcx + load_rsi + HLT, engine.uc)
    uc.mem_write(0x7000, struct.pack("<2Q", FRAME | 3, (FRAME + 0x1000) | 3))
    for frame, value in ((FRAME, 0x11), (FRAME + 0x1000, 0x12), (FRAME + 0x10000, 0x21), (FRAME + 0x11000, 0x22)):
        uc.mem_write(frame, struct.pack("<Q", value))

    def remap(uc, port, size, value, _):
        uc.mem_write(0x7000, struct.pack("<2Q", (FRAME + 0x10000) | 3, (FRAME + 0x11000) | 3))
        engine.flush_page(ALIAS + 0x123)                          # any address in the page
    uc.hook_add(UC_HOOK_INSN, remap, None, 1, 0, U.UC_X86_INS_OUT)
    uc.emu_start(CODE, END)
    assert [uc.reg_read(r) for r in (U.UC_X86_REG_RBX, U.UC_X86_REG_RDX)] == [0x11, 0x12]
    assert uc.reg_read(U.UC_X86_REG_RCX) == 0x21                  # flushed: the new frame
    assert uc.reg_read(U.UC_X86_REG_RSI) == 0x12                  # not flushed: still the old one


def test_loading_cr3_through_the_api_flushes_the_tlb_and_keeps_the_value():
    """mmu.py loads CR3 at the end of a multicall instead of flushing as well."""
    uc = machine(MOV_RAX_ALIAS + LOAD_RBX + b"\xe6\x80" + b"\x48\x8b\x08" + HLT)   # ...; mov rcx, [rax]
    uc.mem_write(FRAME, struct.pack("<Q", 0x11))
    uc.mem_write(FRAME + 0x10000, struct.pack("<Q", 0x22))

    def remap(uc, port, size, value, _):
        uc.mem_write(0x7000, struct.pack("<Q", (FRAME + 0x10000) | 3))
        uc.reg_write(U.UC_X86_REG_CR3, 0x3018)                   # the same root, PWT and PCD set
    uc.hook_add(UC_HOOK_INSN, remap, None, 1, 0, U.UC_X86_INS_OUT)
    uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RCX) == 0x22
    assert uc.reg_read(U.UC_X86_REG_CR3) == 0x3018


def test_page_walks_read_read_only_tables_and_set_no_accessed_bits():
    uc = machine(MOV_RAX_ALIAS + STORE + HLT)
    uc.mem_protect(0x3000, 0x5000, UC_PROT_READ)
    uc.emu_start(CODE, END)
    assert struct.unpack("<Q", uc.mem_read(0x7000, 8))[0] == FRAME | 3
    uc.mem_protect(0x3000, 0x5000, UC_PROT_ALL)
