"""The two 8259 PICs (master 0x20/0x21, slave 0xa0/0xa1): state only.

Enough of the chip for a kernel to initialise it (ICW1-ICW4) and mask it
(OCW1), read back the mask and the IRR/ISR (OCW3) and send EOIs (OCW2).
Nothing raises an interrupt yet; the later interrupt issue adds `raise_irq`
and delivery, using the mask and vector base kept here.
"""
from __future__ import annotations

from dataclasses import dataclass

MASTER, SLAVE = 0x20, 0xA0


@dataclass
class Pic8259:
    base: int
    imr: int = 0xFF          # everything masked until a kernel unmasks it
    irr: int = 0
    isr: int = 0
    vector_base: int = 0
    read_isr: bool = False
    init_step: int = 0       # 0: operational; 2..4: expecting ICW2..ICW4
    need_icw4: bool = False

    def io_read(self, port: int, size: int) -> int:
        if port == self.base + 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def io_write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == self.base:
            self._command(value)
        else:
            self._data(value)

    def _command(self, value: int) -> None:
        if value & 0x10:                     # ICW1: start initialisation
            self.init_step, self.need_icw4 = 2, bool(value & 1)
            self.imr = self.irr = self.isr = 0
        elif value & 0x08:                   # OCW3
            if value & 0x02:
                self.read_isr = bool(value & 1)
        elif value & 0x20:                   # OCW2: EOI (non-specific or specific)
            if value & 0x40:
                self.isr &= ~(1 << (value & 7))
            elif self.isr:
                self.isr &= self.isr - 1     # clear the highest-priority (lowest) bit

    def _data(self, value: int) -> None:
        if self.init_step == 2:
            self.vector_base = value & 0xF8
            self.init_step = 3
        elif self.init_step == 3:            # ICW3: cascade wiring, nothing to keep
            self.init_step = 4 if self.need_icw4 else 0
        elif self.init_step == 4:            # ICW4: mode bits, nothing to keep
            self.init_step = 0
        else:                                # OCW1: the interrupt mask
            self.imr = value


class PicPair:
    def __init__(self) -> None:
        self.master = Pic8259(MASTER)
        self.slave = Pic8259(SLAVE)

    def attach(self, bus) -> None:
        bus.attach(self.master, MASTER, 2)
        bus.attach(self.slave, SLAVE, 2)
