"""The `pvtool` command line: the subcommands, dispatch, and how failures end.

A command reports the user's mistakes itself (one line, status 1 or 2).
Anything else that escapes a command is a bug in pvtool: one line naming
where it happened, exit status 70 (EX_SOFTWARE), no traceback unless the
environment sets PVTOOL_DEBUG=1.
"""
from __future__ import annotations

import argparse
import os
import sys
from types import ModuleType

from .errors import InternalError

EXIT_INTERNAL = 70

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
  pvtool diff kernels/churn.pvk                        # what the PV pass changed
  pvtool run kernels/hello.pvk --mode trap --stats     # run on the hypervisor
  pvtool bench kernels/churn.pvk                       # bare vs trap vs pv

exit status: 0 success, 1 compile error or check failure, 2 bad usage or
unreadable input, 70 internal error (a bug in pvtool: please report it, with
the input; PVTOOL_DEBUG=1 shows the traceback); `run` returns the guest's
status, 124 timeout, 125 fault."""


def command_modules() -> tuple[ModuleType, ...]:
    """Every subcommand's module, imported by name: a command that fails to
    import is an error, never a command silently missing."""
    from .commands import bench, build, check, diff, run
    return build, check, diff, run, bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvtool", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    where = "pvtool"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        where = args.command
        return args.func(args)
    except KeyboardInterrupt:
        print("pvtool: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except InternalError as e:
        return internal_error(e.stage, e.message, e)
    except Exception as e:
        return internal_error(where, f"{type(e).__name__}: {e}", e)


def internal_error(where: str, message: str, error: Exception) -> int:
    if os.environ.get("PVTOOL_DEBUG") == "1":
        raise error
    print(f"pvtool: internal error in {where}: {message} (please report this, with the input)",
          file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
