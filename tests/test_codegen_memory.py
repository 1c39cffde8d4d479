"""Code generation of memory accesses: loads and stores of every size, globals, stack slots."""
from __future__ import annotations

import struct

import pytest

from codegen_support import FB, M64, REGISTER_SETS, build, function, machine, signed, texts
from pvtool import ir, obj
from unicorn_harness import RAM, Machine


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_loads_and_stores_of_every_size_and_sign(regs):
    fns = []
    for size in (1, 2, 4, 8):
        for sgn in (False, True):
            b = FB(f"ld{size}{'s' if sgn else 'u'}", 2)      # (ptr, index) -> *(ptr + 8 + index)
            p = b.op("add", b.p[0], b.p[1])
            b.ret(b.load(p, 8, size, sgn))
            fns.append(b)
        b = FB(f"st{size}", 2)                               # (ptr, value): *(ptr - 16) = value
        b.store(b.p[0], -16, b.p[1], size)
        b.ret(0)
        fns.append(b)
        b = FB(f"sti{size}", 1)                              # an immediate value
        b.store(b.p[0], 0, 0x8877665544332211, size)
        b.ret(0)
        fns.append(b)
        b = FB(f"abs{size}")                                 # an absolute address
        b.store(RAM + 0x800, 0, 0xA5A5A5A5A5A5A5A5, size)
        b.ret(b.load(RAM, 0x800, size, True))
        fns.append(b)
    b = FB("farptr", 1)                                      # offset beyond disp32
    b.ret(b.load(b.p[0], 1 << 33, 8))
    fns.append(b)
    m = machine(fns, registers=REGISTER_SETS[regs])
    pattern = bytes(range(0x80, 0x100)) + bytes(range(0x80))
    for size in (1, 2, 4, 8):
        mask = (1 << (8 * size)) - 1
        m.write(RAM, pattern)
        for idx in (0, 3, 17):
            raw = int.from_bytes(pattern[8 + idx:8 + idx + size], "little")
            assert m.call(f"ld{size}u", RAM, idx) == raw
            want = raw - (1 << (8 * size)) if raw >> (8 * size - 1) else raw
            assert m.call(f"ld{size}s", RAM, idx) == want % M64
        m.write(RAM + 0x100, b"\xee" * 16)
        m.call(f"st{size}", RAM + 0x110, 0x0102030405060708)
        assert m.read(RAM + 0x100, 16) == (0x0102030405060708 & mask).to_bytes(size, "little") + b"\xee" * (16 - size)
        m.write(RAM + 0x200, b"\xee" * 16)
        m.call(f"sti{size}", RAM + 0x200)
        assert m.read(RAM + 0x200, 16) == (0x8877665544332211 & mask).to_bytes(size, "little") + b"\xee" * (16 - size)
        got = m.call(f"abs{size}")
        assert got == signed(0xA5A5A5A5A5A5A5A5 & mask | (-1 << (8 * size) if size < 8 else 0)) % M64
    m.write(RAM + 0x10, struct.pack("<Q", 0xFEEDFACE))
    assert m.call("farptr", RAM + 0x10 - (1 << 33)) == 0xFEEDFACE


def test_globals_through_addrof_and_rip_relative_accesses():
    data = [ir.Data("counter", "data", 8, 8, struct.pack("<Q", 41)),
            ir.Data("table", "rodata", 16, 8, struct.pack("<QQ", 0x1111, 0x2222)),
            ir.Data("ptr", "data", 8, 8, bytes(8), [ir.DataReloc(0, "table", 8)])]
    b = FB("bump")                                 # counter += 1 (fused: rip-relative)
    a = b(ir.AddrOf(b.v(), "counter"))
    x = b.load(a, 0, 8)
    y = b.op("add", x, 1)
    a2 = b(ir.AddrOf(b.v(), "counter"))
    b.store(a2, 0, y, 8)
    b.ret(y)
    c = FB("second")                               # table[1] via a kept address and via ptr
    t = c(ir.AddrOf(c.v(), "table", 8))
    p = c(ir.AddrOf(c.v(), "ptr"))
    q = c.load(p, 0, 8)
    c.ret(c.op("add", c.load(t, 0, 8), c.load(q, 0, 8)))
    d = FB("addr")
    d.ret(d(ir.AddrOf(d.v(), "table", 8)))
    oc = build([b, c, d], data)
    bump = texts(function(oc, "bump"))
    assert sum("[rip]" in x for x in bump) == 2 and not any(x.startswith("lea") for x in bump[2:]), bump
    m = Machine(oc.functions, data)
    assert m.call("bump") == 42 and m.call("bump") == 43
    assert m.read_u64(m.symbols["counter"]) == 43
    assert m.call("second") == 0x4444
    assert m.call("addr") == m.symbols["table"] + 8
    assert all(r.kind == obj.PC32 for r in function(oc, "second").relocs)


@pytest.mark.parametrize("regs", REGISTER_SETS)
def test_stack_slots(regs):
    b = FB("f", 1)
    f = b.f
    arr = f.new_slot(64, 8)
    small = f.new_slot(2, 2)
    wide = f.new_slot(16, 16)
    for i in range(8):                               # arr[i] = p0 * i, through a fused slot address
        s = b(ir.SlotAddr(b.v(), arr, 8 * i))
        b.store(s, 0, b.op("mul", b.p[0], i), 8)
    b.store(b(ir.SlotAddr(b.v(), small)), 0, 0xBEEF, 2)
    w = b(ir.SlotAddr(b.v(), wide))                 # an address that escapes into a register
    b.store(w, 8, 5, 8)
    base = b(ir.SlotAddr(b.v(), arr))
    acc = b.copy(0)
    for i in range(8):
        b(ir.BinOp("add", acc, acc, b.load(base, 8 * i, 8)))
    b(ir.BinOp("add", acc, acc, b.load(b(ir.SlotAddr(b.v(), small)), 0, 2)))
    b(ir.BinOp("add", acc, acc, b.load(w, 8, 8)))
    b(ir.BinOp("add", acc, acc, b.op("and", w, 15)))   # 16-byte aligned slot
    b.ret(acc)
    m = machine([b], registers=REGISTER_SETS[regs])
    assert m.call("f", 3) == 3 * 28 + 0xBEEF + 5


