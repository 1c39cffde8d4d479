"""The two 8259A PICs of a PC: master at 0x20/0x21, slave at 0xa0/0xa1 on the master's IRQ 2.

What a kernel does with them works: the ICW1-ICW4 initialisation (vector
offset, single or cascaded, auto-EOI), the mask (OCW1), EOIs (OCW2:
non-specific, specific, and the rotating forms), and reading back the IRR or
ISR (OCW3).  Priorities are the chip's: IRQ 0 highest, rotated by the
rotating EOIs or set-priority; a request is delivered only if it outranks
everything in service on its chip (fully nested mode).  The slave's output
drives the master's IR2, as on a PC, whatever ICW3 says.

Inputs are edge-triggered: `raise_irq(n)` is one rising edge and sets the
request bit; the mask only holds a request back, it does not drop it.  The
CPU side is `pending()` (the vector an acknowledge would give, or None) and
`acknowledge()` (the INTA cycle: IRR -> ISR, the vector).  The runtime's
machine has no local APIC (CPUID says so), so the master's output goes
straight to the CPU's interrupt pin.

Not modelled: special mask mode, poll mode, level-triggered mode, buffered
mode.  Ports of the bus nobody claims read as all ones (devices/__init__.py).
"""
from __future__ import annotations

from dataclasses import dataclass

MASTER, SLAVE = 0x20, 0xA0
CASCADE = 2                  # the master's input the slave drives


@dataclass
class Pic8259:
    base: int
    imr: int = 0xFF          # everything masked until a kernel unmasks it
    irr: int = 0
    isr: int = 0
    vector_base: int = 0
    lowest: int = 7          # the line with the lowest priority (rotation moves it)
    read_isr: bool = False
    init_step: int = 0       # 0: operational; 2..4: expecting ICW2..ICW4
    single: bool = False
    need_icw4: bool = False
    auto_eoi: bool = False
    cascade_mask: int = 0    # ICW3 as written (kept for reading back; the wiring is fixed)
    slave: Pic8259 | None = None

    # -- the request lines and the CPU side --------------------------------------
    def raise_line(self, line: int) -> None:
        self.irr |= 1 << line

    def requests(self) -> int:
        """IRR as the chip sees it: the slave's output shows on IR2."""
        if self.slave is not None and self.slave.pending_line() is not None:
            return self.irr | 1 << CASCADE
        return self.irr

    def priority(self, line: int) -> int:
        """0 is the highest."""
        return (line - self.lowest - 1) & 7

    def _best(self, bits: int) -> int | None:
        lines = [n for n in range(8) if bits >> n & 1]
        return min(lines, key=self.priority) if lines else None

    def outranks_service(self, line: int) -> bool:
        busy = self._best(self.isr)
        return busy is None or self.priority(line) < self.priority(busy)

    def pending_line(self) -> int | None:
        """The line an acknowledge would serve: unmasked, and above everything in service."""
        bits = self.requests() & ~self.imr
        if not bits:                         # the common case, checked at every exit
            return None
        line = self._best(bits)
        return line if line is not None and self.outranks_service(line) else None

    def acknowledge(self) -> int:
        """INTA: move the best request into service and return its vector (cascading to the slave)."""
        line = self.pending_line()
        assert line is not None, "acknowledge without a pending request"
        self.irr &= ~(1 << line)
        if not self.auto_eoi:
            self.isr |= 1 << line
        if line == CASCADE and self.slave is not None:
            return self.slave.acknowledge()
        return self.vector_base + line

    def can_deliver(self, line: int) -> bool:
        """Would a rising edge on `line` be delivered now (nothing changing in between)?"""
        return not self.imr >> line & 1 and self.outranks_service(line)

    # -- ports ------------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if port == self.base + 1:
            return self.imr
        return self.isr if self.read_isr else self.requests()

    def io_write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == self.base:
            self._command(value)
        else:
            self._data(value)

    def _command(self, value: int) -> None:
        if value & 0x10:                     # ICW1: start initialisation
            self.init_step, self.single, self.need_icw4 = 2, bool(value & 2), bool(value & 1)
            self.imr = self.irr = self.isr = 0
            self.lowest, self.read_isr, self.auto_eoi = 7, False, False
        elif value & 0x08:                   # OCW3
            if value & 0x02:
                self.read_isr = bool(value & 1)
        else:                                # OCW2
            self._ocw2(value >> 5, value & 7)

    def _ocw2(self, op: int, level: int) -> None:
        """op: R SL EOI.  1 non-specific EOI, 3 specific EOI, 5 rotate on non-specific EOI,
        7 rotate on specific EOI, 6 set priority; 0, 2 and 4 (rotate in auto-EOI) change nothing here."""
        if op in (1, 5):
            level = self._best(self.isr)
            if level is None:
                return
        if op in (1, 3, 5, 7):
            self.isr &= ~(1 << level)
        if op in (5, 6, 7):
            self.lowest = level

    def _data(self, value: int) -> None:
        if self.init_step == 2:              # ICW2: the vector of line 0
            self.vector_base = value & 0xF8
            self.init_step = 0 if self.single and not self.need_icw4 else 4 if self.single else 3
        elif self.init_step == 3:            # ICW3: cascade wiring
            self.cascade_mask = value
            self.init_step = 4 if self.need_icw4 else 0
        elif self.init_step == 4:            # ICW4: bit 1 auto-EOI
            self.auto_eoi = bool(value & 2)
            self.init_step = 0
        else:                                # OCW1: the interrupt mask
            self.imr = value


class PicPair:
    def __init__(self) -> None:
        self.slave = Pic8259(SLAVE)
        self.master = Pic8259(MASTER, slave=self.slave)

    def attach(self, bus) -> None:
        bus.attach(self.master, MASTER, 2)
        bus.attach(self.slave, SLAVE, 2)

    def raise_irq(self, irq: int) -> None:
        """A rising edge on IRQ 0-15."""
        if irq < 8:
            self.master.raise_line(irq)
        else:
            self.slave.raise_line(irq - 8)

    def pending(self) -> bool:
        """Whether the CPU's interrupt pin is asserted."""
        if not (self.master.irr | self.slave.irr):    # the common case, checked after every exit
            return False
        return self.master.pending_line() is not None

    def acknowledge(self) -> int:
        return self.master.acknowledge()

    def can_deliver(self, irq: int) -> bool:
        if irq < 8:
            return self.master.can_deliver(irq)
        return self.slave.can_deliver(irq - 8) and self.master.can_deliver(CASCADE)
