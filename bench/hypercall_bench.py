"""Hypercall and exit costs of the bundled hypervisor, against Unicorn's own floor, and its overhead on exit-free code.

    python bench/hypercall_bench.py [--iterations N] [--repeat R]

Builds tiny images by hand (no compiler needed) and prints a table:

- a hypercall round trip (a PV guest calling `wbinvd` through the hypercall
  page in a loop, one exit each) and a trapped instruction (a native guest
  executing `cli` in a loop under trap-and-emulate), in microseconds;
- the floor they are measured against: the same kind of loop on a bare
  Unicorn whose hook is an empty Python function called through Unicorn's
  Python binding (a `syscall` hook; an interrupt hook for the `int3` that
  trap mode patches over `cli`);
- their ratio (issue #15's goal: at most 3);
- exit-free throughput: an arithmetic loop that never exits, run by the
  hypervisor (pv mode, then one shutdown hypercall) and on a bare Unicorn
  with only RAM and the same page tables around it.  The ratio is the
  hypervisor's overhead on code that does not exit (ideally about 1).

Each figure is the minimum over --repeat runs, interleaved, so a busy
machine slows every row alike; compare the ratios, not the microseconds.
Nothing is asserted.
"""
from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_64, Uc   # noqa: E402
from unicorn import x86_const as U                             # noqa: E402

from pvimage import abi                                         # noqa: E402
from runtime.hypervisor import run                             # noqa: E402

TEXT = abi.LOAD_BASE
HCPAGE = TEXT + abi.PAGE_SIZE


def _call(at: int, target: int) -> bytes:
    return b"\xe8" + struct.pack("<i", target - (at + 5))


def _note(ntype: int, desc: bytes) -> bytes:
    name = abi.NOTE_OWNER.encode() + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def elf(code: bytes, pv: bool) -> bytes:
    """An ET_EXEC image: code at 1 MiB, then (PV) the hypercall page, one RX segment, PVTool notes."""
    notes = _note(abi.NOTE_MODE, struct.pack("<I", abi.MODE_PV if pv else abi.MODE_NATIVE))
    if pv:
        notes += _note(abi.NOTE_HYPERCALL_PAGE, struct.pack("<Q", HCPAGE))
    text = code.ljust(abi.PAGE_SIZE, b"\xcc") + (b"\xcc" * abi.PAGE_SIZE if pv else b"")
    header = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"", 2, 62, 1,
                         TEXT, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, TEXT, TEXT, len(text), len(text), 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, 0x100, 0, 0, len(notes), len(notes), 4)
    return (header + load + note).ljust(0x100, b"\0") + notes.ljust(0xF00, b"\0") + text


def hypercall_loop(n: int) -> bytes:
    """mov r12, n; 1: call wbinvd; dec r12; jnz 1b; xor edi, edi; call shutdown -- laid out in
    32-byte bundles with each call ending on a bundle boundary (the stubs return by a masked jump)."""
    nop = b"\x90"
    code = (b"\x49\xc7\xc4" + struct.pack("<i", n)).ljust(32, nop)                 # bundle 0
    code += nop * 27 + _call(TEXT + 59, HCPAGE + abi.HC_WBINVD * abi.HYPERCALL_STRIDE)   # bundle 1: the loop
    tail = b"\x49\xff\xcc" + b"\x75" + struct.pack("<b", 32 - (64 + 5)) + b"\x31\xff"  # dec; jnz bundle 1; xor
    code += tail.ljust(27, nop) + _call(TEXT + 91, HCPAGE + abi.HC_SHUTDOWN * abi.HYPERCALL_STRIDE)
    return code


def cli_loop(n: int) -> bytes:
    """mov r12, n; 1: cli; dec r12; jnz 1b; xor eax, eax; out 0xf4, al"""
    code = b"\x49\xc7\xc4" + struct.pack("<i", n) + b"\xfa\x49\xff\xcc"
    code += b"\x75" + struct.pack("<b", -(3 + 1 + 2))
    return code + b"\x31\xc0\xe6\xf4"


COMPUTE = (b"\x48\x31\xc0"                    # xor rax, rax
           b"\x4c\x89\xe1"                    # mov rcx, r12
           b"\x48\x01\xc8"                    # 1: add rax, rcx
           b"\x48\x6b\xc0\x03"                # imul rax, rax, 3
           b"\x48\xff\xc9"                    # dec rcx
           b"\x75\xf4")                       # jnz 1b


def compute_loop(n: int, tail: bytes) -> bytes:
    return b"\x49\xc7\xc4" + struct.pack("<i", n) + COMPUTE + tail


def compute_then_shutdown(n: int) -> bytes:
    """The exit-free loop, then one shutdown hypercall: a pv guest that exits once."""
    code = compute_loop(n, b"")
    return code + b"\x31\xff" + _call(TEXT + len(code) + 2, HCPAGE + abi.HC_SHUTDOWN * abi.HYPERCALL_STRIDE)


def bare_unicorn_seconds(code: bytes) -> float:
    """The loop on a Unicorn with only RAM and the boot identity map: no hypervisor at all."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, abi.DEFAULT_RAM)
    uc.mem_write(abi.BOOT_PML4, struct.pack("<Q", abi.BOOT_PDPT | 3))
    uc.mem_write(abi.BOOT_PDPT, struct.pack("<Q", abi.BOOT_PD | 3))
    uc.mem_write(abi.BOOT_PD, b"".join(struct.pack("<Q", (k << 21) | 0x83) for k in range(32)))
    uc.reg_write(U.UC_X86_REG_CR3, abi.BOOT_PML4)
    uc.reg_write(U.UC_X86_REG_CR4, uc.reg_read(U.UC_X86_REG_CR4) | 0x20)
    uc.reg_write(U.UC_X86_REG_CR0, uc.reg_read(U.UC_X86_REG_CR0) | 0x80000001)
    uc.reg_write(U.UC_X86_REG_RSP, abi.BOOT_STACK_TOP)
    uc.mem_write(TEXT, code + b"\xf4")            # hlt ends emu_start, as the hypervisor runs it
    start = perf_counter()
    uc.emu_start(TEXT, (1 << 64) - 1)
    return perf_counter() - start


def empty_hook_microseconds(n: int, instruction: bytes, intr: bool) -> float:
    """Per round trip: `instruction` n times in a loop on a bare Unicorn, each hooked by an empty
    Python function through the binding (syscall: an instruction hook; int3: the interrupt hook)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x10000)
    code = b"\x49\xc7\xc4" + struct.pack("<i", n) + instruction + b"\x49\xff\xcc"     # mov r12, n; 1: insn; dec r12
    code += b"\x75" + struct.pack("<b", -(len(instruction) + 3 + 2))                   # jnz 1b
    uc.mem_write(0x1000, code)
    if intr:
        uc.hook_add(UC_HOOK_INTR, lambda uc, intno, data: None)
    else:
        uc.hook_add(UC_HOOK_INSN, lambda uc, data: None, None, 1, 0, U.UC_X86_INS_SYSCALL)
    start = perf_counter()
    uc.emu_start(0x1000, 0x1000 + len(code))
    return (perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000, help="exits per exit benchmark")
    parser.add_argument("--loop", type=int, default=100_000_000, help="iterations of the exit-free loop")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each exit benchmark; the minimum counts")
    args = parser.parse_args()
    n = args.iterations
    hypercall_image, cli_image = elf(hypercall_loop(n), pv=True), elf(cli_loop(n), pv=False)
    best: dict[str, float] = {}

    def keep(name: str, microseconds: float) -> None:
        best[name] = min(best.get(name, microseconds), microseconds)

    for _ in range(args.repeat):
        result = run(hypercall_image, "pv", timeout=None)
        assert result.reason == "shutdown", result.message
        keep("hypercall", result.stats.run_seconds / n * 1e6)
        keep("syscall hook", empty_hook_microseconds(n, b"\x0f\x05", intr=False))
        result = run(cli_image, "trap", timeout=None)
        assert result.reason == "shutdown", result.message
        keep("trapped", result.stats.run_seconds / n * 1e6)
        keep("int3 hook", empty_hook_microseconds(n, b"\xcc", intr=True))
    rows = [
        ("hypercall round trip (pv, wbinvd)", f"{best['hypercall']:.2f} us"),
        ("  empty syscall hook on a bare Unicorn", f"{best['syscall hook']:.2f} us"),
        ("  ratio (goal: at most 3)", f"{best['hypercall'] / best['syscall hook']:.1f}"),
        ("trapped instruction (trap, cli)", f"{best['trapped']:.2f} us"),
        ("  empty int3 hook on a bare Unicorn", f"{best['int3 hook']:.2f} us"),
        ("  ratio (goal: at most 3)", f"{best['trapped'] / best['int3 hook']:.1f}"),
    ]

    result = run(elf(compute_then_shutdown(args.loop), pv=True), "pv", timeout=None)
    assert result.reason == "shutdown", result.message
    hv = result.stats.run_seconds
    bare = bare_unicorn_seconds(compute_loop(args.loop, b""))
    rows.append((f"exit-free loop, {args.loop:,} iterations, under the hypervisor", f"{hv:.3f} s"))
    rows.append(("same loop on a bare Unicorn (no hypervisor)", f"{bare:.3f} s"))
    rows.append(("exit-free throughput relative to bare Unicorn", f"{bare / hv:.2f}"))

    width = max(len(name) for name, _ in rows)
    print(f"{'benchmark'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
