"""The exit gate: a few dozen bytes of native code that every exit hook passes through.

Unicorn calls the gate instead of the Python hook.  Before and after the
hook the gate does, in machine code, the two duties of every exit that cost
most in Python (about a fifth of a hypercall's round trip, measured in
instructions):

- **timing**: it reads the time-stamp counter on the way in and out and
  adds the difference to `ticks`; the run loop turns that into host seconds
  as a share of each `emu_start`'s wall time (`GateState.ticks`);
- **the control-state check** (defence in depth behind the validator,
  cpu.py): when `check` is set it compares CR0, CR3, CR4 and EFER, read
  where the live CPU state keeps them, with what the hypervisor last set,
  and on any difference calls the hook's `changed` function instead of
  the hook (which finds the register and ends the run).

The gate passes the Python function the hook's own arguments (port, vector,
address ...: Unicorn's, without its handle before them and the user data
after), so ctypes converts nothing the hooks do not read, and returns what
the function returns.
It holds no pointer Python does not own: the hook's `_Block` (the two
functions and the shared `GateState`) is its user data, kept alive by the
engine with the callbacks.

The code is one listing per position of the user-data argument (2nd to
6th, by hook type), assembled and mapped by machinecode.py.
"""
from __future__ import annotations

import ctypes
from typing import Callable

from .machinecode import CodePage, Listing

_c_u64, _c_void_p = ctypes.c_uint64, ctypes.c_void_p


class GateState(ctypes.Structure):
    """Shared by every hook of one engine (offsets are the listing's)."""
    _fields_ = [("check", _c_u64),          # +0: compare the control state at every exit
                ("ticks", _c_u64),          # +8: time-stamp counter ticks spent in hooks, summed
                ("at", _c_u64 * 4),         # +16: addresses of CR0, CR3, CR4, EFER in the live CPU state
                ("expected", _c_u64 * 4)]   # +48: their values as the hypervisor last set them


class _Block(ctypes.Structure):
    """One hook's user data."""
    _fields_ = [("hook", _c_void_p),        # +0: the Python hook (a ctypes callback)
                ("changed", _c_void_p),     # +8: called instead when the control state changed
                ("state", ctypes.POINTER(GateState))]   # +16


# The registers that carry Unicorn's arguments (System V), and `mov rbx, <reg>` for each.
_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_MOV_RBX = {"rsi": "4889f3", "rdx": "4889d3", "rcx": "4889cb", "r8": "4c89c3", "r9": "4c89cb"}


_READ_TSC = [("rdtsc", "0f31"), ("shl rdx, 0x20", "48c1e220"), ("or rax, rdx", "4809d0")]   # into rax


def listing(user_data: str) -> Listing:
    """The gate for hooks whose user data comes in `user_data` (machinecode.py)."""
    tsc = _READ_TSC
    code = [("push rbx", "53"), ("push r12", "4154"), ("push r13", "4155"),
            ("push rdi", "57"), ("push rsi", "56"), ("push rdx", "52"), ("push rcx", "51"),
            ("push r8", "4150"), ("push r9", "4151"),             # 9 pushes: the stack is aligned for a call
            (f"mov rbx, {user_data}", _MOV_RBX[user_data]),       # rbx: the hook's _Block
            ("mov r13, qword ptr [rbx + 0x10]", "4c8b6b10"),      # r13: the GateState
            *tsc, ("mov r12, rax", "4989c4"),                     # r12: the counter on the way in
            ("cmp qword ptr [r13], 0", "49837d0000"), ("je", "call")]
    for i in range(4):
        code += [(f"mov rax, qword ptr [r13 + {16 + 8 * i:#x}]", f"498b45{16 + 8 * i:02x}"),
                 ("mov rax, qword ptr [rax]", "488b00"),
                 (f"cmp rax, qword ptr [r13 + {48 + 8 * i:#x}]", f"493b45{48 + 8 * i:02x}"),
                 ("jne", "changed")]
    code += [("call:", ""), ("mov rax, qword ptr [rbx]", "488b03"), ("jmp", "invoke"),
             ("changed:", ""), ("mov rax, qword ptr [rbx + 8]", "488b4308"),
             ("invoke:", ""),                                      # the hook's own arguments, one register down
             ("mov rdi, qword ptr [rsp + 0x20]", "488b7c2420"), ("mov rsi, qword ptr [rsp + 0x18]", "488b742418"),
             ("mov rdx, qword ptr [rsp + 0x10]", "488b542410"), ("mov rcx, qword ptr [rsp + 8]", "488b4c2408"),
             ("mov r8, qword ptr [rsp]", "4c8b0424"),
             ("call rax", "ffd0"),
             ("mov qword ptr [rsp], rax", "48890424"),            # the hook's result, over the spent r9
             *tsc, ("sub rax, r12", "4c29e0"),
             ("add qword ptr [r13 + 8], rax", "49014508"),
             ("mov rax, qword ptr [rsp]", "488b0424"),
             ("add rsp, 0x30", "4883c430"), ("pop r13", "415d"), ("pop r12", "415c"), ("pop rbx", "5b"),
             ("ret", "c3")]
    return code


_TSC = [*_READ_TSC, ("ret", "c3")]

_CODE: CodePage | None = None
_TSC_READ = None


def _code() -> CodePage:
    """The gates (one per register the user data can come in) and a counter read, mapped once."""
    global _CODE, _TSC_READ
    if _CODE is None:
        _CODE = CodePage({reg: listing(reg) for reg in _ARG_REGS[1:]} | {"tsc": _TSC})
        _TSC_READ = ctypes.CFUNCTYPE(_c_u64)(_CODE.address("tsc"))
    return _CODE


def tsc() -> int:
    """The host's time-stamp counter, as the gate reads it."""
    _code()
    return _TSC_READ()


class Gate:
    """One engine's gate state, and the blocks of its hooks (kept alive with it)."""

    def __init__(self) -> None:
        _code()                       # mapped now: an error surfaces with the engine's creation
        self.state = GateState()
        self._blocks: list[object] = []

    def front(self, callback_type: type, hook: Callable, changed: Callable) -> tuple[int, int]:
        """(code, user data) to register with Unicorn for `hook`, of ctypes type `callback_type`
        (the hook's own arguments), `changed` taking its place when the control state differs."""
        hook_cb, changed_cb = callback_type(hook), callback_type(changed)
        block = _Block(ctypes.cast(hook_cb, _c_void_p), ctypes.cast(changed_cb, _c_void_p),
                       ctypes.pointer(self.state))
        self._blocks += [hook_cb, changed_cb, block]
        user_data = _ARG_REGS[len(callback_type._argtypes_) + 1]   # after the handle and those
        return _CODE.address(user_data), ctypes.addressof(block)

    def watch(self, addresses: tuple[int, int, int, int]) -> None:
        """Check the control state at every exit, read at these addresses from now on."""
        self.state.at[:] = addresses
        self.state.check = 1

    def expect(self, values: tuple[int, int, int, int]) -> None:
        self.state.expected[:] = values

    @property
    def ticks(self) -> int:
        return self.state.ticks
