#!/usr/bin/env python3
"""Bundle cost: what the PV code rules' layout costs in guest time.

The compute kernels kernels/{sieve,checksum,sort}.pvk are built native twice,
plain and with the bundled layout the pv target uses (32-byte bundles,
prefix and NOP padding, calls ending on bundle ends, masked returns and
indirect calls: `codegen.generate(..., bundled=True)`), and run in the same mode (bare by
default) on the bundled hypervisor.  Runs are interleaved (for each repeat,
for each kernel, plain and bundled, in alternating order), every run's
console and status are checked against the kernel's header, and the report
gives medians of the guest seconds (the runtime's split of wall time) and of
the CPU seconds of the whole run (steadier on a shared machine: time spent
descheduled does not count), the bundled/plain ratios within the run, and
the static cost: code size and padding (NOP bytes; prefix padding adds none).
With --count it also runs each image once with a block hook and reports the
guest instructions executed: a figure the machine's load cannot change.

    python bench/bundle_cost.py [KERNEL ...] [--repeat N] [--mode bare|trap] [--count] [--json]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from time import process_time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))        # a script beside the package, not installed with it

import capstone                                                  # noqa: E402
from elftools.elf.elffile import ELFFile                         # noqa: E402

from pvtool import driver, elfwrite, link                        # noqa: E402
from pvtool.commands.argtypes import one_of, seconds, whole_number  # noqa: E402
from pvtool.errors import USER_ERRORS                            # noqa: E402
from pvtool.expect import expectation                            # noqa: E402
from pvtool.tools.bench import Progress, median, ratio           # noqa: E402
from pvtool.x86 import codegen                                   # noqa: E402
from runtime.hypervisor import DEFAULT_MEMORY_MIB, create, finish, load_image, run as run_guest  # noqa: E402
from unicorn import UC_HOOK_BLOCK                                # noqa: E402

KERNELS = ("sieve", "checksum", "sort")
LAYOUTS = {"plain": False, "bundled": True}
TARGET = 1.05                        # the goal: bundled at most 5% more guest time


class BenchError(Exception):
    """A run that went wrong; str() is one line."""


@dataclass
class Row:
    kernel: str
    plain_guest_s: float             # median guest seconds, plain layout
    bundled_guest_s: float           # median guest seconds, bundled layout
    guest_ratio: float | None        # bundled / plain, medians of the same interleaved run
    plain_cpu_s: float               # median CPU seconds of a run, plain layout
    bundled_cpu_s: float
    cpu_ratio: float | None
    plain_text_bytes: int
    bundled_text_bytes: int
    padding_bytes: int               # NOP bytes the bundled layout added to the kernel's code
    repeats: int
    plain_insns: int | None = None   # --count: guest instructions executed
    bundled_insns: int | None = None
    insn_ratio: float | None = None


def image(path: Path, bundled: bool) -> bytes:
    obj = codegen.generate(driver.compile_ir(str(path), "native"), bundled=bundled)
    obj.name = path.stem
    return elfwrite.write(link.link(obj))


def text_stats(blob: bytes) -> tuple[int, int]:
    """(.text bytes, bytes of NOP instructions in it) by a linear capstone pass."""
    text = ELFFile(io.BytesIO(blob)).get_section_by_name(".text")
    code, base = text.data(), text["sh_addr"]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.skipdata = True
    nops = sum(size for _, size, mnemonic, _ in md.disasm_lite(code, base) if mnemonic == "nop")
    return len(code), nops


def run_once(kernel: str, blob: bytes, mode: str, timeout: float | None) -> tuple[float, float]:
    """(guest seconds, CPU seconds) of one checked run."""
    want = expectation(ROOT / "kernels" / f"{kernel}.pvk")
    cpu = process_time()
    result = run_guest(blob, mode, timeout)
    cpu = process_time() - cpu
    if result.reason != "shutdown":
        raise BenchError(f"{kernel}: {result.reason} {result.message}".rstrip())
    if (result.console.decode("latin-1"), result.status) != (want.output, want.status):
        raise BenchError(f"{kernel}: output or status differs from the kernel's header")
    return result.stats.guest_seconds, cpu


def executed(blob: bytes, mode: str) -> int:
    """Guest instructions one run executes, from a translation-block hook."""
    ram = DEFAULT_MEMORY_MIB << 20
    vm = create(load_image(blob, ram), mode, ram)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    sizes: dict[tuple[int, int], int] = {}
    total = [0]

    def on_block(uc, address: int, size: int, _) -> None:
        n = sizes.get((address, size))
        if n is None:
            n = sizes[address, size] = sum(1 for _ in md.disasm_lite(bytes(uc.mem_read(address, size)), address))
        total[0] += n
    vm.engine.uc.hook_add(UC_HOOK_BLOCK, on_block)
    if finish(vm).reason != "shutdown":
        raise BenchError("a counted run did not shut down")
    return total[0]


def measure(kernels: list[str], mode: str, repeat: int, timeout: float | None,
            progress: Progress | None = None, count: bool = False) -> list[Row]:
    images = {(k, lay): image(ROOT / "kernels" / f"{k}.pvk", b) for k in kernels for lay, b in LAYOUTS.items()}
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in images}
    for r in range(repeat):
        for k in kernels:
            order = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
            for lay in order:
                if progress:
                    progress.step(f"repeat {r + 1}/{repeat}: {k} {lay}")
                samples[k, lay].append(run_once(k, images[k, lay], mode, timeout))
    rows = []
    for k in kernels:
        guest = {lay: median([g for g, _ in samples[k, lay]]) for lay in LAYOUTS}
        cpu = {lay: median([c for _, c in samples[k, lay]]) for lay in LAYOUTS}
        (plain_text, plain_nops), (bundled_text, bundled_nops) = (text_stats(images[k, lay]) for lay in LAYOUTS)
        rows.append(Row(k, guest["plain"], guest["bundled"], ratio(guest["bundled"], guest["plain"]),
                        cpu["plain"], cpu["bundled"], ratio(cpu["bundled"], cpu["plain"]),
                        plain_text, bundled_text, bundled_nops - plain_nops, repeat))
        if count:
            if progress:
                progress.step(f"counting instructions: {k}")
            r = rows[-1]
            r.plain_insns, r.bundled_insns = (executed(images[k, lay], mode) for lay in LAYOUTS)
            r.insn_ratio = ratio(r.bundled_insns, r.plain_insns)
    return rows


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}x"


def table(rows: list[Row], mode: str) -> str:
    head = ("kernel", f"guest s plain ({mode})", "bundled", "ratio", "CPU s plain", "bundled", "ratio",
            ".text B plain", "bundled", "NOP B")
    body = [(r.kernel, f"{r.plain_guest_s:.3f}", f"{r.bundled_guest_s:.3f}", _x(r.guest_ratio),
             f"{r.plain_cpu_s:.3f}", f"{r.bundled_cpu_s:.3f}", _x(r.cpu_ratio),
             str(r.plain_text_bytes), str(r.bundled_text_bytes), str(r.padding_bytes)) for r in rows]
    if any(r.insn_ratio is not None for r in rows):
        head += ("insns plain", "bundled", "ratio")
        body = [line + (str(r.plain_insns), str(r.bundled_insns), _x(r.insn_ratio))
                for line, r in zip(body, rows)]
    widths = [max(len(line[c]) for line in [head, *body]) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
             for line in [head, *body]]
    for what in ("guest_ratio", "cpu_ratio", "insn_ratio"):
        worst = max((getattr(r, what) for r in rows if getattr(r, what) is not None), default=None)
        if worst is not None:
            lines.append(f"worst bundled/plain {what.split('_')[0]} {worst:.3f}x (goal: at most {TARGET:.2f}x)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bundle_cost.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernels", nargs="*", metavar="KERNEL", type=one_of(KERNELS, "kernel"), help=f"any of {', '.join(KERNELS)} (default: all)")
    p.add_argument("--repeat", type=whole_number(1), default=5, metavar="N", help="runs per layout (default 5)")
    p.add_argument("--mode", choices=("bare", "trap"), default="bare", help="runtime mode (default bare)")
    p.add_argument("--timeout", type=seconds, default=120.0, metavar="S", help="per run (default 120)")
    p.add_argument("--count", action="store_true",
                   help="also count the guest instructions of one run per layout (slow, exact)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kernels = args.kernels or list(KERNELS)
    steps = args.repeat * len(kernels) * len(LAYOUTS) + (len(kernels) if args.count else 0)
    progress = Progress(sys.stderr, steps)
    try:
        try:
            rows = measure(kernels, args.mode, args.repeat, args.timeout or None, progress, args.count)
        finally:
            progress.clear()
    except USER_ERRORS as e:
        print(e, file=sys.stderr)
        return 1
    except BenchError as e:
        print(f"bundle_cost: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(table(rows, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
