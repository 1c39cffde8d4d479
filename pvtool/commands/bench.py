"""`pvtool bench`: bare vs trap-and-emulate vs paravirtualized, on the bundled hypervisor.

Each kernel is built both ways in memory, then run in every mode, repeats
interleaved; the table (or `--json`) goes to stdout, a picture to `--plot`.
The logic lives in pvtool/tools/bench.py (measuring), costmodel.py (the
modelled exit costs) and benchplot.py (the picture); this module is the
command line around them.  Everything the options can get wrong (a cost
file, a plot's suffix, matplotlib missing) is refused before anything runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.errors import ImageError

from ..errors import USER_ERRORS
from ..tools import bench, benchplot, costmodel
from . import argtypes

EPILOG = """\
what is measured (per kernel and mode, medians of the repeats):
  run s          the run without loading (the build is not timed either) ...
  guest s        ... of which guest code
  hyp s          ... and the hypervisor's exit handling
  load s         reading, validating and loading the image, apart
  vs bare        run s relative to the bare run of the same kernel
  exits          trips from the guest into the hypervisor, in total and by reason
  pv/trap        for pv: exits and run s relative to trap-and-emulate
  modelled ms    what those exits would cost on a real CPU (--cost-model): this
                 runtime's exits cost Python time, so its own ratios overstate them
A kernel that marks phases on port 0x80 also gets figures per operation of
each phase: exits by reason, virtual and host time, modelled cost; --markdown
prints just those exits and costs per operation, one Markdown table per
phase, the same on every run (docs/bench.md holds kernels/lmbench.pvk's).

Every run must end with a shutdown, and with the same exit status and console
output in every mode; otherwise bench stops with exit status 1.

examples:
  pvtool bench                                    # churn, critical, sieve, tasks; 5 repeats
  pvtool bench kernels/churn.pvk --repeat 9 --cost-model merom
  pvtool bench kernels/critical.pvk --modes trap,pv --json
  pvtool bench kernels/churn.pvk --plot churn.svg # needs: pip install 'pvtool[plot]'
  pvtool bench kernels/lmbench.pvk --repeat 1 --markdown   # the per-operation tables

exit status: 0 success; 1 compile error, failed or mismatched run, plot not
written; 2 bad usage, a kernel or cost file that cannot be used, or --plot
without matplotlib."""


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="compare bare, trap-and-emulate, PV and hardware-assisted runs of kernels",
        description="Build each kernel native and PV (in memory), run it bare, under "
                    "trap-and-emulate, paravirtualized and with the exits of VT-x (hvm, and "
                    "hvm-shadow without nested paging) on the bundled hypervisor, repeats "
                    "interleaved so machine noise hits every mode alike, and report median "
                    "run time, exits by reason and the ratios between the modes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernels", nargs="*", metavar="KERNEL.pvk",
                   help="kernels to measure (default: " + ", ".join(
                       f"kernels/{k.name}" for k in bench.DEFAULT_KERNELS) + ")")
    p.add_argument("--repeat", type=argtypes.whole_number(1), default=5, metavar="N",
                   help="runs per kernel and mode; the median is reported (default 5)")
    p.add_argument("--modes", type=_modes, default=list(bench.MODES), metavar="M,M",
                   help=f"modes to run, any of {','.join(bench.MODES)} (default: all)")
    p.add_argument("--timeout", type=argtypes.seconds, default=60.0, metavar="S",
                   help="a run still going after S seconds fails the benchmark (default 60; 0: never)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print a JSON list of rows, one per kernel and mode, instead of the table")
    output.add_argument("--markdown", action="store_true",
                        help="print only the per-operation figures of the marked phases, as Markdown tables "
                             "(exits and modelled cost, no times: the same on every run)")
    p.add_argument("--cost-model", metavar="NAME",
                   help="the CPU whose exit costs price the exits (default: the cost file's default; "
                        "bench/costs.toml has nehalem, penryn, merom)")
    p.add_argument("--cost-file", type=Path, metavar="F",
                   help="read the cost models from F (TOML, or JSON by suffix) instead of bench/costs.toml")
    p.add_argument("--plot", type=_plot_path, metavar="FILE",
                   help="also draw exits by reason and time per kernel and mode into FILE (.svg or .png; "
                        "needs matplotlib: pip install 'pvtool[plot]')")
    p.set_defaults(func=run)


def _modes(text: str) -> list[str]:
    try:
        return bench.parse_modes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (choose from {', '.join(bench.MODES)})") from None


def _plot_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in benchplot.SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: the picture's name must end in .svg or .png")
    return path


class _Unusable(Exception):
    """Options or inputs refused before anything runs; str() is the one-line message."""


def _kernel_paths(names: list[str]) -> list[Path]:
    paths = [Path(n) for n in names] or list(bench.DEFAULT_KERNELS)
    for p in paths:
        if p.suffix != ".pvk":
            raise _Unusable(f"{p}: not a .pvk kernel source")
        if not p.is_file():
            raise _Unusable(f"{p}: no such kernel")
    return paths


def _cost_model(args: argparse.Namespace) -> costmodel.Model:
    try:
        return costmodel.load(args.cost_file).choose(args.cost_model)
    except costmodel.CostModelError as e:
        raise _Unusable(str(e)) from None


def run(args: argparse.Namespace) -> int:
    try:
        paths = _kernel_paths(args.kernels)
        if args.plot and not benchplot.available():
            raise _Unusable(f"--plot needs matplotlib, which is not installed: {benchplot.INSTALL_HINT}")
        model = _cost_model(args)
    except _Unusable as e:
        print(f"pvtool bench: {e}", file=sys.stderr)
        return 2
    try:
        kernels = [bench.build(p, name, args.modes) for p, name in zip(paths, bench.kernel_names(paths))]
    except USER_ERRORS as e:
        print(e, file=sys.stderr)
        return 1
    progress = bench.Progress(sys.stderr, args.repeat * len(kernels) * len(args.modes))
    try:
        rows = bench.measure(kernels, args.modes, args.repeat, args.timeout or None, progress=progress,
                             model=model)
    except (bench.BenchError, ImageError) as e:
        progress.clear()
        print(f"pvtool bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif args.markdown:
        print(bench.markdown(rows, model), end="")
    else:
        print(bench.table(rows, model))
    return _plot(rows, args.plot) if args.plot else 0


def _plot(rows: list[bench.Row], path: Path) -> int:
    try:
        benchplot.plot(rows, path)
    except OSError as e:
        print(f"pvtool bench: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
