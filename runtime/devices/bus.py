"""The I/O-port bus: devices claim ports, `in`/`out` (or the io hypercalls) reach them through it.

`bare` and `trap` reach the bus through `in`/`out` (Unicorn instruction
hooks or trapped instructions), `pv` through the `io_in`/`io_out`
hypercalls; the devices cannot tell the difference.  Unclaimed ports read
as all ones and ignore writes, as on a PC.
"""
from __future__ import annotations

from typing import Protocol

SIZES = (1, 2, 4)


class PortDevice(Protocol):
    def io_read(self, port: int, size: int) -> int: ...
    def io_write(self, port: int, size: int, value: int) -> None: ...


class IoBus:
    def __init__(self) -> None:
        self._ports: dict[int, PortDevice] = {}

    def attach(self, device: PortDevice, first: int, count: int = 1) -> None:
        for port in range(first, first + count):
            self._ports[port] = device

    def read(self, port: int, size: int) -> int:
        dev = self._ports.get(port)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.io_read(port, size) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        dev = self._ports.get(port)
        if dev is not None:
            dev.io_write(port, size, value & ((1 << (8 * size)) - 1))
