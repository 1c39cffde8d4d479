"""Test support for the gdb stub: guests to debug, `pvtool run --gdb` as a subprocess, and a plain
GDB remote-protocol client (tests/test_gdb.py drives the real gdb; tests/test_gdb_protocol.py this).

The guests are PVK sources kept here as text, each line that a test names marked `// @name`
(`line_of`).  `Session` starts `pvtool run IMAGE --gdb 127.0.0.1:0 --gdb-wait` in the
repository and learns the port from the banner on stderr.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import capstone
from elftools.elf.elffile import ELFFile

from pvimage.elfread import load
from pvtool import driver

REPO = Path(__file__).resolve().parents[1]
STARTUP = 60.0                       # seconds for pvtool to build, load and print its banner

# Exit status 25: total 9 (2+3, then +4) plus counter 16 (1, +5, +9, +1).
DEBUGME = """\
// debugme: a kernel for the debugger tests.
struct Point { x: u64, y: i32, tag: u8 }

var counter: u64 = 1;
var table: [u16; 4] = [10, 20, 30, 40];
var origin: Point;
var cursor: *Point;
var flag: bool = true;
var delta: i16 = -12;

fn add(a: u64, b: u64) -> u64 {
    var sum = a + b;                   // @add
    counter += sum;                    // @add2
    return sum;                        // @add3
}

fn masked() -> u64 {
    var flags = save_flags();          // @masked
    cli();                             // @cli
    restore_flags(flags);
    return flags;
}

fn kmain() -> u64 {
    sti();
    cursor = &origin;
    origin.x = 7;
    origin.y = -3;
    origin.tag = 9;
    var total = add(2, 3);             // @call
    total = add(total, 4);             // @second
    masked();                          // @masked_call
    counter = counter + 1;             // @after
    return total + counter;            // @end
}
"""
DEBUGME_STATUS = 25

# Spins until a debugger (or nobody: it never ends) changes `stop`; then exits 3.
SPIN = """\
var n: u64;
var stop: bool;
fn kmain() -> u64 {
    while !stop {
        n += 2;                        // @loop
    }
    return 3;
}
"""

# Writes to address 0 (unmapped): a page fault, after a line gdb can break on.
FAULT = """\
fn kmain() -> u64 {
    var p = 0x40000000000 as *u64;     // @before
    *p = 1;                            // @store
    return 0;
}
"""


def line_of(source: str, marker: str) -> int:
    """The 1-based line of `source` that carries `// @marker`."""
    for number, text in enumerate(source.splitlines(), 1):
        if re.search(rf"// @{re.escape(marker)}\b", text):
            return number
    raise KeyError(marker)


def symbols(image: Path) -> dict[str, int]:
    """Every symbol of an image by name (functions and globals)."""
    with open(image, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        return {sym.name: sym["st_value"] for sym in table.iter_symbols() if sym.name}


def inside_instruction(image: Path, address: int) -> int:
    """An address inside (not at the start of) the first instruction of several bytes from `address`."""
    info = load(image.read_bytes())
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return next(insn.address + 1 for insn in md.disasm(info.read(address, 64), address) if insn.size > 1)


def build(folder: Path, name: str, source: str, target: str) -> Path:
    """Write `source` as folder/NAME.pvk and build it for `target`; the image's path."""
    src = folder / f"{name}.pvk"
    src.write_text(source)
    out = folder / f"{name}.{target}.elf"
    out.write_bytes(driver.compile_file(str(src), target))
    return out


@dataclass
class Result:
    status: int
    stdout: bytes
    stderr: str


class Session:
    """`pvtool run IMAGE --gdb 127.0.0.1:0 --gdb-wait ARGS...`, waiting for a debugger."""

    def __init__(self, image: Path, *args: str, wait: bool = True):
        argv = [sys.executable, "-m", "pvtool", "run", str(image), "--gdb", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(argv + (["--gdb-wait"] if wait else []), cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.banner = self.proc.stderr.readline().decode()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.banner)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"no banner from pvtool run --gdb: {self.banner!r} "
                                 f"{self.proc.stderr.read().decode()!r}")
        self.port = int(match.group(1))

    def finish(self, timeout: float = 60.0) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"pvtool run did not end: {err.decode()!r}")
        return Result(self.proc.returncode, out, self.banner + err.decode())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


class Rsp:
    """A minimal GDB remote-protocol client: one request, one reply, acknowledgements on."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: str | bytes) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.raw(b"$" + data + b"#" + checksum(data))
        assert self.read_byte() == b"+", "the stub did not acknowledge a well-formed packet"

    def ask(self, payload: str | bytes) -> str:
        self.send(payload)
        return self.reply()

    def read_byte(self) -> bytes:
        while not self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("the stub closed the connection")
            self.buf += data
        byte, self.buf = self.buf[:1], self.buf[1:]
        return byte

    def reply(self) -> str:
        """The next packet from the stub (its checksum checked, then acknowledged)."""
        while self.read_byte() != b"$":
            pass
        data = b""
        while (byte := self.read_byte()) != b"#":
            data += byte
        sent = self.read_byte() + self.read_byte()
        assert sent == checksum(data), f"bad checksum from the stub on {data!r}"
        self.raw(b"+")
        return data.decode("latin-1")

    def stop_reply(self) -> str:
        """The reply to a resume, skipping console output packets (`O...`)."""
        while (packet := self.reply()).startswith("O") and packet != "OK":
            pass
        return packet

    def closed(self, timeout: float = 10.0) -> bool:
        """Whether the stub closes the connection (end of stream) within `timeout`."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(4096):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return False
