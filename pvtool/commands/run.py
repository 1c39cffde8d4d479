"""`pvtool run`: run an image (or a .pvk source, built on the fly) on the bundled hypervisor.

stdout carries exactly the guest's console output.  The exit status is the
guest's own (the debug-exit byte or the shutdown hypercall's status); 124
when the guest is stopped by --timeout or --max-exits; 125 when it faults
or the image is refused, with one line on stderr; 1 when a .pvk source
does not compile; 2 when the file cannot be read.

With --gdb the run serves the GDB remote protocol (runtime/gdbstub.py) on
a TCP port, loopback unless a host is named; stderr says where, and which
image file gdb should load (a .pvk source is built into a temporary file
for it).  The exit status stays the guest's; 137 if gdb kills it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from runtime.debugger import Debugger
from runtime.errors import ImageError
from runtime.gdbstub import GdbServer
from runtime.hypervisor import (DEFAULT_MEMORY_MIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB, MODES, RunResult,
                                run as run_guest)

from . import argtypes

EPILOG = """\
modes:
  bare   a native image on a bare machine: privileged instructions act on the
         virtual CPU directly, port I/O reaches the device model (the baseline)
  trap   a native image under trap-and-emulate: every sensitive instruction
         and every write to a live page table exits to the hypervisor
  pv     a paravirtualized image: it reaches the hypervisor only through
         hypercalls (the default for PV images; bare is the default for native)
  hvm    a native image with the exits of VT-x with EPT: port I/O, hlt, cpuid,
         MSRs, xsetbv, wbinvd, external interrupts and the interrupt window
  hvm-shadow
         VT-x without nested paging: hvm's exits plus CR3 loads, invlpg, guest
         page faults and writes to guest page tables (shadow paging)

debugging:
  pvtool run kernels/hello.pv.elf --gdb 1234 --gdb-wait
  gdb kernels/hello.pv.elf -ex 'target remote :1234'

exit status: the guest's status; 124 timeout or --max-exits; 125 guest fault
or refused image; 137 killed from gdb; 1 compile error (.pvk); 2 unreadable
file, bad usage, or a --gdb address that cannot be listened on."""


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run an image on the bundled hypervisor",
        description="Run an ELF64 image, or a .pvk source built on the fly for the mode's "
                    "target, on the bundled Unicorn hypervisor. stdout is the guest's console.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE|SRC.pvk", help="an ELF64 x86-64 image or a PVK source")
    p.add_argument("--mode", choices=MODES, help="bare, trap, pv, hvm or hvm-shadow (default: pv for PV "
                                                 "images and .pvk sources, bare for native images)")
    p.add_argument("--timeout", type=argtypes.seconds, default=60.0, metavar="S",
                   help="stop a guest still running after S seconds, exit 124 (default 60; 0: never)")
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, metavar="MiB",
                   help=f"guest RAM in MiB (default {DEFAULT_MEMORY_MIB})")
    p.add_argument("--max-exits", type=argtypes.whole_number(0), metavar="N", help="stop the guest after N exits, exit 124")
    p.add_argument("--cmdline", default="", help="the command line in the start-info page")
    p.add_argument("--stats", action="store_true",
                   help="print exits by reason, guest and wall time to stderr")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON (stderr)")
    p.add_argument("--stats-file", metavar="F", help="write the statistics as JSON to F")
    p.add_argument("--trace", action="store_true",
                   help="log every exit to stderr, with the virtual time and the guest's source line")
    p.add_argument("--profile", action="store_true",
                   help="print where the exits come from: counts by reason and source line, to stderr")
    p.add_argument("--lenient-multicalls", action="store_true",
                   help="a refused multicall entry only gets -errno in its result field, instead of "
                        "stopping the guest (which is the default)")
    p.add_argument("--gdb", type=_endpoint, metavar="[HOST:]PORT",
                   help="serve gdb's remote protocol on PORT (on loopback unless HOST is given; "
                        "0 picks a free port); connect with gdb's `target remote :PORT`")
    p.add_argument("--gdb-wait", action="store_true",
                   help="with --gdb: hold the guest before its first instruction until gdb connects")
    p.set_defaults(func=run)


def _endpoint(text: str) -> tuple[str, int]:
    """`1234`, `:1234`, `HOST:1234` or `[::1]:1234` -> (host, port); loopback by default."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT with a port 0..65535, not {text!r}")
    return host, int(port)


def _image(args: argparse.Namespace) -> tuple[bytes | None, int]:
    """The image bytes, or None and the exit status after reporting why not."""
    if args.image.endswith(".pvk"):
        from .. import driver                    # the compiler loads only for sources
        from ..errors import USER_ERRORS
        try:
            return driver.compile_file(args.image, "pv" if args.mode in (None, "pv") else "native"), 0
        except USER_ERRORS as e:
            print(e, file=sys.stderr)
            return None, 1
    try:
        return Path(args.image).read_bytes(), 0
    except OSError as e:
        print(f"pvtool run: {args.image}: {e.strerror or e}", file=sys.stderr)
        return None, 2


def render_profile(rows: list[tuple[int, str, str]], limit: int = 40) -> str:
    """Where the exits come from, most first: count, reason, guest address and source line."""
    if not rows:
        return "profile: no exits"
    width = max(len(reason) for _, reason, _ in rows[:limit])
    lines = [f"profile: {sum(n for n, _, _ in rows)} exits from {len(rows)} places"
             + (f" (the top {limit} shown)" if len(rows) > limit else "")]
    lines += [f"  {n:>9}  {reason.ljust(width)}  {where}" for n, reason, where in rows[:limit]]
    return "\n".join(lines)


def _console(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def run(args: argparse.Namespace) -> int:
    if not MIN_MEMORY_MIB <= args.memory <= MAX_MEMORY_MIB:
        print(f"pvtool run: --memory must be {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB} MiB", file=sys.stderr)
        return 2
    if args.gdb_wait and not args.gdb:
        print("pvtool run: --gdb-wait needs --gdb [HOST:]PORT", file=sys.stderr)
        return 2
    image, status = _image(args)
    if image is None:
        return status
    with ExitStack() as cleanup:
        debugger = None
        if args.gdb:
            debugger = _debugger(args, image, cleanup)
            if debugger is None:
                return 2
        try:
            result = run_guest(image, args.mode, args.timeout or None, args.memory,
                               max_exits=args.max_exits, trace=sys.stderr if args.trace else None,
                               console=_console, cmdline=args.cmdline, profile=args.profile,
                               lenient_batches=args.lenient_multicalls, debugger=debugger)
        except ImageError as e:
            print(f"pvtool run: {args.image}: {e}", file=sys.stderr)
            return 125
    if result.console_lost:
        _drop_stdout()
    if result.message:
        print(result.message, file=sys.stderr)
    _report(args, result)
    return result.status


def _debugger(args: argparse.Namespace, image: bytes, cleanup: ExitStack) -> Debugger | None:
    """Listen for gdb and say where on stderr (None after reporting why not)."""
    host, port = args.gdb
    log = lambda text: print(f"pvtool run: gdb: {text}", file=sys.stderr, flush=True)
    try:
        server = GdbServer.listen(host, port, log)
    except OSError as e:
        print(f"pvtool run: --gdb {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return None
    cleanup.callback(server.close)
    path = args.image
    if path.endswith(".pvk"):                  # gdb reads symbols and lines from the image file
        folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="pvtool-gdb-"))
        path = os.path.join(folder, Path(path).stem + ".elf")
        Path(path).write_bytes(image)
    host, port = server.address
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log(f"listening on {target}{'; the guest waits for it' if args.gdb_wait else ''}: "
        f"gdb {shlex.quote(path)} -ex 'target remote {target}'")
    return Debugger(server, wait=args.gdb_wait)


def _drop_stdout() -> None:
    """The reader of our stdout went away (`| head -1`): send the rest nowhere, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _report(args: argparse.Namespace, result: RunResult) -> None:
    if args.stats:
        print(result.stats.render(), file=sys.stderr)
    if args.profile:
        print(render_profile(result.profile), file=sys.stderr)
    if args.json or args.stats_file:
        doc = {"image": args.image, "status": result.status, "end": result.reason,
               "message": result.message, "console_bytes": result.console_bytes, **result.stats.as_dict()}
        if args.profile:
            doc["profile"] = [{"exits": n, "reason": reason, "where": where} for n, reason, where in result.profile]
        text = json.dumps(doc, indent=2)
        if args.stats_file:
            try:
                Path(args.stats_file).write_text(text + "\n")
            except OSError as e:
                print(f"pvtool run: cannot write {args.stats_file}: {e.strerror or e}", file=sys.stderr)
        else:
            print(text, file=sys.stderr)
