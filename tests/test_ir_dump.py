"""`ir.dump`, the listing `pvtool build --emit-ir` prints: one instruction a line, no Python reprs."""
from __future__ import annotations

from pvimage import abi
from pvtool import ir
from pvtool.source import Loc


def at(line: int) -> Loc:
    return Loc("k.pvk", line, 5)


def test_a_module_listing():
    v = [ir.VReg(n) for n in range(6)]
    entry = ir.Block("entry", [
        ir.Copy(v[1], 2**64 - 1, loc=at(3)),
        ir.BinOp("add", v[2], v[0], 4, loc=at(3)),
        ir.Ext(v[2], v[2], 8, True, loc=at(4)),
        ir.Load(v[3], v[2], -8, 4, signed=False, loc=at(4)),
        ir.Store(0x2000, 256, v[3], 1, loc=at(5)),
        ir.SlotAddr(v[4], 0, 8, loc=at(5)),
        ir.SiteBegin(1, "cli", "shared-page store", abi.SITE_NO_EXIT, loc=at(6)),
        ir.Hypercall(None, abi.HC_MULTICALL, [], loc=at(6)),
        ir.SiteEnd(1, loc=at(6)),
        ir.MachineOp("outb", None, [0x3f8, v[3]], loc=at(7)),
        ir.Cmp("ult", v[5], v[3], 0x10000, loc=at(7)),
    ], ir.Branch(v[5], "then1", "join2", loc=at(7)))
    then = ir.Block("then1", [ir.Call(v[4], "g", [v[4], 1], loc=at(8)),
                              ir.CallIndirect(None, v[4], [], loc=at(8))], ir.Jump("join2", loc=at(8)))
    join = ir.Block("join2", [], ir.Ret(v[3], loc=at(9)))
    f = ir.Function("f", [v[0]], [entry, then, join], [ir.Slot(16, 8)], returns_value=True, loc=at(2))
    h = ir.Function("h", [], [ir.Block("entry", [], ir.IRet(abi.HC_IRET))], interrupt=True)
    data = [ir.Data(".str.0", "rodata", 5, 1, b'a"\n\x01\0'),
            ir.Data("p", "data", 8, 8, bytes(8), [ir.DataReloc(0, "f", 4)], loc=at(1)),
            ir.Data("z", "bss", 4, 4)]
    listing = ir.dump(ir.Module([f, h], data, ["k.pvk"], "pv"))
    assert listing == """\
; pv module of k.pvk
data .str.0: rodata, 5 bytes, align 1 = "a\\"\\n\\x01"
data p: data, 8 bytes, align 8 = 00 00 00 00 00 00 00 00 (at 0: f+4) ; k.pvk:1
data z: bss, 4 bytes, align 4

fn f(%0) -> value                       ; k.pvk:2
  slot0: 16 bytes, align 8
  entry:
    %1 = copy -1                        ; k.pvk:3
    %2 = add %0, 4
    %2 = sext8 %2                       ; k.pvk:4
    %3 = load.u32 [%2-8]
    store.8 [0x2000+256], %3            ; k.pvk:5
    %4 = addr slot0+8
    site 1 begin, no-exit: cli -> shared-page store ; k.pvk:6
    hypercall multicall()
    site 1 end
    machine outb(1016, %3)              ; k.pvk:7
    %5 = cmp ult %3, 0x10000
    branch %5, then1, join2
  then1:
    %4 = call g(%4, 1)                  ; k.pvk:8
    call *%4()
    jump join2
  join2:
    ret %3                              ; k.pvk:9

interrupt fn h()
  entry:
    iret through hypercall iret"""
