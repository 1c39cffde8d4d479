"""Debugging guests with the real GNU gdb (batch mode) against `pvtool run --gdb`: breakpoints by
function, line and address, the source line, globals, parameters and locals of every kind of
type, stepping, finish, backtraces (through an interrupt handler too), calls into the guest,
Ctrl-C, kill and detach, in every mode."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvimage.sweep import sweep_elf

from gdbclient import DEBUGME, DEBUGME_STATUS, REPO, SPIN, Session, build, line_of

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None,
                                reason="GNU gdb is not installed (scripts/install.sh installs it)")
MODES = {"pv": "pv", "trap": "native", "bare": "native", "hvm": "native", "hvm-shadow": "native"}   # -> target


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gdb")
    return {(name, target): build(folder, name, source, target)
            for name, source in (("debugme", DEBUGME), ("spin", SPIN)) for target in ("pv", "native")}


def gdb(session: Session, image: Path, *commands: str, interrupt_after: float | None = None) -> str:
    """Run gdb in batch mode on `image`, connected to `session`; its output (stdout and stderr)."""
    argv = ["gdb", "-nx", "-batch", "-ex", "set confirm off", "-ex", f"target remote 127.0.0.1:{session.port}"]
    for command in commands:
        argv += ["-ex", command]
    proc = subprocess.Popen(argv + [str(image)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if interrupt_after is not None:
        assert "debugger connected" in session.proc.stderr.readline().decode()
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"gdb did not finish: {out.decode()}")
    return out.decode()


def at_line(output: str, function: str, line: int) -> bool:
    return re.search(rf"{function} \([^)]*\) at \S*debugme\.pvk:{line}\b", output) is not None


@pytest.mark.parametrize("mode", MODES)
def test_break_check_a_global_and_the_line_step_and_see_the_exit_status(images, mode):
    image = images["debugme", MODES[mode]]
    session = Session(image, "--mode", mode)
    try:
        out = gdb(session, image, "break add", "continue", "print counter", "info args", "bt",
                  "next", "next", "info locals", "finish", "next", "stepi", "info registers rip",
                  "delete", "continue")
        result = session.finish()
    finally:
        session.kill()
    line = lambda marker: line_of(DEBUGME, marker)
    assert re.search(rf"Breakpoint 1 at 0x[0-9a-f]+: file \S*debugme\.pvk, line {line('add')}\.", out), out
    assert at_line(out, "Breakpoint 1, add", line("add")) and "add (a=2, b=3)" in out, out
    assert "$1 = 1\n" in out and "a = 2\nb = 3\n" in out, out       # counter before add changed it
    assert re.search(rf"#1 +0x[0-9a-f]+ in kmain \(\) at \S*debugme\.pvk:{line('call')}", out), out
    assert re.search(rf"\n{line('add2')}\t", out) and re.search(rf"\n{line('add3')}\t", out), out
    assert "sum = 5\n" in out, out                                    # info locals
    assert re.search(rf"0x[0-9a-f]+ in kmain \(\) at \S*debugme\.pvk:{line('call')}", out), out   # finish
    assert "Value returned is $2 = 5" in out, out
    assert re.search(rf"\n{line('second')}\t", out), out             # next, back in kmain
    assert re.search(r"rip +0x[0-9a-f]+ +0x[0-9a-f]+ <kmain\+\d+>", out), out
    assert f"exited with code 0{DEBUGME_STATUS:o}]" in out, out         # gdb says it in octal
    assert result.status == DEBUGME_STATUS and result.stdout == b""


@pytest.mark.parametrize("mode", ["pv", "trap"])
def test_print_and_change_globals_of_every_kind_and_call_a_guest_function(images, mode):
    image = images["debugme", MODES[mode]]
    session = Session(image, "--mode", mode)
    try:
        out = gdb(session, image, "break add", "continue", "delete", "print table", "print table[2]",
                  "print origin", "print cursor->y", "print *cursor", "print flag", "print delta",
                  "ptype origin", "set var counter = 50", "print add(3, 4)", "print counter", "continue")
        result = session.finish()
    finally:
        session.kill()
    assert "$1 = {10, 20, 30, 40}\n$2 = 30\n" in out, out
    assert "$3 = {x = 7, y = -3, tag = 9 '\\t'}\n$4 = -3\n$5 = {x = 7, y = -3, tag = 9 '\\t'}\n" in out, out
    assert "$6 = true\n$7 = -12\n" in out, out
    assert re.search(r"type = struct Point \{\s+u64 x;\s+i32 y;\s+u8 tag;\s+\}", out), out
    assert "$8 = 7\n$9 = 57\n" in out, out                            # add(3, 4) ran in the guest
    assert result.status == 81                                         # 9 + (57 + 5 + 9 + 1)


@pytest.mark.parametrize("mode", ["pv", "bare"])
def test_ctrl_c_stops_a_spinning_guest_and_a_memory_write_lets_it_end(images, mode):
    image = images["spin", MODES[mode]]
    session = Session(image, "--mode", mode)
    try:
        out = gdb(session, image, "continue", "print $pc", "print n % 2", "set var stop = 1", "continue",
                  interrupt_after=1.0)
        result = session.finish()
    finally:
        session.kill()
    assert "Program received signal SIGINT" in out, out
    assert re.search(r"\$1 = .*<kmain\+\d+>", out) and "$2 = 0\n" in out, out
    assert "exited with code 03]" in out, out
    assert result.status == 3


def test_a_breakpoint_on_an_instruction_trap_mode_patched_keeps_both(images):
    image = images["debugme", "native"]
    cli = next(f for f in sweep_elf(image.read_bytes()) if f.mnemonic == "cli" and f.function == "masked")
    session = Session(image, "--mode", "trap", "--stats")
    try:
        out = gdb(session, image, f"break *{cli.address:#x}", "continue", "print $eflags", "stepi",
                  "print $eflags", "continue")
        result = session.finish()
    finally:
        session.kill()
    assert re.search(rf"Breakpoint 1 at {cli.address:#x}: file \S*debugme\.pvk, line {line_of(DEBUGME, 'cli')}\.", out)
    assert at_line(out, "Breakpoint 1, masked", line_of(DEBUGME, "cli")), out
    before, after = re.findall(r"\$\d+ = \[ (.*) \]", out)
    assert "IF" in before.split() and "IF" not in after.split()   # the trap emulated cli under the breakpoint
    assert result.status == DEBUGME_STATUS
    alone = subprocess.run([sys.executable, "-m", "pvtool", "run", str(image), "--mode", "trap", "--stats"],
                           cwd=REPO, capture_output=True, text=True)
    exits = lambda text: sorted(re.findall(r"\n  (trap \w+) +(\d+)", text))
    assert exits(result.stderr) == exits(alone.stderr) != []     # the same exits as without a debugger


@pytest.mark.parametrize("target", ["pv", "native"])
def test_backtrace_from_an_interrupt_handler(kernel_image, target):
    image = kernel_image(REPO / "kernels" / "ticks.pvk", target)
    session = Session(image)
    try:
        out = gdb(session, image, "break timer", "continue", "bt", "delete", "continue")
        result = session.finish()
    finally:
        session.kill()
    assert re.search(r"#0 +timer \(\) at \S*ticks\.pvk:\d+", out), out
    assert re.search(r"#\d +0x[0-9a-f]+ in kmain \(\) at \S*ticks\.pvk:\d+", out), out
    assert re.search(r"#\d +0x[0-9a-f]+ in _start \(\)\n", out), out
    assert result.status == 0 and result.stdout.endswith(b"ticks ok\n")


@pytest.mark.parametrize("target", ["pv", "native"])
def test_a_parameter_is_shown_while_it_lives_and_optimized_out_once_a_call_took_its_register(kernel_image, target):
    image = kernel_image(REPO / "kernels" / "mm.pvk", target)
    session = Session(image)
    try:
        out = gdb(session, image, "break map", "continue", "step", "bt", "up", "print va", "print space",
                  "kill")
    finally:
        session.kill()
    assert re.search(r"Breakpoint 1, map \(space=\d+, va=1073741824, frame=\d+\) at \S*mm\.pvk:\d+", out), out
    assert re.search(r"#0 +walk \(space=\d+, va=1073741824\)", out), out
    # space was passed to walk in its argument register; va lives on in a callee-saved one
    assert re.search(r"#1 +0x[0-9a-f]+ in map \(space=<optimized out>, va=1073741824, frame=\d+\)", out), out
    assert "$1 = 1073741824\n$2 = <optimized out>\n" in out, out


@pytest.mark.parametrize("mode", ["trap", "bare"])
def test_backtrace_from_a_system_call_handler_into_user_mode(kernel_image, mode):
    source = REPO / "tests" / "usermode_kernel.pvk"
    image = kernel_image(source, "native")
    text = source.read_text()
    handler = next(k for k, line in enumerate(text.splitlines(), 1) if "frame.rax == 1" in line)
    session = Session(image, "--mode", mode)
    try:
        out = gdb(session, image, f"break usermode_kernel.pvk:{handler}", "continue", "bt", "print/c frame.rdi",
                  "frame 2", "info registers cs", "delete", "continue")
        result = session.finish()
    finally:
        session.kill()
    assert re.search(rf"#0 +on_syscall \(frame=0x[0-9a-f]+ <kstack\+\d+>\) at \S*usermode_kernel\.pvk:{handler}", out), out
    assert re.search(r"#1 +<signal handler called>\n#2 +0x[0-9a-f]+ in user_main \(\) at \S*usermode_kernel\.pvk:\d+", out), out
    assert "$1 = 104 'h'" in out and re.search(r"cs +0x23 ", out), out        # the user's code segment
    assert result.status == 3 and result.stdout.endswith(b"#GP from user mode\n")


def test_kill_ends_the_run_and_detach_lets_it_finish(images):
    image = images["debugme", "pv"]
    killed, detached = Session(image), Session(image)
    try:
        out_kill = gdb(killed, image, "break add", "continue", "kill")
        out_detach = gdb(detached, image, "break add", "continue", "detach")
        kill_result, detach_result = killed.finish(), detached.finish()
    finally:
        killed.kill()
        detached.kill()
    assert "[Inferior 1 (Remote target) killed]" in out_kill
    assert kill_result.status == 137 and "killed by the debugger" in kill_result.stderr
    assert "Detaching from program" in out_detach or "detached" in out_detach, out_detach
    assert detach_result.status == DEBUGME_STATUS


def test_a_source_is_built_into_an_image_gdb_can_load(tmp_path):
    source = tmp_path / "debugme.pvk"
    source.write_text(DEBUGME)
    session = Session(source)
    try:
        image = re.search(r"gdb (\S+\.elf) -ex", session.banner).group(1)
        out = gdb(session, Path(image), f"break debugme.pvk:{line_of(DEBUGME, 'after')}", "continue", "continue")
        result = session.finish()
    finally:
        session.kill()
    assert at_line(out, "kmain", line_of(DEBUGME, "after")), out
    assert result.status == DEBUGME_STATUS
    assert not Path(image).exists()                                 # the temporary image is gone
