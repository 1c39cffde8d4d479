"""The engine's register file: a view of Unicorn's live CPU state, or copies of it, and the same runs either way."""
from __future__ import annotations

import os

import pytest
from unicorn import x86_const as U

from pvtool import driver
from runtime import engine
from runtime.hypervisor import run

from kernels import PROJECT_KERNELS

CAN_READ_OWN_MEMORY = os.access("/proc/self/mem", os.R_OK)


@pytest.fixture(params=["live", "copied"])
def register_file(request, monkeypatch):
    if request.param == "copied":
        monkeypatch.setattr(engine, "_live_view", lambda uc, size: None)
    elif not CAN_READ_OWN_MEMORY:
        pytest.skip("/proc/self/mem is not readable here: the register file copies")
    return request.param


@pytest.mark.skipif(not CAN_READ_OWN_MEMORY, reason="/proc/self/mem is not readable here")
def test_the_live_cpu_state_is_found_where_this_process_can_read_itself():
    assert engine.layout().live is not None
    assert engine.Engine().regs.live


def test_writes_through_the_register_file_reach_the_cpu(register_file):
    eng = engine.Engine()
    regs = eng.regs
    assert regs.live == (register_file == "live")
    regs["rax"] = 0x1122_3344_5566_7788
    regs["r15"] = -1
    regs.rip = 0x40_1000
    regs.finish()
    assert eng.uc.reg_read(U.UC_X86_REG_RAX) == 0x1122_3344_5566_7788
    assert eng.uc.reg_read(U.UC_X86_REG_R15) == (1 << 64) - 1
    assert eng.uc.reg_read(U.UC_X86_REG_RIP) == 0x40_1000


def test_writes_through_the_api_are_seen_by_the_next_exit(register_file):
    eng = engine.Engine()
    regs = eng.regs
    assert regs["rbx"] == 0
    eng.uc.reg_write(U.UC_X86_REG_RBX, 0xABCD)
    eng.uc.reg_write(U.UC_X86_REG_RDI, 0x1234)
    regs.finish()                          # what the run loop does between exits
    assert regs["rbx"] == 0xABCD
    assert regs.gprs[engine.GPR_INDEX["rdi"]] == 0x1234


def test_raw_fields_written_in_an_exit_reach_the_cpu_around_api_calls(register_file):
    """Inside an exit the raw fields are always current and always written back: an API call in
    the middle (store, the call, a reload in a copied file) loses neither side's writes."""
    eng = engine.Engine()
    regs, k = eng.regs, engine.GPR_INDEX
    regs.begin_exit()
    regs.gprs[k["rax"]] = 5
    regs.api_write(U.UC_X86_REG_RFLAGS, 0x246)
    regs.gprs[k["rcx"]] = 6
    assert regs.gprs[k["rax"]] == 5 and regs.eflags_word.value & 0x200
    regs.finish()
    assert (eng.uc.reg_read(U.UC_X86_REG_RAX), eng.uc.reg_read(U.UC_X86_REG_RCX)) == (5, 6)
    assert eng.uc.reg_read(U.UC_X86_REG_RFLAGS) == 0x246


def test_msr_writes_and_rflags_survive_a_register_file_written_in_the_same_exit(register_file):
    """The system-call MSRs are read from the state, written through the API: in the copied file
    a written-back copy must not undo an MSR write made after a register write."""
    eng = engine.Engine()
    regs = eng.regs
    regs["rax"] = 7                                   # the copy is dirty now
    regs.set_msr(0xC0000082, 0x7F00_1234_5678)        # LSTAR
    regs.api_write(U.UC_X86_REG_RFLAGS, 0x246)
    regs["rcx"] = 9
    regs.finish()
    assert eng.uc.msr_read(0xC0000082) == 0x7F00_1234_5678
    assert eng.uc.reg_read(U.UC_X86_REG_RFLAGS) == 0x246
    assert (eng.uc.reg_read(U.UC_X86_REG_RAX), eng.uc.reg_read(U.UC_X86_REG_RCX)) == (7, 9)
    eng.uc.msr_write(0xC0000084, 0x700)               # SFMASK, as wrmsr would leave it
    regs.finish()
    assert (regs.msr(0xC0000082), regs.msr(0xC0000084)) == (0x7F00_1234_5678, 0x700)
    assert regs.api_read(U.UC_X86_REG_RFLAGS) == 0x246


def test_cr2_and_the_table_registers_are_read_from_the_state_as_the_api_gives_them(register_file):
    """Every exception reads CR2 and the IDT register (and bare's the TR) from the state, not the API:
    through the register file's methods, and as its raw fields (RegisterFile.entry)."""
    eng = engine.Engine()
    regs = eng.regs
    eng.uc.reg_write(U.UC_X86_REG_CR2, 0x7F12_3456_789A)
    tables = {U.UC_X86_REG_GDTR: (0x3F, 0x11_2000), U.UC_X86_REG_IDTR: (0xFFF, 0xFFFF_8000_0004_4000),
              U.UC_X86_REG_TR: (0x67, 0x13_3000)}
    for reg, (limit, base) in tables.items():
        eng.uc.reg_write(reg, (0x28 if reg == U.UC_X86_REG_TR else 0, base, limit, 0))
    eng.uc.reg_write(U.UC_X86_REG_CS, 0x08)
    eng.uc.reg_write(U.UC_X86_REG_SS, 0x10)
    regs.finish()
    assert regs.cr(2) == 0x7F12_3456_789A
    assert {reg: regs.table(reg) for reg in tables} == tables
    regs.begin_exit()                                   # the raw fields are current inside an exit
    raw = regs.entry
    assert raw.cr2.value == 0x7F12_3456_789A and raw.in_flight.value == -1
    assert (raw.idt_limit.value, raw.idt_base.value) == tables[U.UC_X86_REG_IDTR]
    assert (raw.tr_limit.value, raw.tr_base.value) == tables[U.UC_X86_REG_TR]
    assert (raw.cs.value, raw.ss.value) == (0x08, 0x10)
    regs.finish()


KERNELS = ["tasks", "mm", "critical", "unix"]


@pytest.mark.parametrize("mode", ["pv", "trap", "bare"])
@pytest.mark.parametrize("name", KERNELS)
def test_a_run_is_the_same_with_a_copied_register_file(name, mode, monkeypatch):
    if not CAN_READ_OWN_MEMORY:
        pytest.skip("/proc/self/mem is not readable here: there is only the copied register file")
    image = driver.compile_file(str(PROJECT_KERNELS / f"{name}.pvk"), "pv" if mode == "pv" else "native")
    live = run(image, mode, timeout=60)
    monkeypatch.setattr(engine, "_live_view", lambda uc, size: None)
    copied = run(image, mode, timeout=60)
    assert (copied.status, copied.console) == (live.status, live.console)
    assert copied.stats.exits == live.stats.exits
