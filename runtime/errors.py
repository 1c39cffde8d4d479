"""The ways a run ends early, as exceptions the hypervisor raises and catches.

`ImageError` (shared with `pvtool check`) refuses an image before it runs.
Inside the run loop, an exit handler raises `Refused` when it turns a guest
request down (a hypercall returns `-errno`; in trap mode the same refusal
stops the guest), `GuestFault` when the guest did something that stops it,
and `Shutdown` when the guest asked to stop.  The vCPU turns the last two
into the run's end; no exception ever leaves `runtime.hypervisor.run`
except `ImageError`.
"""
from __future__ import annotations

from pvimage.elfread import ImageError

__all__ = ["ImageError", "Refused", "GuestFault", "GuestException", "Shutdown", "ExitLimit", "TimeUp"]


class Refused(Exception):
    """A guest request turned down: `errno` is what a hypercall returns negated."""

    def __init__(self, errno: int, why: str):
        super().__init__(why)
        self.errno = errno
        self.why = why


class GuestFault(Exception):
    """The guest must stop: str() says what happened, `rip` where (None: the current RIP)."""

    def __init__(self, what: str, rip: int | None = None):
        super().__init__(what)
        self.what = what
        self.rip = rip


class GuestException(Exception):
    """The guest's CPU raises exception `vector` (an emulated instruction that would fault on
    hardware, e.g. port I/O or cli in user mode): delivered to the guest's own handler, not the
    end of the run.  `rip` is the faulting instruction (None: the current RIP)."""

    def __init__(self, vector: int, error_code: int | None = None, rip: int | None = None,
                 registers: dict[str, int] | None = None):
        super().__init__(f"exception {vector}")
        self.vector = vector
        self.error_code = error_code
        self.rip = rip
        self.registers = registers or {}   # values to put back first (an `in` that faulted wrote rax)


class Shutdown(Exception):
    """The guest asked to stop with `status` (debug-exit port or the shutdown hypercall)."""

    def __init__(self, status: int):
        super().__init__(f"shutdown {status}")
        self.status = status


class ExitLimit(Exception):
    """More exits than --max-exits allowed."""


class TimeUp(Exception):
    """The run's --timeout passed while the hypervisor was busy (a long validation, say)."""
