"""The runtime's machine code (machinecode.py): the exit gate (what it passes on, its control-state
check, its timing) and the watchdog thread."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from time import perf_counter

import capstone
import pytest

from pvtool import driver
from runtime import engine, gate, machinecode, watchdog
from runtime.hypervisor import create, finish, load_image, run
from runtime.machine import Deadline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import hypercall_bench  # noqa: E402

RAM = 64 << 20
_DISASM = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
LISTINGS = {f"gate {reg}": gate.listing(reg) for reg in ("rsi", "rdx", "rcx", "r8", "r9")} | {
    "watchdog": watchdog.LISTING}


@pytest.mark.parametrize("name", LISTINGS)
def test_every_line_of_the_machine_code_is_what_its_listing_says(name):
    code = LISTINGS[name]
    data = machinecode.assemble(code)
    decoded = list(_DISASM.disasm(data, 0))
    labels = machinecode.label_offsets(code)
    lines = [(text, hexbytes) for text, hexbytes in code if not text.endswith(":")]
    assert sum(i.size for i in decoded) == len(data) and len(decoded) == len(lines)
    for insn, (text, target) in zip(decoded, lines):
        if text in machinecode.JUMPS:
            assert (insn.mnemonic, int(insn.op_str, 16)) == (text, labels[target])
        else:
            assert f"{insn.mnemonic} {insn.op_str}".strip() == text


# The gate called straight from Python, as Unicorn would call it for each type of hook.
_TYPES = [engine.SYSCALL_CB, engine.CPUID_CB, engine.INTR_CB, engine.IN_CB, engine.OUT_CB, engine.MEM_INVALID_CB]


def _through_gate(the_gate: gate.Gate, callback_type, hook, changed):
    """What Unicorn calls (its handle, the hook's arguments, the user data), and the user data."""
    code, data = the_gate.front(callback_type, hook, changed)
    unicorn_type = ctypes.CFUNCTYPE(callback_type._restype_, ctypes.c_void_p, *callback_type._argtypes_,
                                    ctypes.c_void_p)
    return ctypes.cast(code, unicorn_type), data


@pytest.mark.parametrize("callback_type", _TYPES, ids=lambda t: str(len(t._argtypes_)))
def test_the_gate_passes_the_hooks_own_arguments_and_returns_its_result(callback_type):
    seen = []
    restype = callback_type._restype_

    def hook(*args):
        seen.append(args)
        return None if restype is None else 1

    the_gate = gate.Gate()
    call, data = _through_gate(the_gate, callback_type, hook, lambda *a: pytest.fail("no change to see"))
    args = [0x1122_3344, 7, 0x89, -5][:len(callback_type._argtypes_)]
    result = call(0xE0E0_E0E0, *args, data)
    assert seen == [tuple(args)]
    assert result == (None if restype is None else 1)
    assert the_gate.ticks > 0                       # the time-stamp counter moves across a Python call


def test_the_gate_calls_changed_instead_of_the_hook_when_a_watched_value_differs():
    calls = []
    the_gate = gate.Gate()
    call, data = _through_gate(the_gate, engine.CPUID_CB, lambda: calls.append("hook") or 0,
                               lambda: calls.append("changed") or 1)
    cpu_state = (ctypes.c_uint64 * 4)(0x80050033, 0x1000, 0x20, 0xD01)
    the_gate.expect(tuple(cpu_state))
    assert call(None, data) == 0                    # not watching yet
    the_gate.watch(tuple(ctypes.addressof(cpu_state) + 8 * i for i in range(4)))
    assert call(None, data) == 0
    for i in range(4):                              # each of the four, alone, is noticed
        cpu_state[i] ^= 1 << 5
        assert call(None, data) == 1
        cpu_state[i] ^= 1 << 5
    assert call(None, data) == 0
    assert calls == ["hook", "hook", "changed", "changed", "changed", "changed", "hook"]


@pytest.mark.parametrize("register_file", ["live", "copied"])
def test_a_changed_control_register_is_caught_whichever_register_file_runs(register_file, monkeypatch):
    """Live, the gate compares; copied, the Python hook does: the guest stops either way."""
    from unicorn import x86_const as U
    if register_file == "copied":
        monkeypatch.setattr(engine, "_live_view", lambda uc, size: None)
    image = driver.compile_file("kernels/hello.pvk", "pv")
    vm = create(load_image(image, RAM), "pv", RAM, timeout=30)
    assert vm.cpu.natively_checked == (register_file == "live")
    uc = vm.engine.uc
    uc.reg_write(U.UC_X86_REG_CR4, uc.reg_read(U.UC_X86_REG_CR4) ^ (1 << 2))   # TSD: as a hidden mov cr4 would
    vm.cpu.regs.invalidate()
    result = finish(vm)
    assert result.reason == "fault" and "CR4 changed behind the hypervisor's back" in result.message


def test_host_time_goes_to_the_hypervisor_when_the_guest_exits_and_to_the_guest_when_it_computes():
    n = 20_000
    exits = run(hypercall_bench.elf(hypercall_bench.hypercall_loop(n), pv=True), "pv", timeout=None)
    assert exits.reason == "shutdown" and exits.stats.total_exits > n
    assert exits.stats.hypervisor_seconds > exits.stats.guest_seconds     # about 4 to 1 measured
    computes = run(hypercall_bench.elf(hypercall_bench.compute_then_shutdown(20_000_000), pv=True), "pv",
                   timeout=None)
    assert computes.reason == "shutdown" and computes.stats.total_exits < 10
    assert computes.stats.guest_seconds > 10 * computes.stats.hypervisor_seconds


def _spinning_engine() -> engine.Engine:
    eng = engine.Engine()
    eng.uc.mem_map(0x1000, 0x1000)
    eng.uc.mem_write(0x1000, b"\xeb\xfe")                  # jmp $: no exit, ever
    return eng


SPIN = 500_000_000     # instructions: several seconds, so a broken watchdog fails the test, not hangs it


def _threads() -> set[str]:
    """This process's thread ids: compared as sets, so a thread another test left ending meanwhile
    (a gdb stub's server, a subprocess reader) is not mistaken for the watchdog's."""
    return {task.name for task in Path("/proc/self/task").iterdir()}


def test_the_watchdog_stops_a_guest_that_never_exits_and_ends_with_the_run():
    """Emulation holds the GIL, so only the native thread can stop this loop."""
    eng, deadline, before = _spinning_engine(), Deadline(0.2), _threads()
    with watchdog.Watchdog(eng.uc, deadline):
        started = _threads() - before
        assert len(started) == 1                            # the watchdog's
        eng.emu_start(0x1000, 0x2000, count=SPIN)
        assert -1 < deadline.left() <= 0                    # at the deadline: not before, not at SPIN's end
    assert not started & _threads()                        # joined: gone with the run


def test_a_postponed_deadline_reaches_the_watchdog():
    eng, deadline = _spinning_engine(), Deadline(0.1)
    with watchdog.Watchdog(eng.uc, deadline) as dog:
        deadline.postpone(0.3)                              # as a debugger does after holding the guest
        dog.sync()
        start = perf_counter()
        eng.emu_start(0x1000, 0x2000, count=SPIN)
        assert perf_counter() - start >= 0.3 and -1 < deadline.left() <= 0
