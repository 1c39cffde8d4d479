"""Code quality: PVK's compiler against gcc -O0 and -O2 on the same algorithms.

The compute kernels kernels/{sieve,checksum,sort}.pvk and their C twins in
bench/c/ (freestanding, console and exit through rt.h) are built as native
images and run on the bundled hypervisor in bare mode, so the only thing
that differs is the code each compiler made.  Repeats are interleaved (for
each repeat, for each kernel, for each variant), every run's console output
and exit status are checked against the PVK kernel's header, and the report
gives median seconds, code size, and PVK's time and size relative to each
gcc build.

    python bench/code_quality.py [KERNEL ...] [--repeat N] [--json] [--cc GCC]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))        # a script beside the package, not installed with it

from elftools.elf.elffile import ELFFile                      # noqa: E402

from pvtool import driver
from pvimage import elfread as elfinfo                            # noqa: E402
from pvtool.commands.argtypes import one_of, seconds, whole_number  # noqa: E402
from pvtool.tools.bench import Progress, median, ratio              # noqa: E402
from pvtool.errors import USER_ERRORS                         # noqa: E402
from pvtool.expect import Expectation, expectation             # noqa: E402
from runtime.errors import ImageError                         # noqa: E402
from runtime.hypervisor import RunResult, run as run_guest    # noqa: E402

KERNELS = ("sieve", "checksum", "sort")
C_DIR = ROOT / "bench" / "c"
GCC_LEVELS = ("-O0", "-O2")
# The build line that makes a freestanding image the runtime boots like ours.
GCC_FLAGS = ("-ffreestanding", "-fno-pic", "-no-pie", "-nostdlib", "-static", "-fno-stack-protector",
             "-mno-red-zone", "-fcf-protection=none", "-Wl,-Ttext-segment=0x100000",
             "-Wl,--build-id=none")


class BenchError(Exception):
    """A build or run that went wrong; str() is one line."""


@dataclass
class Variant:
    kernel: str
    name: str              # 'pvk', 'gcc-O0', 'gcc-O2'
    image: bytes
    source: Path           # where the kernel's own functions are defined


@dataclass
class Row:
    kernel: str
    variant: str
    seconds: float          # median wall time of the run
    guest_seconds: float    # median time in guest code (the run minus set-up and exits)
    text_bytes: int         # the whole .text section
    kernel_bytes: int       # the functions defined in the kernel's own source
    repeats: int
    pvk_time_ratio: float | None = None   # PVK seconds / this variant's seconds
    pvk_size_ratio: float | None = None   # PVK kernel bytes / this variant's kernel bytes

    def as_dict(self) -> dict:
        doc = dict(self.__dict__)
        doc["seconds"], doc["guest_seconds"] = round(self.seconds, 6), round(self.guest_seconds, 6)
        for key in ("pvk_time_ratio", "pvk_size_ratio"):
            if doc[key] is not None:
                doc[key] = round(doc[key], 4)
        return doc


# -- building -----------------------------------------------------------------------------

def expected(path: Path) -> Expectation:
    try:
        return expectation(path)
    except ValueError as e:
        raise BenchError(str(e)) from None


def gcc_image(cc: str, level: str, source: Path, workdir: Path) -> bytes:
    out = workdir / f"{source.stem}{level}"
    proc = subprocess.run([cc, level, *GCC_FLAGS, "-o", str(out), str(source)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no message"])[0]
        raise BenchError(f"{cc} {level} {source.name} failed: {first}")
    return out.read_bytes()


def variants(kernel: str, cc: str | None, workdir: Path) -> list[Variant]:
    pvk = ROOT / "kernels" / f"{kernel}.pvk"
    found = [Variant(kernel, "pvk", driver.compile_file(str(pvk), "native"), pvk)]
    if cc:
        c = C_DIR / f"{kernel}.c"
        found += [Variant(kernel, f"gcc{lv}", gcc_image(cc, lv, c, workdir), c) for lv in GCC_LEVELS]
    return found


def defined_functions(source: Path) -> set[str]:
    """Names of the functions a PVK or C source file defines itself (not its imports/includes)."""
    text = source.read_text()
    if source.suffix == ".pvk":
        return set(re.findall(r"^\s*fn\s+(\w+)", text, re.M))
    return set(re.findall(r"^[A-Za-z_][\w \t\*]*?\b(\w+)\s*\([^;{]*\)\s*\{", text, re.M))


def code_size(v: Variant) -> tuple[int, int]:
    """(.text bytes, bytes of the functions the kernel's own source defines)."""
    with tempfile.SpooledTemporaryFile() as f:
        f.write(v.image)
        f.seek(0)
        text = ELFFile(f).get_section_by_name(".text")
        text_bytes = text.data_size if text else 0
    own = defined_functions(v.source)
    # gcc names specialised copies sift_down.constprop.0 and the like.
    kernel_bytes = sum(fn.size for fn in elfinfo.load(v.image).functions if fn.name.split(".")[0] in own)
    return text_bytes, kernel_bytes


# -- running ------------------------------------------------------------------------------

def run_once(v: Variant, want: Expectation, timeout: float | None) -> tuple[float, RunResult]:
    start = perf_counter()
    result = run_guest(v.image, "bare", timeout)
    seconds = perf_counter() - start
    if result.reason != "shutdown":
        raise BenchError(f"{v.kernel} ({v.name}) did not shut down: {result.reason} {result.message}".rstrip())
    if result.console != want.output.encode() or result.status != want.status:
        got = result.console.decode(errors="replace").splitlines()
        raise BenchError(f"{v.kernel} ({v.name}) printed {got!r} and exited {result.status}; "
                         f"the header expects {want.output.splitlines()!r}, exit {want.status}")
    return seconds, result


def measure(all_variants: list[Variant], repeat: int, timeout: float | None,
            progress: Progress | None = None) -> list[Row]:
    wants = {k: expected(ROOT / "kernels" / f"{k}.pvk") for k in {v.kernel for v in all_variants}}
    times: dict[int, list[float]] = {i: [] for i in range(len(all_variants))}
    guest: dict[int, list[float]] = {i: [] for i in range(len(all_variants))}
    for r in range(repeat):
        for i, v in enumerate(all_variants):        # kernel-major: variants of one kernel adjacent
            if progress:
                progress.step(f"repeat {r + 1}/{repeat}: {v.kernel} {v.name}")
            seconds, result = run_once(v, wants[v.kernel], timeout)
            times[i].append(seconds)
            guest[i].append(result.stats.guest_seconds)
    rows = [Row(v.kernel, v.name, median(times[i]), median(guest[i]), *code_size(v), repeat)
            for i, v in enumerate(all_variants)]
    pvk = {r.kernel: r for r in rows if r.variant == "pvk"}
    for r in rows:
        if r.variant != "pvk":
            r.pvk_time_ratio = ratio(pvk[r.kernel].seconds, r.seconds)
            r.pvk_size_ratio = ratio(pvk[r.kernel].kernel_bytes, r.kernel_bytes)
    return rows


# -- the report ---------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    header = ("kernel", "variant", "seconds", "guest s", ".text B", "kernel B", "PVK/this time",
              "PVK/this size")
    body = []
    for i, r in enumerate(rows):
        same = i > 0 and rows[i - 1].kernel == r.kernel
        body.append(("" if same else r.kernel, r.variant, f"{r.seconds:.3f}", f"{r.guest_seconds:.3f}",
                     str(r.text_bytes), str(r.kernel_bytes),
                     "" if r.pvk_time_ratio is None else f"{r.pvk_time_ratio:.2f}x",
                     "" if r.pvk_size_ratio is None else f"{r.pvk_size_ratio:.2f}x"))
    widths = [max(len(line[c]) for line in [header] + body) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in [header] + body)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="code_quality.py",
        description="Compare the code PVK's compiler makes with gcc -O0 and -O2 on the same "
                    "algorithms: native images run bare on the bundled hypervisor.",
        epilog="seconds: median wall time of a run; guest s: the part spent in guest code; "
               ".text B: the whole text section; kernel B: the functions the kernel's own source "
               "defines (console and start-up code excluded); PVK/this: PVK's value over the row's.")
    p.add_argument("kernels", nargs="*", metavar="KERNEL", type=one_of(KERNELS, "kernel"),
                   help=f"any of {', '.join(KERNELS)} (default: all)")
    p.add_argument("--repeat", type=whole_number(1), default=5, metavar="N", help="runs per variant (default 5)")
    p.add_argument("--timeout", type=seconds, default=120.0, metavar="S",
                   help="a run still going after S seconds fails (default 120)")
    p.add_argument("--cc", default="gcc", help="the C compiler (default gcc)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cc = shutil.which(args.cc)
    if cc is None:
        print(f"code_quality: {args.cc} not found; skipping the gcc variants", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="pvtool-cq-") as tmp:
            todo = [v for k in args.kernels or KERNELS for v in variants(k, cc, Path(tmp))]
        progress = Progress(sys.stderr, args.repeat * len(todo))
        try:
            rows = measure(todo, args.repeat, args.timeout or None, progress)
        finally:
            progress.clear()
    except USER_ERRORS as e:
        print(e, file=sys.stderr)
        return 1
    except (BenchError, ImageError, elfinfo.ImageError) as e:
        print(f"code_quality: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
