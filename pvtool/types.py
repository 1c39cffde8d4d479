"""PVK types: what they are, their size and alignment, and integer arithmetic on them.

Types are immutable values compared structurally, except structs, which are
compared by name and carry their layout (filled in by the checker), and the
built-in scalar types, which exist once each and compare by identity.  The
integer helpers here define the language's wrapping arithmetic once: the
checker folds constants with them and tests use them as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class Type:
    pass


# The built-in scalar types exist once each (U8 ... BOOL, VOID below), so they
# compare by identity: the checker compares types constantly.

@dataclass(frozen=True, eq=False)
class IntType(Type):
    name: str
    bits: int
    signed: bool

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class BoolType(Type):
    def __str__(self) -> str:
        return "bool"


@dataclass(frozen=True, eq=False)
class VoidType(Type):
    """The 'type' of a call to a function that returns nothing."""
    def __str__(self) -> str:
        return "nothing"


@dataclass(frozen=True)
class PtrType(Type):
    target: Type

    def __str__(self) -> str:
        return f"*{self.target}"


@dataclass(frozen=True)
class ArrayType(Type):
    elem: Type
    count: int

    def __str__(self) -> str:
        return f"[{self.elem}; {self.count}]"


@dataclass
class Field:
    name: str
    type: Type
    offset: int


@dataclass
class StructInfo:
    """Layout of a struct; `fields` is None until the checker has laid it out."""
    fields: list[Field] | None = None
    size: int = 0
    align: int = 1

    def field(self, name: str) -> Field | None:
        for f in self.fields or []:
            if f.name == name:
                return f
        return None


@dataclass(frozen=True)
class StructType(Type):
    name: str
    info: StructInfo = field(default_factory=StructInfo, compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FnType(Type):
    params: tuple[Type, ...]
    result: Type | None

    def __str__(self) -> str:
        s = f"fn({', '.join(map(str, self.params))})"
        return s if self.result is None else f"{s} -> {self.result}"


U8, U16, U32, U64 = (IntType(f"u{b}", b, False) for b in (8, 16, 32, 64))
I8, I16, I32, I64 = (IntType(f"i{b}", b, True) for b in (8, 16, 32, 64))
BOOL = BoolType()
VOID = VoidType()
INT_TYPES = (U8, U16, U32, U64, I8, I16, I32, I64)
BUILTIN: dict[str, Type] = {t.name: t for t in INT_TYPES} | {"bool": BOOL}

# The built-in struct every program has: the interrupted context as a handler sees it
# (docs/language.md 3), lowest address first: the general registers the entry pushes,
# the error code, then the frame the CPU (or the hypervisor) pushed.
TRAP_FRAME_FIELDS = ("r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "rbp", "rdi", "rsi",
                     "rdx", "rcx", "rbx", "rax", "error_code", "rip", "cs", "rflags", "rsp", "ss")
TRAP_FRAME = StructType("TrapFrame")
TRAP_FRAME.info.fields = [Field(name, U64, 8 * k) for k, name in enumerate(TRAP_FRAME_FIELDS)]
TRAP_FRAME.info.size, TRAP_FRAME.info.align = 8 * len(TRAP_FRAME_FIELDS), 8
TRAP_FRAME_REGISTERS = TRAP_FRAME_FIELDS[:15]     # what a handler's entry pushes, last first


# The type classes have no subclasses, so these test the exact class: the
# checker and lowering ask them of nearly every expression, and a class
# comparison or set lookup costs a fraction of an isinstance that says no.
_AGGREGATES = frozenset((ArrayType, StructType))
_SCALARS = frozenset((IntType, BoolType, PtrType, FnType))


def is_int(t: Type | None) -> bool:
    return type(t) is IntType


def is_ptr(t: Type | None) -> bool:
    return type(t) is PtrType


def is_aggregate(t: Type | None) -> bool:
    return type(t) in _AGGREGATES


def is_scalar(t: Type | None) -> bool:
    """Fits in a register: integers, bool, pointers, function pointers."""
    return type(t) in _SCALARS


def size_of(t: Type) -> int:
    if isinstance(t, IntType):
        return t.bits // 8
    if isinstance(t, BoolType):
        return 1
    if isinstance(t, (PtrType, FnType)):
        return 8
    if isinstance(t, ArrayType):
        return t.count * size_of(t.elem)
    if isinstance(t, StructType):
        return t.info.size
    raise ValueError(f"{t} has no size")


def align_of(t: Type) -> int:
    if isinstance(t, ArrayType):
        return align_of(t.elem)
    if isinstance(t, StructType):
        return t.info.align
    return size_of(t)


def parse_type_string(s: str) -> Type:
    """The intrinsics table writes its types as strings like 'u16' or '*u64'."""
    if s.startswith("*"):
        return PtrType(parse_type_string(s[1:]))
    return TRAP_FRAME if s == TRAP_FRAME.name else BUILTIN[s]


# -- integer arithmetic -------------------------------------------------------

def wrap(value: int, t: IntType) -> int:
    """The value of type t that `value` wraps to (negative for signed types)."""
    m = 1 << t.bits
    value %= m
    if t.signed and value >= m >> 1:
        value -= m
    return value


def fits(value: int, t: IntType) -> bool:
    if t.signed:
        return -(1 << (t.bits - 1)) <= value < (1 << (t.bits - 1))
    return 0 <= value < (1 << t.bits)


def fold_binary(op: str, t: IntType, a: int, b: int) -> int | None:
    """a OP b in type t (b's own type for shifts is irrelevant: only its value
    modulo 64 counts).  None when the operation faults at run time."""
    if op in "+-*&|^":
        r = {"+": a + b, "-": a - b, "*": a * b, "&": a & b, "|": a | b, "^": a ^ b}[op]
        return wrap(r, t)
    if op in ("/", "%"):
        if b == 0:
            return None
        q = abs(a) // abs(b)
        if (a < 0) != (b < 0):
            q = -q
        if t.bits == 64 and t.signed and q == 1 << 63:
            return None          # i64 MIN / -1 overflows idiv: #DE like x86
        return wrap(q if op == "/" else a - q * b, t)
    if op in ("<<", ">>"):
        n = b % 64
        if op == "<<":
            return wrap(a << n, t)
        # Canonical registers hold the value zero- or sign-extended to 64 bits.
        return wrap(a >> n, t)
    raise ValueError(op)


def fold_compare(op: str, a: int, b: int) -> bool:
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
