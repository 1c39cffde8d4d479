"""A 16550 UART at 0x3f8, transmit side only: THR bytes go to the console.

The line-status register always reports the transmitter empty (THRE and
TEMT), so a polling driver never waits.  Nothing is ever received.  The
divisor latch and the other registers keep what the guest writes.
"""
from __future__ import annotations

from typing import Callable

COM1 = 0x3F8
THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
LSR_THRE = 0x20
LSR_TEMT = 0x40
LCR_DLAB = 0x80


class Uart16550:
    def __init__(self, output: Callable[[bytes], None], base: int = COM1):
        self.base = base
        self.output = output
        self.regs = bytearray(8)
        self.divisor = 12          # 9600 baud until the guest programs it

    def io_read(self, port: int, size: int) -> int:
        reg = port - self.base
        if self.regs[LCR] & LCR_DLAB and reg in (THR, IER):
            return (self.divisor >> (8 * reg)) & 0xFF
        if reg == LSR:
            return LSR_THRE | LSR_TEMT
        if reg == IIR:
            return 0x01            # no interrupt pending
        if reg == THR:
            return 0               # receive buffer: never any data
        return self.regs[reg]

    def io_write(self, port: int, size: int, value: int) -> None:
        reg = port - self.base
        value &= 0xFF
        if self.regs[LCR] & LCR_DLAB and reg in (THR, IER):
            shift = 8 * reg
            self.divisor = (self.divisor & ~(0xFF << shift)) | (value << shift)
        elif reg == THR:
            self.output(bytes([value]))
        elif reg not in (IIR, LSR, MSR):   # FCR is write-only; LSR/MSR read-only
            self.regs[reg] = value
