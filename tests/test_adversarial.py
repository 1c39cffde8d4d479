"""Hostile images, refused end to end: `pvtool check` (exit 1 or 2) and `pvtool run` (exit 125),
each with one line naming the rule or the problem; and a bounded fuzz of the image reader,
the validator and the loader, which may only accept an image or refuse it with an ImageError."""
from __future__ import annotations

import argparse
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pvasm
from pvimage import abi
from pvimage.elfread import ImageError, load
from pvimage.validate import validate
from pvtool.cli import main
from pvtool.cli import build_parser
from pvtool.commands import run as run_command
from runtime.loader import load_image

pytestmark = pytest.mark.skipif(not pvasm.have_binutils(), reason="GNU as and ld are needed")


def hidden(prefix: str, insn: str, room: int) -> bytes:
    """`jmp` into the immediate or displacement of an innocent instruction, where `insn` waits."""
    body = bytes.fromhex(insn).ljust(room, b"\x90")
    return pvasm.image(f"jmp in\n {pvasm.hexbytes(prefix)}\nin: {pvasm.hexbytes(body.hex())}")


def with_fifth_segment_behind_pn_xnum() -> bytes:
    """e_phnum = PN_XNUM and section 0's sh_info = the real count, with one more R+X PT_LOAD
    behind the table: a reader honouring sh_info sees the real segments, one walking 65,535
    entries also maps the extra one, whose `cli; hlt` nobody validated."""
    data = bytearray(pvasm.image("nop"))
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    shoff, = struct.unpack_from("<Q", data, 40)
    extra = phoff + phnum * 56
    code_at = 0x800
    assert extra + 56 <= code_at and data[code_at:code_at + 2] == b"\0\0"
    data[code_at:code_at + 2] = b"\xfa\xf4"
    struct.pack_into("<IIQQQQQQ", data, extra, 1, 5, code_at, 0x300000, 0x300000, 2, 2, 0x1000)
    struct.pack_into("<H", data, 56, 0xFFFF)
    struct.pack_into("<I", data, shoff + 44, phnum)        # sh_info of section 0
    return bytes(data)


def _good() -> bytes:
    return pvasm.image("nop")


def _entry(data: bytes, entry: int) -> bytes:
    return pvasm.patch(data, 24, "<Q", entry)


def _note_version(data: bytes, version: int) -> bytes:
    head = struct.pack("<III", 7, 4, abi.NOTE_ABI_VERSION) + b"PVTool\0\0"
    at = data.find(head)
    return pvasm.patch(data, at + len(head), "<I", version)


# name -> (image, check's exit status, words in the one line)
CASES = {
    "wrmsr in mov imm32": (lambda: hidden("b8", "0f 30", 4), 1, "rule R5"),
    "mov cr3 in mov imm64": (lambda: hidden("48 b8", "0f 22 d8", 8), 1, "rule R5"),
    "cli in nop disp32": (lambda: hidden("0f 1f 80", "fa", 4), 1, "rule R5"),
    "swapgs behind a 66 prefix": (lambda: hidden("66 0f 1f 80", "0f 01 f8", 4), 1, "rule R5"),
    "mov dr7 behind a 67 prefix": (lambda: hidden("67 8d 80", "0f 23 f8", 4), 1, "rule R5"),
    "unmasked jmp": (lambda: pvasm.image("jmp *%rax"), 1, "rule R6"),
    "unmasked call": (lambda: pvasm.image("call *%rbx"), 1, "rule R6"),
    "ret": (lambda: pvasm.image("ret"), 1, "rule R4"),
    "jmp through memory": (lambda: pvasm.image("jmp *(%rax)"), 1, "rule R4"),
    "jump to the jmp of a masked pair": (
        lambda: pvasm.image("jmp 1f\n .balign 32, 0xcc\n and $-32, %rax\n1: jmp *%rax"), 1, "rule R5"),
    "instruction across a bundle end": (lambda: pvasm.image(".fill 30, 1, 0x90\n mov $1, %eax"), 1, "rule R3"),
    "unaligned entry": (lambda: _entry(_good(), abi.LOAD_BASE + 5), 1, "rule R7"),
    "writable text": (lambda: pvasm.patch_phdr(_good(), 0, flags=7), 1, "W^X"),
    "PN_XNUM with a smaller sh_info": (with_fifth_segment_behind_pn_xnum, 2, "PN_XNUM"),
    "overlapping segments": (lambda: pvasm.patch_phdr(_good(), 1, vaddr=abi.LOAD_BASE + 0x1000,
                                                      paddr=abi.LOAD_BASE + 0x1000), 2, "overlap"),
    "text not page-aligned": (lambda: pvasm.patch_phdr(_good(), 0, vaddr=abi.LOAD_BASE + 0x20,
                                                       paddr=abi.LOAD_BASE + 0x20), 2, "not page-aligned"),
    "p_vaddr != p_paddr": (lambda: pvasm.patch_phdr(_good(), 0, paddr=0x400000), 2, "differs from physical"),
    # found by the fuzz below: 256 TiB of executable zero-fill to check
    "text zero-filled past its file": (lambda: pvasm.patch_phdr(_good(), 0, memsz=1 << 48), 2,
                                       "reaches past the last page"),
    "truncated program headers": (lambda: _good()[:100], 2, "truncated"),
    "truncated section headers": (lambda: _good()[:-10], 2, "truncated"),
    "ABI version 1": (lambda: _note_version(_good(), 1), 2, "PV ABI version 1 is not supported"),
}


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adversarial")
    out = {}
    for k, (name, (make, *_)) in enumerate(CASES.items()):
        out[name] = folder / f"case{k}.elf"
        out[name].write_bytes(make())
    return out


@pytest.mark.parametrize("name", CASES)
def test_check_refuses_in_one_line(name, case_files, capsys):
    _, status, words = CASES[name]
    assert main(["check", str(case_files[name])]) == status
    cap = capsys.readouterr()
    text = cap.out if status == 1 else cap.err
    named = [line for line in text.splitlines() if words in line]
    assert len(named) == 1, text
    if status == 2:
        assert cap.out == "" and text.count("\n") == 1


@pytest.mark.parametrize("name", CASES)
def test_run_refuses_in_one_line(name, case_files, capfd):
    args = build_parser().parse_args(["run", str(case_files[name]), "--timeout", "5"])
    assert run_command.run(args) == 125
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pvtool run: ") and CASES[name][2] in err


def test_the_good_image_the_cases_start_from_runs(case_files):
    from runtime.hypervisor import run
    assert run(_good(), timeout=5).status == 7


# -- fuzz -----------------------------------------------------------------------------------------

SEED = pvasm.image("""
    mov %rdi, %rax
    and $-32, %rax
    call *%rax
    jz case
    .balign 32, 0xcc
    pop %r11
    and $-32, %r11
    jmp *%r11
""") if pvasm.have_binutils() else b""


def load_all_the_way(data: bytes) -> None:
    info = load(data)
    if info.mode == "pv":
        validate(info)
    load_image(data, 64 << 20)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.one_of(st.integers(0, 0x1FF), st.integers(0, max(len(SEED) - 1, 0))),
                                st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(1, max(len(SEED), 1))))
def test_mutated_images_are_accepted_or_refused_never_crash(edits, cut):
    data = bytearray(SEED)
    for pos, value in edits:
        data[pos] = value
    try:
        load_all_the_way(bytes(data[:cut]))
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
