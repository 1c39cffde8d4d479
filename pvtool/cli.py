"""The `pvtool` command line: finds the subcommands and dispatches to them."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("build", "check", "diff", "run", "bench")

DESCRIPTION = """\
pvtool: a guest-kernel paravirtualization toolchain.

Compiles PVK kernels to x86-64 ELF images, either native (real privileged
instructions; boots on QEMU) or paravirtualized (every sensitive operation
rewritten into hypercalls and shared-page accesses), and runs them on the
bundled hypervisor."""

EPILOG = """\
examples:
  pvtool build kernels/hello.pvk -o hello.elf          # PV image (default)
  pvtool build kernels/hello.pvk --target native       # boots on QEMU
  pvtool check hello.elf                               # any sensitive instruction left?
  pvtool diff kernels/oschurn.pvk                      # what the PV pass changed
  pvtool run kernels/hello.pvk --mode trap --stats     # run on the hypervisor
  pvtool bench kernels/oschurn.pvk                     # bare vs trap vs pv

exit status: 0 success, 1 compile error or check failure, 2 bad usage or
unreadable input; `run` returns the guest's status, 124 timeout, 125 fault."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvtool", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pvtool.commands.{name}")
        except ImportError:
            continue  # a command whose stage is not installed in this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("pvtool: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
