"""The gdb stub at the protocol level, with a plain socket client against `pvtool run --gdb`:
framing and malformed input, a second client, a disconnect, Ctrl-C, the end of the run, and
what a debugger may not change (text, page tables, control state, RIP off instruction starts)."""
from __future__ import annotations

import struct
import time
import xml.etree.ElementTree as ET

import pytest

from pvimage import abi
from runtime.debugregs import NUMBER

from gdbclient import (DEBUGME, DEBUGME_STATUS, FAULT, SPIN, Rsp, Session, build, checksum,
                       inside_instruction, symbols)

RIP, RAX, EFLAGS, CS, CR0, CR3 = (NUMBER[n] for n in ("rip", "rax", "eflags", "cs", "cr0", "cr3"))
EPERM, EFAULT, EINVAL = "E01", "E0e", "E16"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gdb-protocol")
    return {(name, target): build(folder, name, source, target)
            for name, source in (("debugme", DEBUGME), ("spin", SPIN), ("fault", FAULT))
            for target in ("pv", "native")}


class Guest:
    """A guest waiting under `pvtool run --gdb`, a client connected to it, the image's symbols."""

    def __init__(self, image, *args: str):
        self.session = Session(image, *args)
        self.client = Rsp(self.session.port)
        self.sym = symbols(image)
        self.image = image

    def inside(self, function: str) -> int:
        return inside_instruction(self.image, self.sym[function])

    def close(self) -> None:
        self.client.close()
        self.session.kill()


@pytest.fixture
def guest(images):
    made = []

    def start(name: str = "debugme", target: str = "pv", *args: str) -> Guest:
        made.append(Guest(images[name, target], *args))
        return made[-1]
    yield start
    for g in made:
        g.close()


def u64(reply: str) -> int:
    return int.from_bytes(bytes.fromhex(reply), "little")


def hex64(value: int) -> str:
    return struct.pack("<Q", value).hex()


def finished(g: Guest, status: int) -> str:
    """Continue to the end: the exit reply, the closed connection, the run's status; its stderr."""
    g.client.send("c")
    assert g.client.stop_reply() == f"W{status:02x}"
    assert g.client.closed()
    result = g.session.finish()
    assert result.status == status
    return result.stderr


# -- framing ------------------------------------------------------------------------------

def test_the_guest_waits_at_its_entry_and_a_run_to_the_end_reports_its_exit_status(guest, images):
    g = guest()
    assert g.client.ask("?").startswith("T05")
    assert u64(g.client.ask(f"p{RIP:x}")) == g.sym["_start"]
    finished(g, DEBUGME_STATUS)


def test_a_bad_checksum_gets_a_nack_and_stray_bytes_are_ignored(guest):
    g = guest()
    g.client.raw(b"$g#00")
    assert g.client.read_byte() == b"-"
    g.client.raw(b"stray bytes+++")
    assert g.client.ask("?").startswith("T05")


def test_malformed_arguments_get_an_error_reply_and_unknown_packets_an_empty_one(guest):
    g = guest()
    for packet in ("mzz,4", "m1000", "M101000,2:abc", "M101000,4:abcd", "P9999=00", f"P{RIP:x}=0011", "Z0,zz,1"):
        assert g.client.ask(packet) == EINVAL, packet
    assert g.client.ask("vUnknownThing") == ""
    assert g.client.ask("Z2,101000,8") == ""             # watchpoints are not offered
    assert g.client.ask("?").startswith("T05")


def test_an_endless_packet_is_dropped_and_the_stub_resynchronises(guest):
    g = guest()
    g.client.raw(b"$" + b"x" * 40000)
    assert g.client.read_byte() == b"-"
    assert g.client.ask("?").startswith("T05")


def test_no_ack_mode(guest):
    g = guest()
    assert g.client.ask("QStartNoAckMode") == "OK"
    g.client.raw(b"$?#" + checksum(b"?"))
    assert g.client.read_byte() == b"$"                  # the reply itself, no '+' before it
    g.client.buf = b"$" + g.client.buf
    assert g.client.reply().startswith("T05")


def test_the_target_description_numbers_the_registers_as_the_g_packet_lays_them_out(guest):
    g = guest()
    doc, offset = "", 0
    while True:
        chunk = g.client.ask(f"qXfer:features:read:target.xml:{offset:x},100")
        doc += chunk[1:]
        offset += len(chunk) - 1
        if chunk[0] == "l":
            break
    regs = list(ET.fromstring(doc).iter("reg"))
    names = [r.get("name") for r in regs]
    assert names[:18] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + \
        [f"r{n}" for n in range(8, 16)] + ["rip", "eflags"]
    assert {"cr0", "cr3", "fs_base", "xmm15"} <= set(names)
    assert len(bytes.fromhex(g.client.ask("g"))) == sum(int(r.get("bitsize")) // 8 for r in regs)
    assert g.client.ask(f"p{RAX:x}") == "00" * 8


# -- clients -------------------------------------------------------------------------------

def test_a_second_client_is_refused_and_the_first_goes_on(guest):
    g = guest()
    other = Rsp(g.session.port)
    try:
        assert other.reply().startswith("E.one debugger at a time")
        assert other.closed()
    finally:
        other.close()
    assert g.client.ask("?").startswith("T05")
    assert "refused a second debugger" in finished(g, DEBUGME_STATUS)


def test_a_client_gone_while_the_guest_is_stopped_takes_its_breakpoints_along(guest):
    g = guest()
    assert g.client.ask(f"Z0,{g.sym['add']:x},1") == "OK"
    g.client.close()                                     # an int3 left behind would fault the guest
    result = g.session.finish()
    assert result.status == DEBUGME_STATUS and "disconnected" in result.stderr


def test_detach_lets_the_guest_run_to_its_end(guest):
    g = guest()
    assert g.client.ask(f"Z0,{g.sym['add']:x},1") == "OK"
    assert g.client.ask("D") == "OK"
    result = g.session.finish()
    assert result.status == DEBUGME_STATUS and "detached" in result.stderr


def test_ctrl_c_a_disconnect_mid_run_and_a_new_client(guest):
    g = guest("spin")
    g.client.send("c")
    time.sleep(0.3)
    g.client.close()                                     # gone while the guest spins: it spins on
    time.sleep(0.3)
    g.client = Rsp(g.session.port)                       # a new client stops it
    assert g.client.ask("?").startswith("T05")
    g.client.send("c")
    time.sleep(0.3)
    g.client.raw(b"\x03")
    assert g.client.stop_reply().startswith("T02")
    n = g.client.ask(f"m{g.sym['n']:x},8")
    assert u64(n) > 0 and u64(n) % 2 == 0
    assert g.client.ask(f"M{g.sym['stop']:x},1:01") == "OK"
    stderr = finished(g, 3)
    assert "disconnected" in stderr


def test_kill_ends_the_run_with_137(guest):
    g = guest()
    g.client.send("k")
    result = g.session.finish()
    assert result.status == 137 and "killed by the debugger" in result.stderr


# -- breakpoints and memory ------------------------------------------------------------------------

def test_a_breakpoint_stops_the_guest_on_it_and_reads_show_the_original_bytes(guest, images):
    g = guest()
    add = g.sym["add"]
    original = g.client.ask(f"m{add:x},4")
    assert g.client.ask(f"Z0,{add:x},1") == "OK"
    assert g.client.ask(f"m{add:x},4") == original       # the int3 is the debugger's business
    g.client.send("c")
    stop = g.client.stop_reply()
    assert stop.startswith("T05") and f"{RIP:02x}:{hex64(add)};" in stop
    assert u64(g.client.ask(f"p{RIP:x}")) == add
    assert g.client.ask(f"z0,{add:x},1") == "OK"
    assert g.client.ask("s").startswith("T05")
    assert u64(g.client.ask(f"p{RIP:x}")) > add
    finished(g, DEBUGME_STATUS)


def test_breakpoints_patch_only_instruction_starts_and_write_nothing_outside_text(guest):
    g = guest()
    assert g.client.ask(f"Z0,{g.inside('add'):x},1") == EPERM      # its bytes would decode otherwise
    assert g.client.ask(f"Z0,{g.sym['counter']:x},1") == "OK"      # data: never run, nothing written
    assert g.client.ask("Z0,40000000000,1") == EFAULT              # not mapped
    finished(g, DEBUGME_STATUS)                                    # an int3 in counter would change it


def test_memory_writes_reach_data_but_never_text_page_tables_or_hypervisor_pages(guest):
    g = guest()
    counter = g.sym["counter"]
    assert g.client.ask(f"m{counter:x},8") == hex64(1)
    assert g.client.ask(f"M{counter:x},8:{hex64(50)}") == "OK"
    assert g.client.ask(f"m{counter:x},8") == hex64(50)
    assert g.client.ask(f"M{g.sym['add']:x},1:cc") == EPERM          # text
    assert g.client.ask(f"M{abi.BOOT_PML4:x},8:{hex64(0)}") == EPERM  # a live page table
    assert g.client.ask(f"M{abi.START_INFO:x},1:00") == EPERM         # the hypervisor's page
    assert g.client.ask("m40000000000,8") == EFAULT
    finished(g, DEBUGME_STATUS + 49)                     # counter 50 instead of 1


def test_register_writes_are_held_to_what_the_guest_could_do(guest):
    g = guest()
    add = g.sym["add"]
    assert g.client.ask(f"P{RAX:x}={hex64(0x1234)}") == "OK"
    assert u64(g.client.ask(f"p{RAX:x}")) == 0x1234
    assert g.client.ask(f"P{RIP:x}={hex64(g.inside('add'))}") == EPERM   # not an instruction start (R8)
    flags = int.from_bytes(bytes.fromhex(g.client.ask(f"p{EFLAGS:x}")), "little")
    for bit in (0x100, 0x200, 0x3000):                   # TF; IF and IOPL are the hypervisor's in pv
        assert g.client.ask(f"P{EFLAGS:x}={struct.pack('<I', flags | bit).hex()}") == EPERM
    assert g.client.ask(f"P{EFLAGS:x}={struct.pack('<I', flags | 1).hex()}") == "OK"   # CF
    assert g.client.ask(f"P{CS:x}={struct.pack('<I', abi.KERNEL_DS).hex()}") == EPERM
    assert g.client.ask(f"P{CR3:x}={hex64(0x200000)}") == EPERM
    assert g.client.ask(f"P{CR0:x}={hex64(0)}") == EPERM
    assert g.client.ask("G" + g.client.ask("g")) == "OK"                 # unchanged: always fine
    assert g.client.ask(f"P{RIP:x}={hex64(add)}") == "OK"
    assert u64(g.client.ask(f"p{RIP:x}")) == add
    assert g.client.ask(f"P{RIP:x}={hex64(g.sym['_start'])}") == "OK"
    finished(g, DEBUGME_STATUS)


def test_trap_mode_checks_control_register_values_and_instruction_starts(guest):
    g = guest("debugme", "native", "--mode", "trap")
    cr0 = u64(g.client.ask(f"p{CR0:x}"))
    assert g.client.ask(f"P{CR0:x}={hex64(cr0 & ~(1 << 31))}") == EINVAL    # paging stays on
    assert g.client.ask(f"P{RIP:x}={hex64(g.inside('add'))}") == EPERM
    finished(g, DEBUGME_STATUS)


def test_bare_mode_lets_a_breakpoint_go_anywhere_in_text(guest):
    g = guest("debugme", "native", "--mode", "bare")
    assert g.client.ask(f"Z0,{g.inside('add'):x},1") == "OK"
    assert g.client.ask(f"z0,{g.inside('add'):x},1") == "OK"
    finished(g, DEBUGME_STATUS)


# -- the end of the run --------------------------------------------------------------------------

def test_a_fault_stops_the_guest_for_inspection_then_ends_the_run(guest):
    g = guest("fault")
    g.client.send("c")
    first = g.client.reply()
    assert first.startswith("O") and b"page fault" in bytes.fromhex(first[1:])
    assert g.client.reply().startswith("T0b")
    assert len(g.client.ask("g")) > 0
    g.client.send("c")
    assert g.client.stop_reply() == "X0b"
    result = g.session.finish()
    assert result.status == 125 and "page fault" in result.stderr


def test_time_stopped_in_the_debugger_does_not_count_against_the_timeout(guest):
    g = guest("debugme", "pv", "--timeout", "1")
    time.sleep(1.5)
    assert g.client.ask("?").startswith("T05")
    finished(g, DEBUGME_STATUS)
