"""The run's watchdog: a native thread that stops emulation once the deadline has passed.

Emulation runs holding the GIL (engine.Engine.emu_start), so no Python
thread could run while a guest spins without exits; the watchdog is a few
dozen bytes of machine code (machinecode.py) on a thread of its own, which
needs no GIL.  It sleeps in poll() on a pipe until the deadline, asks
Unicorn to stop (uc_emu_stop, safe from another thread: what emu_start's
own timeout does), and past the deadline asks again every 10 ms, in case
the run loop was between two entries (the loop also checks the deadline
before each).  The run ends it by writing to the pipe.

emu_start's own timeout would start a Unicorn thread at every entry that
wakes every 100 us: on a 2-core machine about a seventh of every exit's
cost (measured with bench/hypercall_bench.py's loop).
"""
from __future__ import annotations

import ctypes
import os

from .engine import EMU_STOP, EngineError
from .machine import Deadline
from .machinecode import CodePage, Listing

_c_u64, _c_void_p = ctypes.c_uint64, ctypes.c_void_p
CLOCK_MONOTONIC = 1          # the clock of time.perf_counter, which Deadline uses
POLLIN = 1


class _State(ctypes.Structure):
    """What the thread reads (offsets are the listing's)."""
    _fields_ = [("done", _c_u64),             # +0x00: set, then the pipe written, to end the thread
                ("deadline_ns", ctypes.c_int64),   # +0x08: CLOCK_MONOTONIC nanoseconds
                ("uc", _c_void_p),            # +0x10: the engine to stop
                ("clock_gettime", _c_void_p),  # +0x18
                ("emu_stop", _c_void_p),      # +0x20
                ("poll", _c_void_p),          # +0x28
                ("now_sec", ctypes.c_int64),   # +0x30: a struct timespec
                ("now_nsec", ctypes.c_int64),  # +0x38
                ("fd", ctypes.c_int32),        # +0x40: a struct pollfd on the pipe's read end
                ("events", ctypes.c_int16),
                ("revents", ctypes.c_int16)]


LISTING: Listing = [
    ("push rbx", "53"),                                        # aligns the stack for the calls
    ("mov rbx, rdi", "4889fb"),                                # rbx: the _State
    ("loop:", ""),
    ("cmp qword ptr [rbx], 0", "48833b00"), ("jne", "out"),
    ("mov edi, 1", "bf01000000"), ("lea rsi, [rbx + 0x30]", "488d7330"),
    ("call qword ptr [rbx + 0x18]", "ff5318"),                # clock_gettime(CLOCK_MONOTONIC, &now)
    ("imul rax, qword ptr [rbx + 0x30], 0x3b9aca00", "4869433000ca9a3b"),
    ("add rax, qword ptr [rbx + 0x38]", "48034338"),          # rax: now in ns
    ("mov rcx, qword ptr [rbx + 8]", "488b4b08"),
    ("sub rcx, rax", "4829c1"), ("jg", "wait"),               # rcx: ns left
    ("mov rdi, qword ptr [rbx + 0x10]", "488b7b10"),
    ("call qword ptr [rbx + 0x20]", "ff5320"),                # uc_emu_stop(uc)
    ("mov ecx, 0x989680", "b980969800"),                      # then again in 10 ms
    ("wait:", ""),
    ("mov rax, rcx", "4889c8"), ("xor edx, edx", "31d2"),
    ("mov ecx, 0xf4240", "b940420f00"), ("div rcx", "48f7f1"),
    ("inc rax", "48ffc0"),                                    # ms, rounded up
    ("mov ecx, 0x7fffffff", "b9ffffff7f"),
    ("cmp rax, rcx", "4839c8"), ("jbe", "sleep"),
    ("mov rax, rcx", "4889c8"),                               # at most poll's largest timeout
    ("sleep:", ""),
    ("lea rdi, [rbx + 0x40]", "488d7b40"), ("mov esi, 1", "be01000000"), ("mov edx, eax", "89c2"),
    ("call qword ptr [rbx + 0x28]", "ff5328"),                # poll(&pipe, 1, ms)
    ("jmp", "loop"),
    ("out:", ""),
    ("pop rbx", "5b"), ("xor eax, eax", "31c0"), ("ret", "c3"),
]

_CODE: CodePage | None = None
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), _c_void_p, _c_void_p, _c_void_p]
_LIBC.pthread_join.argtypes = [ctypes.c_ulong, _c_void_p]


class Watchdog:
    """`with Watchdog(uc, deadline) as w:` around a run; `w.sync()` before each entry, where a
    debugger may have postponed the deadline.  No thread when the run has no deadline."""

    def __init__(self, uc, deadline: Deadline):
        self.uc, self.deadline = uc, deadline
        self._state: _State | None = None
        self._thread = ctypes.c_ulong()
        self._pipe: tuple[int, int] | None = None

    def __enter__(self) -> Watchdog:
        global _CODE
        if self.deadline.at is None:
            return self
        if _CODE is None:
            _CODE = CodePage({"watch": LISTING})
        read, write = self._pipe = os.pipe()
        self._state = _State(0, 0, self.uc._uch, ctypes.cast(_LIBC.clock_gettime, _c_void_p), EMU_STOP,
                             ctypes.cast(_LIBC.poll, _c_void_p), 0, 0, read, POLLIN, 0)
        self.sync()
        if _LIBC.pthread_create(ctypes.byref(self._thread), None, _CODE.address("watch"),
                                ctypes.byref(self._state)):
            self._close()
            raise EngineError("cannot start the watchdog thread")
        return self

    def sync(self) -> None:
        if self._state is not None:
            self._state.deadline_ns = int(self.deadline.at * 1e9)

    def __exit__(self, *exc) -> None:
        if self._state is not None:
            self._state.done = 1
            os.write(self._pipe[1], b"\0")
            _LIBC.pthread_join(self._thread, None)
            self._close()

    def _close(self) -> None:
        for fd in self._pipe:
            os.close(fd)
        self._state = self._pipe = None
