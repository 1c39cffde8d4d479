"""Port I/O and cpuid exits, reached through Unicorn's instruction hooks.

In bare mode the guest's `in`, `out` and `cpuid` run as on hardware whose
devices the hypervisor models: the hook is the exit, the device on the I/O
bus (devices/bus.py) answers.  Trap mode never gets here (its patched
instructions exit first), and a PV image cannot contain these instructions
(the validator refuses them), so in pv mode reaching one is a fault.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import GuestFault

if TYPE_CHECKING:
    from ..machine import Vm


def _exit(vm: Vm, what: str) -> None:
    if vm.mode.name == "pv":
        raise GuestFault(f"{what} run directly by a PV guest (code the validator did not see)")
    vm.run.count(what, vm.cpu.rip)


def port_in(vm: Vm, port: int, size: int) -> int:
    _exit(vm, "port I/O in")
    return vm.bus.read(port, size)


def port_out(vm: Vm, port: int, size: int, value: int) -> None:
    _exit(vm, "port I/O out")
    vm.bus.write(port, size, value)


def cpuid(vm: Vm) -> int:
    """Answer from the machine's CPUID table; 1 tells Unicorn to skip its own cpuid."""
    _exit(vm, "cpuid")
    regs = vm.cpu.regs
    result = vm.cpuid.query(regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF)
    for name, value in zip(("rax", "rbx", "rcx", "rdx"), result):
        regs[name] = value
    return 1
