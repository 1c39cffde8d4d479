"""Port I/O and cpuid exits, reached through Unicorn's instruction hooks.

In bare mode the guest's `in`, `out` and `cpuid` run as on hardware whose
devices the hypervisor models: the hook is the exit, the device on the I/O
bus (devices/bus.py) answers.  In user mode port I/O raises #GP unless
RFLAGS.IOPL allows it, as on hardware (Unicorn's hooks fire without that
check).  Trap mode never gets here (its patched
instructions exit first), and a PV image cannot contain these instructions
(the validator refuses them), so in pv mode reaching one is a fault.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import GuestException, GuestFault

if TYPE_CHECKING:
    from ..machine import Vm

IOPL_SHIFT = 12


def _exit(vm: Vm, what: str) -> None:
    if vm.mode.name == "pv":
        raise GuestFault(f"{what} run directly by a PV guest (code the validator did not see)")
    vm.run.count(vm.mode.exit_name(what), vm.cpu.rip)


def _check_privilege(vm: Vm) -> None:
    """Port I/O in user mode faults unless IOPL allows it: Unicorn's hooks fire regardless."""
    cpu = vm.cpu
    if cpu.cpl > cpu.regs.eflags >> IOPL_SHIFT & 3:
        raise GuestException(13, 0, cpu.rip, {"rax": cpu.regs["rax"]})


def port_in(vm: Vm, port: int, size: int) -> int:
    _exit(vm, "port I/O in")
    _check_privilege(vm)
    return vm.bus.read(port, size)


def port_out(vm: Vm, port: int, size: int, value: int) -> None:
    _exit(vm, "port I/O out")
    _check_privilege(vm)
    vm.bus.write(port, size, value)


def cpuid(vm: Vm) -> int:
    """Answer from the machine's CPUID table; 1 tells Unicorn to skip its own cpuid."""
    _exit(vm, "cpuid")
    regs = vm.cpu.regs
    result = vm.cpuid.query(regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF)
    for name, value in zip(("rax", "rbx", "rcx", "rdx"), result):
        regs[name] = value
    return 1
