"""Object code: what the x86-64 back end hands to the linker.

Each function is position-independent bytes plus relocations against
symbol names; the linker places them, resolves the relocations and writes
the ELF image.  Line rows feed `.debug_line`; site rows feed `.pv.sites`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Data
from .source import Loc
from .types import Type

# Relocation kinds, as in the x86-64 psABI: S = symbol address, A = addend,
# P = address of the field being patched.
PC32 = "pc32"     # 4 bytes: S + A - P      (call rel32, jmp rel32, rip-relative disp32 use A = -4)
ABS32 = "abs32"   # 4 bytes: S + A, must fit in 32 bits (zero-extended)
ABS32S = "abs32s" # 4 bytes: S + A, must fit in 32 bits signed (sign-extended disp32)
ABS64 = "abs64"   # 8 bytes: S + A


@dataclass
class Reloc:
    offset: int       # offset of the field within the function's code
    kind: str         # PC32, ABS32, ABS32S or ABS64
    symbol: str
    addend: int = 0


@dataclass
class LineRow:
    """Code from `offset` on comes from this source position (until the next row)."""
    offset: int
    loc: Loc


@dataclass
class SiteRow:
    """A sensitive operation (native) or its paravirtual replacement (pv)."""
    offset: int
    length: int
    op: str           # intrinsic name, see pvtool.intrinsics
    loc: Loc | None
    becomes: str = "" # pv: what it became, e.g. "hypercall set_pte (batched)"; native: ""
    kind: int = 0     # pvimage.abi.SITE_*; 0 (SITE_NATIVE) for the sensitive instruction itself


# How the stack frame changes, for the unwinder (`.debug_frame`, pvtool/dwarf.py): from a
# FrameStep's offset on ...
PUSHED_RBP = "pushed rbp"            # the caller's rbp is on the stack
RBP_FRAME = "rbp frame"              # rbp holds the frame's base: the CFA is rbp-relative
SAVED = "saved"                      # `reg` is pushed below the ones saved before it
LEAVING = "leaving"                  # an epilogue begins (code after its return is framed again)
POPPED_RBP = "popped rbp"            # rbp and the saved registers are the caller's again
RETURN_IN = "return address in"      # bundled return: the return address was popped into `reg`
RETURNED = "returned"                # past the return: the frame as before the epilogue
CALLER_UNKNOWN = "caller unknown"    # the caller's frame cannot be described here
CFA_AT = "cfa at"                    # the caller's rsp (the CFA) is `reg` + `value`
SAVED_AT = "saved at"                # `reg` is saved at CFA - `value`
RETURN_AT = "return address at"      # the return address is at CFA - `value`


@dataclass
class FrameStep:
    offset: int
    event: str
    reg: int = 0                     # a register's x86 number, for the events that name one
    value: int = 0                   # a distance, for the events that take one


@dataclass
class Variable:
    """A source variable and where it lives: `places` of (start, end, register, rbp offset), code
    offsets [start, end) where it is in that x86 register, or at [rbp + offset] if register is None."""
    name: str
    type: Type
    param: bool
    places: list[tuple[int, int, int | None, int]]
    line: int = 0


@dataclass
class FunctionCode:
    name: str
    code: bytes
    relocs: list[Reloc] = field(default_factory=list)
    lines: list[LineRow] = field(default_factory=list)
    sites: list[SiteRow] = field(default_factory=list)
    loc: Loc | None = None
    align: int = 16
    user: bool = False     # user code: placed in .user.text
    entered_by: str = ""             # 'call', 'interrupt' or 'trap entry': the frame it starts with ('': none)
    source_name: str = ""            # its name in the source if not `name` (a handler's body); for DWARF
    frame: list[FrameStep] = field(default_factory=list)
    body: int | None = None          # where the prologue ends: the first breakpoint in the function
    variables: list[Variable] = field(default_factory=list)
    result: Type | None = None       # the source's result type


@dataclass
class ObjectCode:
    functions: list[FunctionCode]
    data: list[Data]
    files: list[str]
    target: str = "native"     # 'native' or 'pv'
    name: str = "kernel"       # guest name for the PV note (the main source's stem)
    bundled: bool = False      # laid out by the PV code rules (32-byte bundles, masked branches)
