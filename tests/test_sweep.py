"""The sensitive-instruction sweep and the ELF reader under it: every table
entry from hand-encoded bytes, clean gcc code, and bad input of every kind."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from capstone import x86_const as X
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvimage import abi, elfread as elfinfo
from pvimage.elfread import ImageError
from pvimage.sweep import PRIVILEGED, SENSITIVE, UNPRIVILEGED, SweepError, classify, sweep_bytes, sweep_elf

P, U = PRIVILEGED, UNPRIVILEGED
BASE = 0x401000


# -- a tiny ELF64 writer: code in one R-X PT_LOAD at file offset 0x1000, optional notes ----

def note(owner: str, ntype: int, desc: bytes) -> bytes:
    name = owner.encode() + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def make_elf(code: bytes, *, vaddr: int = BASE, notes: bytes = b"", machine: int = 62,
             etype: int = 2, cls: int = 2, data: int = 1, flags: int = 5) -> bytes:
    if cls == 1:   # a real ELF32 header, for the "wrong class" case
        ident = b"\x7fELF" + bytes([1, data, 1]) + bytes(9)
        return ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, vaddr, 52, 0, 0, 52, 32, 1, 0, 0, 0) \
            + struct.pack("<8I", 1, 0x1000, vaddr, vaddr, len(code), len(code), flags, 0x1000) \
            + bytes(0x1000 - 84) + code
    phnum = 2 if notes else 1
    ident = b"\x7fELF" + bytes([cls, data, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, vaddr, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, flags, 0x1000, vaddr, vaddr, len(code), len(code), 0x1000)
    note_off = 0x1000 + len(code)
    if notes:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    head = header + phdrs
    return head + bytes(0x1000 - len(head)) + code + notes


def pv_notes(hypercall_page: int | None = None) -> bytes:
    out = note(abi.NOTE_OWNER, abi.NOTE_MODE, struct.pack("<I", abi.MODE_PV))
    if hypercall_page is not None:
        out += note(abi.NOTE_OWNER, abi.NOTE_HYPERCALL_PAGE, struct.pack("<Q", hypercall_page))
    return out


# -- the table, entry by entry ------------------------------------------------------------

# (capstone id the bytes decode to, bytes, expected category, decode bits)
CASES = [
    (X.X86_INS_CLI, "fa", P, 64), (X.X86_INS_STI, "fb", P, 64), (X.X86_INS_HLT, "f4", P, 64),
    (X.X86_INS_IN, "ec", P, 64), (X.X86_INS_IN, "66 ed", P, 64), (X.X86_INS_IN, "ed", P, 64),
    (X.X86_INS_IN, "e4 60", P, 64), (X.X86_INS_OUT, "ee", P, 64), (X.X86_INS_OUT, "e6 80", P, 64),
    (X.X86_INS_OUT, "66 ef", P, 64),
    (X.X86_INS_INSB, "6c", P, 64), (X.X86_INS_INSW, "66 6d", P, 64), (X.X86_INS_INSD, "6d", P, 64),
    (X.X86_INS_INSB, "f3 6c", P, 64),
    (X.X86_INS_OUTSB, "6e", P, 64), (X.X86_INS_OUTSW, "66 6f", P, 64), (X.X86_INS_OUTSD, "6f", P, 64),
    (X.X86_INS_LGDT, "0f 01 10", P, 64), (X.X86_INS_LIDT, "0f 01 18", P, 64),
    (X.X86_INS_LLDT, "0f 00 d0", P, 64), (X.X86_INS_LTR, "0f 00 d8", P, 64),
    (X.X86_INS_INVLPG, "0f 01 38", P, 64), (X.X86_INS_INVLPGA, "0f 01 df", P, 64),
    (X.X86_INS_INVPCID, "66 0f 38 82 00", P, 64),
    (X.X86_INS_INVD, "0f 08", P, 64), (X.X86_INS_WBINVD, "0f 09", P, 64), (X.X86_INS_WBNOINVD, "f3 0f 09", P, 64),
    (X.X86_INS_RDMSR, "0f 32", P, 64), (X.X86_INS_WRMSR, "0f 30", P, 64),
    (X.X86_INS_CLTS, "0f 06", P, 64), (X.X86_INS_LMSW, "0f 01 f0", P, 64),
    (X.X86_INS_IRET, "66 cf", P, 64), (X.X86_INS_IRETD, "cf", P, 64), (X.X86_INS_IRETQ, "48 cf", P, 64),
    (X.X86_INS_SYSRET, "0f 07", P, 64), (X.X86_INS_SYSRETQ, "48 0f 07", P, 64),
    (X.X86_INS_SYSEXIT, "0f 35", P, 64), (X.X86_INS_SYSEXITQ, "48 0f 35", P, 64),
    (X.X86_INS_RSM, "0f aa", P, 64), (X.X86_INS_SWAPGS, "0f 01 f8", P, 64), (X.X86_INS_RDPMC, "0f 33", P, 64),
    (X.X86_INS_XSETBV, "0f 01 d1", P, 64), (X.X86_INS_XSAVES, "0f c7 2f", P, 64),
    (X.X86_INS_XRSTORS, "0f c7 1f", P, 64),
    (X.X86_INS_MONITOR, "0f 01 c8", P, 64), (X.X86_INS_MWAIT, "0f 01 c9", P, 64),
    (X.X86_INS_CLAC, "0f 01 ca", P, 64), (X.X86_INS_STAC, "0f 01 cb", P, 64),
    (X.X86_INS_VMXON, "f3 0f c7 30", P, 64), (X.X86_INS_VMXOFF, "0f 01 c4", P, 64),
    (X.X86_INS_VMLAUNCH, "0f 01 c2", P, 64), (X.X86_INS_VMRESUME, "0f 01 c3", P, 64),
    (X.X86_INS_VMPTRLD, "0f c7 30", P, 64), (X.X86_INS_VMPTRST, "0f c7 38", P, 64),
    (X.X86_INS_VMCLEAR, "66 0f c7 30", P, 64), (X.X86_INS_VMREAD, "0f 78 c0", P, 64),
    (X.X86_INS_VMWRITE, "0f 79 c0", P, 64), (X.X86_INS_INVEPT, "66 0f 38 80 00", P, 64),
    (X.X86_INS_INVVPID, "66 0f 38 81 00", P, 64), (X.X86_INS_VMRUN, "0f 01 d8", P, 64),
    (X.X86_INS_VMLOAD, "0f 01 da", P, 64), (X.X86_INS_VMSAVE, "0f 01 db", P, 64),
    (X.X86_INS_STGI, "0f 01 dc", P, 64), (X.X86_INS_CLGI, "0f 01 dd", P, 64), (X.X86_INS_SKINIT, "0f 01 de", P, 64),
    (X.X86_INS_PUSHF, "66 9c", U, 64), (X.X86_INS_PUSHFQ, "9c", U, 64), (X.X86_INS_PUSHFD, "9c", U, 32),
    (X.X86_INS_POPF, "66 9d", U, 64), (X.X86_INS_POPFQ, "9d", U, 64), (X.X86_INS_POPFD, "9d", U, 32),
    (X.X86_INS_SGDT, "0f 01 00", U, 64), (X.X86_INS_SIDT, "0f 01 08", U, 64),
    (X.X86_INS_SLDT, "0f 00 c0", U, 64), (X.X86_INS_STR, "0f 00 c8", U, 64), (X.X86_INS_SMSW, "0f 01 e0", U, 64),
    (X.X86_INS_LAR, "48 0f 02 c1", U, 64), (X.X86_INS_LSL, "48 0f 03 c1", U, 64),
    (X.X86_INS_VERR, "0f 00 e0", U, 64), (X.X86_INS_VERW, "0f 00 e8", U, 64),
    (X.X86_INS_LSS, "0f b2 00", U, 64), (X.X86_INS_LFS, "0f b4 00", U, 64), (X.X86_INS_LGS, "0f b5 00", U, 64),
    (X.X86_INS_WRFSBASE, "f3 48 0f ae d0", U, 64), (X.X86_INS_WRGSBASE, "f3 48 0f ae d8", U, 64),
    (X.X86_INS_LCALL, "48 ff 18", U, 64), (X.X86_INS_LJMP, "48 ff 28", U, 64),
    (X.X86_INS_LJMP, "ea 00 10 40 00 08 00", U, 32),
    (X.X86_INS_RETF, "cb", U, 64), (X.X86_INS_RETF, "ca 08 00", U, 64), (X.X86_INS_RETFQ, "48 cb", U, 64),
    (X.X86_INS_CPUID, "0f a2", U, 64), (X.X86_INS_RDTSC, "0f 31", U, 64), (X.X86_INS_RDTSCP, "0f 01 f9", U, 64),
]

# Sensitive only through their operands: (bytes, category).
OPERAND_CASES = [
    ("0f 20 c0", P), ("0f 20 d0", P), ("0f 20 d8", P), ("0f 20 e0", P),    # mov rax, cr0/cr2/cr3/cr4
    ("0f 22 c0", P), ("0f 22 d8", P), ("0f 22 e0", P), ("44 0f 22 c0", P),  # mov cr0/cr3/cr4/cr8, rax
    ("0f 21 f8", P), ("0f 23 c0", P),                                      # mov rax, dr7; mov dr0, rax
    ("8e d8", U), ("8e d0", U), ("8e 10", U), ("8c d8", U), ("8c 00", U),  # mov ds/ss <- ; mov <- ds/es
    ("0f a0", U), ("0f a1", U), ("0f a8", U), ("0f a9", U),                # push/pop fs, gs
    ("ff 18", U), ("ff 28", U),                                            # call far [rax], jmp far [rax]
]

CLEAN = [
    "90", "c3", "48 89 e5", "cc", "cd 80", "0f 05", "f3 90", "0f 0b", "ff d0", "ff 20", "ff 10",
    "64 48 8b 04 25 00 00 00 00",   # mov rax, fs:[0]: a segment override is not a segment move
    "50", "58", "0f 01 c1", "0f 01 d9", "0f 01 d4", "48 0f c7 f0", "0f 34", "0f 01 d0",
]


def decode_one(hexbytes: str, bits: int = 64):
    from pvimage.sweep import decode
    code = bytes.fromhex(hexbytes)
    insn = next(decode(code, BASE, bits))
    assert insn.size == len(code), f"{hexbytes} decodes as {insn.mnemonic} {insn.op_str} ({insn.size} bytes)"
    return insn


@pytest.mark.parametrize("ins_id,hexbytes,category,bits", CASES, ids=[c[1] for c in CASES])
def test_table_entry_detected(ins_id, hexbytes, category, bits):
    insn = decode_one(hexbytes, bits)
    assert insn.id == ins_id
    found = sweep_bytes(bytes.fromhex(hexbytes), BASE, bits)
    assert [(f.address, f.size, f.category) for f in found] == [(BASE, len(bytes.fromhex(hexbytes)), category)]
    assert found[0].why


def test_every_table_entry_has_a_case():
    assert set(SENSITIVE) == {c[0] for c in CASES}


@pytest.mark.parametrize("hexbytes,category", OPERAND_CASES, ids=[c[0] for c in OPERAND_CASES])
def test_operand_rules(hexbytes, category):
    hit = classify(decode_one(hexbytes))
    assert hit is not None and hit[0] == category


@pytest.mark.parametrize("hexbytes", CLEAN)
def test_not_sensitive(hexbytes):
    assert classify(decode_one(hexbytes)) is None


def test_capstone_privileged_group_is_a_fallback():
    class Fake:   # an instruction capstone calls privileged that the table does not list
        id, operands, opcode, modrm = X.X86_INS_NOP, [], [0x90, 0, 0, 0], 0
        groups = [X.X86_GRP_PRIVILEGE]
    assert classify(Fake())[0] == PRIVILEGED


def test_data_in_text_is_skipped_not_fatal():
    # 0f ff is undecodable; the sweep skips bytes and still finds what follows.
    code = bytes.fromhex("0f ff 06 fa 90 0f 0b f4")
    found = sweep_bytes(code, BASE)
    assert [f.mnemonic for f in found][-2:] == ["cli", "hlt"]
    assert found[-1].address == BASE + 7


def test_sweep_elf_addresses_and_order():
    code = bytes.fromhex("90 fa 48 89 e5 0f 01 00 9c c3")
    found = sweep_elf(make_elf(code))
    assert [(f.address - BASE, f.mnemonic, f.category) for f in found] == [
        (1, "cli", P), (5, "sgdt", U), (8, "pushfq", U)]
    assert all(f.function is None and f.line is None for f in found)


def test_hypercall_page_is_skipped():
    page = 0x402000
    code = bytes.fromhex("fa") + b"\x90" * (page - BASE - 1) + b"\xfa" * 4096 + bytes.fromhex("f4")
    info = elfinfo.load(make_elf(code, notes=pv_notes(page)))
    assert info.mode == "pv" and info.hypercall_page == page
    found = sweep_elf(make_elf(code, notes=pv_notes(page)))
    assert [(f.address, f.mnemonic) for f in found] == [(BASE, "cli"), (page + 4096, "hlt")]
    # Without the note the page is ordinary code.
    assert len(sweep_elf(make_elf(code))) == 4096 + 2


def test_non_executable_segment_not_swept():
    assert sweep_elf(make_elf(b"\xfa" * 8, flags=5)) != []
    with pytest.raises(ImageError, match="no executable segment"):
        sweep_elf(make_elf(b"\xfa" * 8, flags=4))


# -- bad input ---------------------------------------------------------------------

GOOD = make_elf(bytes.fromhex("fa f4 c3"), notes=pv_notes())

BAD = {
    "empty": (b"", "empty"),
    "junk": (b"this is not an ELF image at all\n" * 4, "not an ELF"),
    "short": (GOOD[:40], "truncated"),
    "truncated-phdrs": (GOOD[:70], "truncated"),
    "truncated-segment": (GOOD[:0x1001], "truncated"),
    "32-bit": (make_elf(b"\x90", cls=1), "32-bit"),
    "aarch64": (make_elf(b"\x90", machine=183), "AArch64"),
    "big-endian": (make_elf(b"\x90", data=2), "big-endian"),
    "relocatable": (make_elf(b"\x90", etype=1), "not an executable"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_one_line_error(name):
    data, words = BAD[name]
    with pytest.raises(SweepError) as e:
        sweep_elf(data)
    assert words in str(e.value)
    assert "\n" not in str(e.value) and str(e.value)


def test_sweep_error_is_image_error():
    assert SweepError is ImageError


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255), st.integers(0, len(GOOD)))
def test_corrupt_images_never_crash(pos, value, cut):
    data = bytearray(GOOD)
    data[pos] = value
    try:
        sweep_elf(bytes(data[:max(cut, 1)]))
    except ImageError as e:
        assert "\n" not in str(e)


# -- real compiler output --------------------------------------------------------------

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed")

CLEAN_C = """
unsigned long checksum(const unsigned char *p, unsigned long n) {
    unsigned long a = 1, b = 0;
    for (unsigned long i = 0; i < n; i++) { a = (a + p[i]) % 65521; b = (b + a) % 65521; }
    return (b << 16) | a;
}
static unsigned char buf[256];
void _start(void) {
    for (int i = 0; i < 256; i++) buf[i] = (unsigned char)i;
    volatile unsigned long r = checksum(buf, sizeof buf);
    (void)r;
    for (;;) {}
}
"""


def gcc(tmp: Path, name: str, source: str, *flags: str) -> Path:
    src, out = tmp / f"{name}.c", tmp / f"{name}.elf"
    src.write_text(source)
    subprocess.run([GCC, "-O2", "-ffreestanding", "-nostdlib", "-static", "-no-pie", *flags,
                    "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@needs_gcc
def test_clean_gcc_program_has_no_finding(tmp_path):
    image = gcc(tmp_path, "clean", CLEAN_C, "-g")
    assert sweep_elf(image.read_bytes()) == []
    info = elfinfo.load(image.read_bytes())
    assert {"checksum", "_start"} <= {f.name for f in info.functions}
    assert info.mode == "native" and not info.has_pv_notes


@needs_gcc
def test_gcc_inline_asm_found_with_function_and_line(tmp_path):
    source = ('void _start(void) {\n'
              '    __asm__ volatile("cli");\n'
              '    __asm__ volatile("rdtsc" ::: "eax", "edx");\n'
              '    for (;;) __asm__ volatile("hlt");\n'
              '}\n')
    found = sweep_elf(gcc(tmp_path, "asm", source, "-g").read_bytes())
    assert [(f.mnemonic, f.function, Path(f.file).name, f.line) for f in found] == [
        ("cli", "_start", "asm.c", 2), ("rdtsc", "_start", "asm.c", 3), ("hlt", "_start", "asm.c", 4)]


@needs_gcc
def test_relocatable_object_rejected(tmp_path):
    (tmp_path / "o.c").write_text("int f(int x) { return x + 1; }\n")
    subprocess.run([GCC, "-c", "-o", str(tmp_path / "o.o"), str(tmp_path / "o.c")], check=True)
    with pytest.raises(ImageError, match="not an executable"):
        sweep_elf((tmp_path / "o.o").read_bytes())


@needs_gcc
def test_truncated_gcc_image(tmp_path):
    data = gcc(tmp_path, "clean", CLEAN_C, "-g").read_bytes()
    for cut in (3, 63, 64, 200, 4096 + 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ImageError):
            sweep_elf(data[:cut])


def test_symbolizer_describe_without_symbols():
    info = elfinfo.load(GOOD)
    assert info.function_at(BASE) is None and info.line_at(BASE) is None
    assert info.describe(BASE) == f"{BASE:#x}"
    assert info.read(BASE, 2) == b"\xfa\xf4" and info.read(0x10, 1) == b""


# -- one reading of the program headers: anything two readers could see differently is refused ---

def phdr_table(data: bytes) -> tuple[int, int]:
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    return phoff, phnum


def with_phdr(data: bytes, k: int, **fields) -> bytes:
    names = ["type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align"]
    phoff, _ = phdr_table(data)
    values = list(struct.unpack_from("<IIQQQQQQ", data, phoff + 56 * k))
    for name, value in fields.items():
        values[names.index(name)] = value
    out = bytearray(data)
    struct.pack_into("<IIQQQQQQ", out, phoff + 56 * k, *values)
    return bytes(out)


def with_header(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


TWO = make_elf(b"\x90" * 64, notes=pv_notes())   # a text segment and a note segment

AMBIGUOUS = {
    "pn-xnum": (with_header(TWO, 56, "<H", 0xFFFF), "PN_XNUM"),
    "phentsize": (with_header(TWO, 54, "<H", 32), "e_phentsize"),
    "shnum-in-section-0": (with_header(TWO, 40, "<Q", 0x1000), "extended section numbering"),
    "vaddr-paddr": (with_phdr(TWO, 0, paddr=BASE + 0x1000), "differs from physical"),
    "text-not-page-aligned": (with_phdr(TWO, 0, vaddr=BASE + 0x10, paddr=BASE + 0x10), "not page-aligned"),
    "filesz-over-memsz": (with_phdr(TWO, 0, memsz=8), "exceeds memory size"),
    "wraps": (with_phdr(TWO, 0, memsz=(1 << 63) + 0x1000, vaddr=1 << 63, paddr=1 << 63), "end of the address space"),
    "truncated-note": (with_phdr(TWO, 1, filesz=0x10000), "truncated"),
}


@pytest.mark.parametrize("name", AMBIGUOUS)
def test_ambiguous_layouts_refused_in_one_line(name):
    data, words = AMBIGUOUS[name]
    with pytest.raises(ImageError) as e:
        elfinfo.load(data)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_overlapping_and_page_sharing_segments_refused():
    # A second PT_LOAD in place of the note: read-only data after the text.
    rodata = lambda vaddr: with_phdr(TWO, 1, type=1, flags=4, offset=0x1000, vaddr=vaddr, paddr=vaddr,
                                     filesz=16, memsz=16)
    assert [s.address for s in elfinfo.load(rodata(BASE + 0x1000)).segments] == [BASE, BASE + 0x1000]
    with pytest.raises(ImageError, match="segments 0 and 1 overlap"):
        elfinfo.load(rodata(BASE + 0x20))
    # Not overlapping, but in the text's last page: those bytes would be mapped executable unchecked.
    with pytest.raises(ImageError, match="shares a page with executable segment 0"):
        elfinfo.load(rodata(BASE + 0x800))


def test_the_code_a_loader_maps_is_zero_filled_to_the_page_end():
    text = elfinfo.load(with_phdr(TWO, 0, memsz=0x800)).executable[0]
    assert (text.end, text.page_end) == (BASE + 0x800, BASE + 0x1000)
    assert text.code == b"\x90" * 64 + bytes(0x1000 - 64)


def test_code_zero_filled_past_the_last_page_of_its_file_bytes_is_refused():
    # the validator would have to decode zero-fill no file holds: 256 TiB of it in the fuzz's case
    for memsz in (0x1001, 1 << 48):
        with pytest.raises(elfinfo.ImageError, match="reaches past the last page of its 0x40 file bytes"):
            elfinfo.load(with_phdr(TWO, 0, memsz=memsz))
