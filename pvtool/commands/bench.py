"""`pvtool bench`: bare vs trap-and-emulate vs paravirtualized, on the bundled hypervisor.

Each kernel is built both ways in memory, then run in every mode, repeats
interleaved; the table (or `--json`) goes to stdout.  The logic lives in
pvtool/tools/bench.py; this module is the command line around it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.errors import ImageError

from ..tools import bench
from ..errors import USER_ERRORS

EPILOG = """\
what is measured (per kernel and mode):
  seconds        median wall time of the run itself (the build is not timed)
  vs bare        seconds relative to the bare run of the same kernel
  exits          trips from the guest into the hypervisor, in total and by reason
  pv/trap        for pv: exits and seconds relative to trap-and-emulate

Every run must end with a shutdown, and with the same exit status and console
output in every mode; otherwise bench stops with exit status 1.

examples:
  pvtool bench                                    # churn, critical, sieve; 5 repeats
  pvtool bench ../shared/conformance/oschurn.pvk --repeat 9
  pvtool bench kernels/critical.pvk --modes trap,pv --json

exit status: 0 success; 1 compile error, failed or mismatched run;
2 bad usage or a kernel that cannot be read."""


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="compare bare, trap-and-emulate and PV runs of kernels",
        description="Build each kernel native and PV (in memory), run it bare, under "
                    "trap-and-emulate and paravirtualized on the bundled hypervisor, repeats "
                    "interleaved so machine noise hits every mode alike, and report median "
                    "run time, exits by reason and the ratios between the modes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernels", nargs="*", metavar="KERNEL.pvk",
                   help="kernels to measure (default: " + ", ".join(
                       f"kernels/{k.name}" for k in bench.DEFAULT_KERNELS) + ")")
    p.add_argument("--repeat", type=_positive_int, default=5, metavar="N",
                   help="runs per kernel and mode; the median is reported (default 5)")
    p.add_argument("--modes", type=_modes, default=list(bench.MODES), metavar="M,M",
                   help="modes to run, any of bare,trap,pv (default: all three)")
    p.add_argument("--timeout", type=_timeout, default=60.0, metavar="S",
                   help="a run still going after S seconds fails the benchmark (default 60; 0: never)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of rows, one per kernel and mode, instead of the table")
    p.set_defaults(func=run)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _timeout(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if s < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return s


def _modes(text: str) -> list[str]:
    try:
        return bench.parse_modes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (choose from bare, trap, pv)") from None


def _kernel_paths(names: list[str]) -> tuple[list[Path] | None, str]:
    paths = [Path(n) for n in names] or list(bench.DEFAULT_KERNELS)
    for p in paths:
        if p.suffix != ".pvk":
            return None, f"pvtool bench: {p}: not a .pvk kernel source"
        if not p.is_file():
            return None, f"pvtool bench: {p}: no such kernel"
    return paths, ""


def run(args: argparse.Namespace) -> int:
    paths, error = _kernel_paths(args.kernels)
    if paths is None:
        print(error, file=sys.stderr)
        return 2
    try:
        kernels = [bench.build(p, name, args.modes) for p, name in zip(paths, bench.kernel_names(paths))]
    except USER_ERRORS as e:
        print(e, file=sys.stderr)
        return 1
    progress = bench.Progress(sys.stderr, args.repeat * len(kernels) * len(args.modes))
    try:
        rows = bench.measure(kernels, args.modes, args.repeat, args.timeout or None, progress=progress)
    except (bench.BenchError, ImageError) as e:
        progress.clear()
        print(f"pvtool bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(bench.table(rows))
    return 0
