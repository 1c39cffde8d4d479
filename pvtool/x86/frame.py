"""The stack frame of one function.

rbp-based, so gdb can walk the stack and every slot has a fixed offset:

    [rbp + 8]            return address (interrupt fns: the CPU's frame)
    [rbp]                caller's rbp
    [rbp - 8*k]          saved registers, k = 1..len(saved)
    below them           stack slots (Function.slots), then spill slots
    rsp                  16-byte aligned from the end of the prologue on

On entry rsp = 8 (mod 16) -- after a call, and in an interrupt handler
because the CPU aligns the stack before pushing its 5-qword frame -- so
after `push rbp` rbp is 16-byte aligned, and slots aligned to at most 16
bytes relative to rbp are aligned in memory.  There is no red zone:
interrupts arrive on the same stack.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import ir
from .encode import Mem, RBP, Reg

MAX_SLOT_ALIGN = 16


class FrameError(Exception):
    """A frame the back end cannot lay out (a broken invariant)."""


class FrameTooLarge(FrameError):
    """The program's locals need more than rbp-relative disp32 reaches."""


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class Frame:
    saved: list[Reg]                   # pushed after rbp, in this order
    slot_disp: list[int] = field(default_factory=list)
    spill_disp: list[int] = field(default_factory=list)
    size: int = 0                      # `sub rsp, size` after the pushes

    def slot(self, i: int, offset: int = 0) -> Mem:
        return Mem(RBP, self.slot_disp[i] + offset)

    def spill(self, i: int) -> Mem:
        return Mem(RBP, self.spill_disp[i])

    @property
    def saved_area(self) -> int:
        return 8 * len(self.saved)


def layout(saved: list[Reg], slots: list[ir.Slot], spills: int) -> Frame:
    f = Frame(list(saved))
    depth = f.saved_area
    for s in slots:
        if s.align > MAX_SLOT_ALIGN or s.align & (s.align - 1):
            raise FrameError(f"stack slot alignment {s.align} not supported (at most {MAX_SLOT_ALIGN})")
        depth = align_up(depth + s.size, max(s.align, 1))
        f.slot_disp.append(-depth)
    for _ in range(spills):
        depth = align_up(depth + 8, 8)
        f.spill_disp.append(-depth)
    f.size = align_up(depth, 16) - f.saved_area
    if depth >= 1 << 31:
        raise FrameTooLarge(f"needs a {f.size + f.saved_area}-byte stack frame; rbp-relative "
                            f"offsets reach 2 GiB")
    return f
